//! DeepSeek-V2's config fields, as transformers' `DeepseekV2TopkRouter` and
//! `DeepseekV2Moe` read them.

use super::{DeepseekExperts, Family, FamilyFields, GroupLimit, RawConfig, required};
use crate::{CoreError, CoreResult};

/// `DeepseekV2Config`'s shared experts when `config.json` names none.
const DEFAULT_SHARED_EXPERTS: usize = 2;

impl RawConfig {
    /// DeepSeek-V2: softmax scores, `greedy` or `group_limited_greedy` top-k
    /// (groups ranked by their best expert), the chosen probabilities times
    /// `routed_scaling_factor` without renormalisation, shared experts of
    /// `n_shared_experts × moe_intermediate_size`, dense layers first.
    pub(super) fn deepseek_v2_fields(&self, num_experts: usize) -> CoreResult<FamilyFields> {
        let DeepseekExperts {
            expert_intermediate_size,
            shared_intermediate_size,
            moe_layers,
        } = self.deepseek_experts(Family::DeepseekV2, DEFAULT_SHARED_EXPERTS)?;
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
            shared_intermediate_size,
            norm_topk_prob: false,
            moe_layers,
            group_limit,
            routed_scaling_factor: self.deepseek_v3_routed_scaling_factor()?,
            router_jitter_noise: 0.0,
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

    /// `group_limited_greedy`'s `n_group` and `topk_group`, both required;
    /// a group is scored by its best expert.
    fn deepseek_v2_group_limit(&self, num_experts: usize) -> CoreResult<GroupLimit> {
        let family = Family::DeepseekV2;
        let groups = required(self.n_group, "n_group", family)?;
        let top_groups = required(self.topk_group, "topk_group", family)?;
        self.group_limit(family, groups, top_groups, num_experts, 1)
    }
}
