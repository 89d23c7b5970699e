//! DeepSeek-V2's config fields, as transformers' `DeepseekV2TopkRouter` and
//! `DeepseekV2Moe` read them.

use super::{
    Family, FamilyFields, GroupLimit, MAX_INTERMEDIATE_SIZE, RawConfig, in_range, required,
};
use crate::{CoreError, CoreResult};

/// `DeepseekV2Config`'s shared experts when `config.json` names none.
const DEFAULT_SHARED_EXPERTS: usize = 2;

impl RawConfig {
    /// DeepSeek-V2: softmax scores, `greedy` or `group_limited_greedy` top-k
    /// (groups ranked by their best expert), the chosen probabilities times
    /// `routed_scaling_factor` without renormalisation, shared experts of
    /// `n_shared_experts × moe_intermediate_size`, dense layers first.
    pub(super) fn deepseek_v2_fields(&self, num_experts: usize) -> CoreResult<FamilyFields> {
        let family = Family::DeepseekV2;
        let expert_intermediate_size = in_range(
            "moe_intermediate_size",
            required(self.moe_intermediate_size, "moe_intermediate_size", family)?,
            1,
            MAX_INTERMEDIATE_SIZE,
        )?;
        let shared = self.n_shared_experts.unwrap_or(DEFAULT_SHARED_EXPERTS);
        let shared_intermediate_size = expert_intermediate_size
            .checked_mul(shared)
            .filter(|&size| size <= MAX_INTERMEDIATE_SIZE)
            .ok_or_else(|| {
                CoreError::Config(format!(
                    "n_shared_experts {shared} × moe_intermediate_size {expert_intermediate_size} \
                     exceeds the largest shared expert, {MAX_INTERMEDIATE_SIZE} columns"
                ))
            })?;
        let first_moe = self.first_k_dense_replace.unwrap_or(0);
        if first_moe >= self.num_hidden_layers {
            return Err(CoreError::Config(format!(
                "first_k_dense_replace is {first_moe}; it must be below num_hidden_layers {}",
                self.num_hidden_layers
            )));
        }
        self.refuse_deepseek_v2_ambiguities()?;
        let group_limit = match self.topk_method.as_deref().unwrap_or("greedy") {
            "greedy" => None,
            "group_limited_greedy" => Some(self.deepseek_v2_group_limit(num_experts)?),
            other => {
                return Err(CoreError::Config(format!(
                    "topk_method {other:?} is not supported; deepseek_v2 uses greedy or group_limited_greedy"
                )));
            }
        };
        Ok(FamilyFields {
            expert_intermediate_size,
            shared_intermediate_size: (shared > 0).then_some(shared_intermediate_size),
            norm_topk_prob: false,
            moe_layers: (0..self.num_hidden_layers)
                .map(|layer| layer >= first_moe)
                .collect(),
            group_limit,
            routed_scaling_factor: self.deepseek_v3_routed_scaling_factor()?,
        })
    }

    /// Fields whose meaning transformers and DeepSeek's own code disagree
    /// on, refused rather than guessed: DeepSeek's code renormalises the
    /// top-k weights with `norm_topk_prob` and places MoE layers every
    /// `moe_layer_freq`, transformers does neither. The published
    /// checkpoints set neither (false, 1).
    fn refuse_deepseek_v2_ambiguities(&self) -> CoreResult<()> {
        if self.norm_topk_prob == Some(true) {
            return Err(CoreError::Config(
                "norm_topk_prob true is not supported for deepseek_v2: transformers' \
                 DeepseekV2 router ignores it while DeepSeek's code renormalises"
                    .into(),
            ));
        }
        if let Some(frequency) = self.moe_layer_freq
            && frequency != 1
        {
            return Err(CoreError::Config(format!(
                "moe_layer_freq {frequency} is not supported for deepseek_v2: transformers \
                 makes every layer from first_k_dense_replace on MoE; only 1 agrees"
            )));
        }
        if let Some(scoring) = &self.scoring_func
            && scoring != "softmax"
        {
            return Err(CoreError::Config(format!(
                "scoring_func {scoring:?} is not supported; deepseek_v2 uses softmax"
            )));
        }
        Ok(())
    }

    /// `group_limited_greedy`'s `n_group` and `topk_group`: groups divide
    /// the experts, and the kept groups hold at least `num_experts_per_tok`.
    fn deepseek_v2_group_limit(&self, num_experts: usize) -> CoreResult<GroupLimit> {
        let groups = required(self.n_group, "n_group", Family::DeepseekV2)?;
        let top_groups = required(self.topk_group, "topk_group", Family::DeepseekV2)?;
        if groups == 0 || !num_experts.is_multiple_of(groups) {
            return Err(CoreError::Config(format!(
                "n_group {groups} must divide n_routed_experts {num_experts}"
            )));
        }
        if top_groups == 0 || top_groups > groups {
            return Err(CoreError::Config(format!(
                "topk_group {top_groups} must be between 1 and n_group {groups}"
            )));
        }
        if self.num_experts_per_tok > top_groups * (num_experts / groups) {
            return Err(CoreError::Config(format!(
                "num_experts_per_tok {} exceeds the experts in topk_group {top_groups} groups",
                self.num_experts_per_tok
            )));
        }
        Ok(GroupLimit { groups, top_groups })
    }
}
