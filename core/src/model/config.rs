//! Model families and the parts of their Hugging Face `config.json` that an
//! MoE layer depends on.

use std::path::Path;

use serde::Deserialize;

mod deepseek_v2;
mod every_layer_families;
mod family;
mod gpt_oss;
mod llama4;
mod longcat;
mod quantization;

pub use family::Family;
pub use gpt_oss::Activation;
pub use quantization::Quantization;
use quantization::RawQuantization;

use crate::{CoreError, CoreResult};

/// DeepSeek-V3's group-limited routing: experts are split into `groups`
/// equal groups and a token only picks experts from its best `top_groups`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupLimit {
    /// `n_group`.
    pub groups: usize,
    /// `topk_group`.
    pub top_groups: usize,
}

pub mod limits;

use limits::{
    MAX_EXPERTS, MAX_HIDDEN_SIZE, MAX_INTERMEDIATE_SIZE, MAX_LAYERS, MAX_ROUTED_SCALING_FACTOR,
};

/// Everything about a model's MoE layers that moemesh needs, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub family: Family,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    /// Routed experts per MoE layer.
    pub num_experts: usize,
    /// Experts chosen per token (`num_experts_per_tok`).
    pub top_k: usize,
    /// Intermediate size of one routed expert.
    pub expert_intermediate_size: usize,
    /// Intermediate size of the layer's shared expert, where the family has one.
    pub shared_intermediate_size: Option<usize>,
    /// Whether the top-k weights are divided by their sum.
    pub norm_topk_prob: bool,
    /// DeepSeek-V3's group limit.
    pub group_limit: Option<GroupLimit>,
    /// DeepSeek-V3's `routed_scaling_factor`; 1 elsewhere.
    pub routed_scaling_factor: f32,
    /// PhiMoE's `router_jitter_noise`: how close to the best logit the
    /// others must be to share sparsemixer's softmax; 0 elsewhere.
    pub router_jitter_noise: f32,
    /// How quantized weights are stored, if they are.
    pub quantization: Option<Quantization>,
    /// What the experts compute between their projections.
    pub expert_activation: Activation,
    /// Whether the experts' projections have biases (gpt-oss).
    pub expert_biases: bool,
    /// Whether a routing weight multiplies the expert's input rather than
    /// its output (Llama 4): the expert computes `f(w · x)`.
    pub weights_scale_input: bool,
    /// LongCat-Flash's zero (identity) experts: ids `num_experts ..
    /// num_experts + zero_experts` in a routing; their output is their
    /// input. Routers add them; expert nodes never see them.
    pub zero_experts: usize,
    /// What the checkpoint's tensor names start with before `model.`
    /// (`language_model.` in multimodal Llama 4 checkpoints).
    pub tensor_prefix: String,
    /// Which decoder layers have an MoE block (the others are dense MLPs).
    moe_layers: Vec<bool>,
}

/// `config.json` as written by transformers; fields of every family.
#[derive(Debug, Deserialize)]
struct RawConfig {
    model_type: String,
    hidden_size: usize,
    num_hidden_layers: usize,
    #[serde(default)]
    hidden_act: Option<String>,
    #[serde(default)]
    intermediate_size: Option<usize>,
    #[serde(default)]
    moe_intermediate_size: Option<usize>,
    #[serde(default)]
    shared_expert_intermediate_size: Option<usize>,
    #[serde(default, alias = "num_local_experts", alias = "n_routed_experts")]
    num_experts: Option<usize>,
    num_experts_per_tok: usize,
    #[serde(default)]
    norm_topk_prob: Option<bool>,
    #[serde(default)]
    decoder_sparse_step: Option<usize>,
    #[serde(default)]
    mlp_only_layers: Option<Vec<usize>>,
    #[serde(default)]
    first_k_dense_replace: Option<usize>,
    #[serde(default)]
    n_shared_experts: Option<usize>,
    #[serde(default)]
    n_group: Option<usize>,
    #[serde(default)]
    topk_group: Option<usize>,
    #[serde(default)]
    routed_scaling_factor: Option<f32>,
    #[serde(default)]
    topk_method: Option<String>,
    #[serde(default)]
    scoring_func: Option<String>,
    #[serde(default)]
    moe_layer_freq: Option<usize>,
    #[serde(default)]
    quantization_config: Option<RawQuantization>,
    #[serde(default)]
    router_jitter_noise: Option<f32>,
    #[serde(default)]
    shared_intermediate_size: Option<usize>,
    /// Llama 4's explicit list (Qwen's `mlp_only_layers` is the opposite).
    #[serde(default, rename = "moe_layers")]
    llama4_moe_layers: Option<Vec<usize>>,
    #[serde(default)]
    interleave_moe_layer_step: Option<usize>,
    #[serde(default)]
    zero_expert_num: Option<usize>,
    #[serde(default)]
    zero_expert_type: Option<String>,
    #[serde(default)]
    swiglu_alpha: Option<f32>,
    #[serde(default)]
    swiglu_limit: Option<f32>,
}

fn required<T>(value: Option<T>, field: &str, family: Family) -> CoreResult<T> {
    value.ok_or_else(|| CoreError::Config(format!("{family} config lacks field `{field}`")))
}

/// Returns `value` if it lies in `min..=max`, or an error naming `field`.
fn in_range(field: &str, value: usize, min: usize, max: usize) -> CoreResult<usize> {
    if (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(CoreError::Config(format!(
            "{field} is {value}; it must be between {min} and {max}"
        )))
    }
}

/// The spelling of the routed-experts field in `family`'s `config.json`.
fn experts_field(family: Family) -> &'static str {
    match family {
        Family::Mixtral
        | Family::Phimoe
        | Family::GraniteMoe
        | Family::GraniteMoeShared
        | Family::GptOss
        | Family::Llama4Text => "num_local_experts",
        Family::Dbrx => "ffn_config.moe_num_experts",
        Family::Qwen2Moe | Family::Qwen3Moe | Family::Olmoe => "num_experts",
        Family::DeepseekV2 | Family::DeepseekV3 | Family::Glm4Moe | Family::LongcatFlash => {
            "n_routed_experts"
        }
    }
}

/// What [`RawConfig::deepseek_experts`] reads.
struct DeepseekExperts {
    expert_intermediate_size: usize,
    shared_intermediate_size: Option<usize>,
    moe_layers: Vec<bool>,
}

/// The parts of a [`ModelConfig`] that each family spells differently in
/// its `config.json`.
struct FamilyFields {
    expert_intermediate_size: usize,
    shared_intermediate_size: Option<usize>,
    norm_topk_prob: bool,
    moe_layers: Vec<bool>,
    group_limit: Option<GroupLimit>,
    routed_scaling_factor: f32,
    router_jitter_noise: f32,
}

impl FamilyFields {
    /// Every one of `layers` layers MoE with routed experts of
    /// `expert_intermediate_size`, and nothing else: no shared expert, no
    /// renormalisation, no group limit or scaling.
    fn every_layer(expert_intermediate_size: usize, layers: usize) -> Self {
        Self {
            expert_intermediate_size,
            shared_intermediate_size: None,
            norm_topk_prob: false,
            moe_layers: vec![true; layers],
            group_limit: None,
            routed_scaling_factor: 1.0,
            router_jitter_noise: 0.0,
        }
    }
}

impl RawConfig {
    /// Checks the fields every family reads, before anything is sized from
    /// them, and returns the number of routed experts.
    fn validate_common(&self, family: Family) -> CoreResult<usize> {
        if let Some(act) = &self.hidden_act
            && act != "silu"
        {
            return Err(CoreError::Config(format!(
                "hidden_act {act:?} is not supported; moemesh experts use silu"
            )));
        }
        in_range("hidden_size", self.hidden_size, 1, MAX_HIDDEN_SIZE)?;
        in_range("num_hidden_layers", self.num_hidden_layers, 1, MAX_LAYERS)?;
        let experts_field = experts_field(family);
        let num_experts = in_range(
            experts_field,
            required(self.num_experts, experts_field, family)?,
            1,
            MAX_EXPERTS,
        )?;
        if !(1..=num_experts).contains(&self.num_experts_per_tok) {
            return Err(CoreError::Config(format!(
                "num_experts_per_tok is {}; it must be between 1 and {experts_field} {num_experts}",
                self.num_experts_per_tok
            )));
        }
        Ok(num_experts)
    }

    /// Mixtral and OLMoE: every layer is MoE, experts of
    /// `intermediate_size`. Mixtral always renormalises the top-k weights;
    /// OLMoE only with `norm_topk_prob`, false unless set (as
    /// `OlmoeConfig`).
    fn every_layer_moe_fields(&self, family: Family) -> CoreResult<FamilyFields> {
        let expert_intermediate_size = in_range(
            "intermediate_size",
            required(self.intermediate_size, "intermediate_size", family)?,
            1,
            MAX_INTERMEDIATE_SIZE,
        )?;
        let norm_topk_prob = match family {
            Family::Olmoe => self.norm_topk_prob.unwrap_or(false),
            _ => true,
        };
        Ok(FamilyFields {
            expert_intermediate_size,
            shared_intermediate_size: None,
            norm_topk_prob,
            moe_layers: vec![true; self.num_hidden_layers],
            group_limit: None,
            routed_scaling_factor: 1.0,
            router_jitter_noise: 0.0,
        })
    }

    /// Qwen2-MoE and Qwen3-MoE: MoE every `decoder_sparse_step` layers but
    /// for `mlp_only_layers`; Qwen2-MoE adds a shared expert.
    fn qwen_fields(&self, family: Family) -> CoreResult<FamilyFields> {
        let expert_intermediate_size = in_range(
            "moe_intermediate_size",
            required(self.moe_intermediate_size, "moe_intermediate_size", family)?,
            1,
            MAX_INTERMEDIATE_SIZE,
        )?;
        let shared_intermediate_size = if family == Family::Qwen2Moe {
            Some(in_range(
                "shared_expert_intermediate_size",
                required(
                    self.shared_expert_intermediate_size,
                    "shared_expert_intermediate_size",
                    family,
                )?,
                1,
                MAX_INTERMEDIATE_SIZE,
            )?)
        } else {
            None
        };
        let layers = self.num_hidden_layers;
        let step = in_range(
            "decoder_sparse_step",
            self.decoder_sparse_step.unwrap_or(1),
            1,
            layers,
        )?;
        let mut moe_layers: Vec<bool> = (0..layers).map(|layer| (layer + 1) % step == 0).collect();
        for &layer in self.mlp_only_layers.as_deref().unwrap_or_default() {
            let Some(is_moe) = moe_layers.get_mut(layer) else {
                return Err(CoreError::Config(format!(
                    "mlp_only_layers names layer {layer}, but num_hidden_layers is {layers}"
                )));
            };
            *is_moe = false;
        }
        Ok(FamilyFields {
            expert_intermediate_size,
            shared_intermediate_size,
            norm_topk_prob: self.norm_topk_prob.unwrap_or(false),
            moe_layers,
            group_limit: None,
            routed_scaling_factor: 1.0,
            router_jitter_noise: 0.0,
        })
    }

    /// DeepSeek-V3: dense layers first, then MoE with `n_shared_experts`
    /// shared experts, sigmoid scoring and group-limited top-k (`noaux_tc`).
    fn deepseek_v3_fields(&self, family: Family, num_experts: usize) -> CoreResult<FamilyFields> {
        // Glm4MoeConfig has one shared expert unless it says otherwise.
        let shared_default = usize::from(family == Family::Glm4Moe);
        let DeepseekExperts {
            expert_intermediate_size,
            shared_intermediate_size,
            moe_layers,
        } = self.deepseek_experts(family, shared_default)?;
        if let Some(method) = &self.topk_method
            && method != "noaux_tc"
        {
            return Err(CoreError::Config(format!(
                "topk_method {method:?} is not supported; {family} uses noaux_tc"
            )));
        }
        if let Some(scoring) = &self.scoring_func
            && scoring != "sigmoid"
        {
            return Err(CoreError::Config(format!(
                "scoring_func {scoring:?} is not supported; {family} uses sigmoid"
            )));
        }
        Ok(FamilyFields {
            expert_intermediate_size,
            shared_intermediate_size,
            norm_topk_prob: self.norm_topk_prob.unwrap_or(true),
            moe_layers,
            group_limit: Some(self.deepseek_v3_group_limit(family, num_experts)?),
            routed_scaling_factor: self.deepseek_v3_routed_scaling_factor()?,
            router_jitter_noise: 0.0,
        })
    }

    /// The experts of the DeepSeek families: routed experts of
    /// `moe_intermediate_size`, `n_shared_experts` (`shared_default` when
    /// unnamed) run as one shared expert of their summed width, and MoE
    /// layers from `first_k_dense_replace` on.
    fn deepseek_experts(
        &self,
        family: Family,
        shared_default: usize,
    ) -> CoreResult<DeepseekExperts> {
        let expert_intermediate_size = in_range(
            "moe_intermediate_size",
            required(self.moe_intermediate_size, "moe_intermediate_size", family)?,
            1,
            MAX_INTERMEDIATE_SIZE,
        )?;
        let shared = self.n_shared_experts.unwrap_or(shared_default);
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
        Ok(DeepseekExperts {
            expert_intermediate_size,
            shared_intermediate_size: (shared > 0).then_some(shared_intermediate_size),
            moe_layers: (0..self.num_hidden_layers)
                .map(|layer| layer >= first_moe)
                .collect(),
        })
    }

    /// DeepSeek-V3's `routed_scaling_factor`: positive, finite and plausible,
    /// since it multiplies every routed expert's weight.
    fn deepseek_v3_routed_scaling_factor(&self) -> CoreResult<f32> {
        let factor = self.routed_scaling_factor.unwrap_or(1.0);
        if factor > 0.0 && factor <= MAX_ROUTED_SCALING_FACTOR {
            Ok(factor)
        } else {
            Err(CoreError::Config(format!(
                "routed_scaling_factor is {factor}; it must be above 0 and at most \
                 {MAX_ROUTED_SCALING_FACTOR}"
            )))
        }
    }

    /// DeepSeek-V3's `n_group` and `topk_group` (one group of all experts
    /// when unnamed), checked as [`RawConfig::group_limit`] checks them.
    fn deepseek_v3_group_limit(
        &self,
        family: Family,
        num_experts: usize,
    ) -> CoreResult<GroupLimit> {
        let groups = self.n_group.unwrap_or(1);
        let top_groups = self.topk_group.unwrap_or(groups);
        self.group_limit(family, groups, top_groups, num_experts, 2)
    }

    /// `groups` equal groups of the experts of which the best `top_groups`
    /// compete: the groups divide the experts, each holds the `scored_by`
    /// best experts its score is taken from, and the kept groups hold
    /// `num_experts_per_tok` at least.
    fn group_limit(
        &self,
        family: Family,
        groups: usize,
        top_groups: usize,
        num_experts: usize,
        scored_by: usize,
    ) -> CoreResult<GroupLimit> {
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
        if num_experts / groups < scored_by {
            return Err(CoreError::Config(format!(
                "n_group {groups} leaves {} of n_routed_experts {num_experts} per group; \
                 {family} scores a group by its best {scored_by} experts, so each needs that many",
                num_experts / groups
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

impl ModelConfig {
    /// Reads and validates `DIR/config.json`.
    pub fn from_dir(dir: &Path) -> CoreResult<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| CoreError::Io {
            path: path.clone(),
            source,
        })?;
        Self::from_json(&text).map_err(|error| {
            // Name the file once, in front of the reason.
            let reason = match error {
                CoreError::Config(reason) => reason,
                other => other.to_string(),
            };
            CoreError::Config(format!("{}: {reason}", path.display()))
        })
    }

    /// Parses and validates the text of a `config.json`.
    pub fn from_json(text: &str) -> CoreResult<Self> {
        let to_config_error = |error: serde_json::Error| CoreError::Config(error.to_string());
        let mut value: serde_json::Value = serde_json::from_str(text).map_err(to_config_error)?;
        let mut tensor_prefix = "";
        if let Some(object) = value.as_object_mut() {
            match object.get("model_type").and_then(|kind| kind.as_str()) {
                Some("dbrx") => every_layer_families::flatten_dbrx(object)?,
                Some("longcat_flash") => longcat::rename_longcat_fields(object)?,
                Some("llama4") => {
                    llama4::lift_text_config(object)?;
                    tensor_prefix = llama4::MULTIMODAL_PREFIX;
                }
                _ => {}
            }
        }
        let mut config = Self::from_raw(serde_json::from_value(value).map_err(to_config_error)?)?;
        config.tensor_prefix = tensor_prefix.into();
        Ok(config)
    }

    fn from_raw(raw: RawConfig) -> CoreResult<Self> {
        let family = Family::from_model_type(&raw.model_type)?;
        let num_experts = raw.validate_common(family)?;
        let fields = match family {
            Family::Mixtral | Family::Olmoe => raw.every_layer_moe_fields(family)?,
            Family::Qwen2Moe | Family::Qwen3Moe => raw.qwen_fields(family)?,
            Family::DeepseekV3 | Family::Glm4Moe => raw.deepseek_v3_fields(family, num_experts)?,
            Family::DeepseekV2 => raw.deepseek_v2_fields(num_experts)?,
            Family::Phimoe | Family::GraniteMoe | Family::GraniteMoeShared | Family::Dbrx => {
                raw.every_layer_family_fields(family)?
            }
            Family::GptOss => raw.gpt_oss_fields()?,
            Family::Llama4Text => raw.llama4_fields()?,
            Family::LongcatFlash => raw.longcat_fields(num_experts)?,
        };
        let (expert_activation, expert_biases) = raw.expert_activation(family)?;
        if !fields.moe_layers.contains(&true) {
            return Err(CoreError::Config(format!(
                "none of the {} layers has an MoE block; moemesh serves MoE layers only",
                raw.num_hidden_layers
            )));
        }
        Ok(Self {
            family,
            hidden_size: raw.hidden_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_experts,
            top_k: raw.num_experts_per_tok,
            expert_intermediate_size: fields.expert_intermediate_size,
            shared_intermediate_size: fields.shared_intermediate_size,
            norm_topk_prob: fields.norm_topk_prob,
            group_limit: fields.group_limit,
            routed_scaling_factor: fields.routed_scaling_factor,
            router_jitter_noise: fields.router_jitter_noise,
            quantization: raw
                .quantization_config
                .as_ref()
                .map(RawQuantization::validate)
                .transpose()?,
            expert_activation,
            expert_biases,
            weights_scale_input: family == Family::Llama4Text,
            zero_experts: raw.zero_experts(family),
            tensor_prefix: String::new(),
            moe_layers: fields.moe_layers,
        })
    }

    /// Returns whether decoder layer `layer` has an MoE block.
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        self.moe_layers.get(layer).copied().unwrap_or(false)
    }

    /// Returns the decoder layers that have an MoE block, ascending.
    pub fn moe_layers(&self) -> Vec<usize> {
        (0..self.num_hidden_layers)
            .filter(|&layer| self.is_moe_layer(layer))
            .collect()
    }

    /// Returns whether the layers have a shared expert.
    pub fn has_shared_expert(&self) -> bool {
        self.shared_intermediate_size.is_some()
    }

    /// Returns the id under which the shared expert is addressed: the index
    /// after the routed experts.
    pub fn shared_expert_id(&self) -> Option<u32> {
        self.has_shared_expert().then_some(self.num_experts as u32)
    }

    /// The experts the router's softmax spans: the routed ones and
    /// LongCat-Flash's zero experts.
    pub fn gate_experts(&self) -> usize {
        self.num_experts + self.zero_experts
    }

    /// Returns the number of addressable experts per layer, shared included.
    pub fn experts_per_layer(&self) -> usize {
        self.num_experts + usize::from(self.has_shared_expert())
    }

    /// Returns the intermediate size of expert `expert` (routed or shared).
    pub fn intermediate_size_of(&self, expert: u32) -> usize {
        if Some(expert) == self.shared_expert_id() {
            self.shared_intermediate_size.unwrap_or_default()
        } else {
            self.expert_intermediate_size
        }
    }

    /// The weights of expert `expert`'s three projections (gate, up, down).
    pub fn expert_weight_count(&self, expert: u32) -> usize {
        3 * self.hidden_size * self.intermediate_size_of(expert)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qwen2_moe_layers_follow_sparse_step_and_mlp_only_layers() {
        let config = ModelConfig::from_json(
            r#"{"model_type":"qwen2_moe","hidden_size":8,"num_hidden_layers":6,
                "moe_intermediate_size":4,"shared_expert_intermediate_size":8,
                "num_experts":4,"num_experts_per_tok":2,"decoder_sparse_step":2,
                "mlp_only_layers":[3]}"#,
        )
        .unwrap();
        assert_eq!(config.moe_layers(), vec![1, 5]);
        assert_eq!(config.shared_expert_id(), Some(4));
        assert_eq!(config.intermediate_size_of(4), 8);
        assert!(!config.norm_topk_prob);
    }

    #[test]
    fn olmoe_layers_are_all_moe_and_renormalise_only_when_asked() {
        let json = |norm: &str| {
            format!(
                r#"{{"model_type":"olmoe","hidden_size":8,"num_hidden_layers":3,
                    "intermediate_size":4,"num_experts":4,"num_experts_per_tok":2{norm}}}"#
            )
        };
        let config = ModelConfig::from_json(&json("")).unwrap();
        assert_eq!(config.family, Family::Olmoe);
        assert_eq!(config.moe_layers(), vec![0, 1, 2]);
        assert_eq!(
            (config.num_experts, config.expert_intermediate_size),
            (4, 4)
        );
        assert!(!config.norm_topk_prob && !config.has_shared_expert());
        let config = ModelConfig::from_json(&json(r#","norm_topk_prob":true"#)).unwrap();
        assert!(config.norm_topk_prob);
        let error = ModelConfig::from_json(&json("").replace(r#""intermediate_size":4,"#, ""))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("olmoe config lacks field `intermediate_size`"),
            "{error}"
        );
    }

    #[test]
    fn glm4_moe_reads_deepseek_v3_fields_with_one_shared_expert_by_default() {
        let config = ModelConfig::from_json(
            r#"{"model_type":"glm4_moe","hidden_size":8,"num_hidden_layers":3,
                "moe_intermediate_size":4,"n_routed_experts":8,"num_experts_per_tok":2,
                "first_k_dense_replace":1,"n_group":1,"topk_group":1,"routed_scaling_factor":2.5}"#,
        )
        .unwrap();
        assert_eq!(config.family, Family::Glm4Moe);
        assert_eq!(config.moe_layers(), vec![1, 2]);
        assert_eq!(config.shared_expert_id(), Some(8));
        assert_eq!(config.intermediate_size_of(8), 4);
        assert!(config.norm_topk_prob);
        assert_eq!(config.routed_scaling_factor, 2.5);
        let error = ModelConfig::from_json(
            r#"{"model_type":"glm4_moe","hidden_size":8,"num_hidden_layers":1,
                "moe_intermediate_size":4,"n_routed_experts":8,"num_experts_per_tok":2,
                "scoring_func":"softmax"}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("glm4_moe uses sigmoid"), "{error}");
    }

    #[test]
    fn deepseek_v2_takes_greedy_or_group_limited_top_k_and_refuses_what_is_ambiguous() {
        let json = |extra: &str| {
            format!(
                r#"{{"model_type":"deepseek_v2","hidden_size":8,"num_hidden_layers":3,
                    "moe_intermediate_size":4,"n_routed_experts":8,"num_experts_per_tok":2,
                    "first_k_dense_replace":1{extra}}}"#
            )
        };
        let greedy = ModelConfig::from_json(&json("")).unwrap();
        assert_eq!(greedy.family, Family::DeepseekV2);
        assert_eq!(greedy.moe_layers(), vec![1, 2]);
        assert_eq!(greedy.group_limit, None);
        assert!(!greedy.norm_topk_prob);
        // DeepseekV2Config's two shared experts when none are named.
        assert_eq!(greedy.intermediate_size_of(8), 8);
        let limited = ModelConfig::from_json(&json(
            r#","topk_method":"group_limited_greedy","n_group":4,"topk_group":2,"routed_scaling_factor":16.0"#,
        ))
        .unwrap();
        assert_eq!(
            limited.group_limit,
            Some(GroupLimit {
                groups: 4,
                top_groups: 2
            })
        );
        assert_eq!(limited.routed_scaling_factor, 16.0);
        for (extra, needle) in [
            (r#","norm_topk_prob":true"#, "norm_topk_prob true"),
            (r#","moe_layer_freq":2"#, "moe_layer_freq 2"),
            (
                r#","topk_method":"noaux_tc""#,
                "greedy or group_limited_greedy",
            ),
            (r#","scoring_func":"sigmoid""#, "deepseek_v2 uses softmax"),
            (
                r#","topk_method":"group_limited_greedy""#,
                "lacks field `n_group`",
            ),
            (
                r#","topk_method":"group_limited_greedy","n_group":4,"topk_group":1,"num_experts_per_tok":3"#,
                "exceeds the experts",
            ),
        ] {
            let text = json(extra).replace(r#""num_experts_per_tok":2,"#, "");
            let text = if text.contains("num_experts_per_tok") {
                text
            } else {
                text.replace(
                    r#""n_routed_experts":8,"#,
                    r#""n_routed_experts":8,"num_experts_per_tok":2,"#,
                )
            };
            let error = ModelConfig::from_json(&text).unwrap_err().to_string();
            assert!(error.contains(needle), "{extra}: {error}");
        }
    }

    #[test]
    fn deepseek_dense_layers_come_first_and_groups_are_checked() {
        let json = r#"{"model_type":"deepseek_v3","hidden_size":8,"num_hidden_layers":3,
            "moe_intermediate_size":4,"n_routed_experts":8,"n_shared_experts":2,
            "num_experts_per_tok":2,"first_k_dense_replace":1,"n_group":4,"topk_group":2,
            "routed_scaling_factor":2.5}"#;
        let config = ModelConfig::from_json(json).unwrap();
        assert_eq!(config.moe_layers(), vec![1, 2]);
        assert_eq!(config.shared_intermediate_size, Some(8));
        assert_eq!(
            config.group_limit,
            Some(GroupLimit {
                groups: 4,
                top_groups: 2
            })
        );
        let bad = json.replace(r#""n_group":4"#, r#""n_group":3"#);
        let error = ModelConfig::from_json(&bad).unwrap_err().to_string();
        assert!(error.contains("n_group 3 must divide"), "{error}");
    }

    const MIXTRAL: &str = r#"{"model_type":"mixtral","hidden_size":8,"num_hidden_layers":2,
        "intermediate_size":4,"num_local_experts":4,"num_experts_per_tok":2}"#;
    const QWEN2: &str = r#"{"model_type":"qwen2_moe","hidden_size":8,"num_hidden_layers":3,
        "moe_intermediate_size":4,"shared_expert_intermediate_size":8,"num_experts":4,
        "num_experts_per_tok":2,"decoder_sparse_step":1,"mlp_only_layers":[0]}"#;
    const DEEPSEEK: &str = r#"{"model_type":"deepseek_v3","hidden_size":8,"num_hidden_layers":3,
        "moe_intermediate_size":4,"n_routed_experts":8,"n_shared_experts":2,
        "num_experts_per_tok":2,"first_k_dense_replace":1,"n_group":4,"topk_group":2,
        "routed_scaling_factor":2.5}"#;

    /// `base` with `"field":value` set to `replacement` (a JSON value).
    fn with(base: &str, field: &str, replacement: &str) -> String {
        let key = format!("\"{field}\":");
        let start = base
            .find(&key)
            .unwrap_or_else(|| panic!("{field} in {base}"))
            + key.len();
        let end = start
            + base[start..]
                .find([',', '}'])
                .expect("a value ends with , or }");
        format!("{}{replacement}{}", &base[..start], &base[end..])
    }

    /// Asserts that `json` is refused with a message containing every needle.
    fn refused(json: &str, needles: &[&str]) {
        let error = ModelConfig::from_json(json).unwrap_err().to_string();
        for needle in needles {
            assert!(
                error.contains(needle),
                "{error:?} should mention {needle:?}"
            );
        }
    }

    #[test]
    fn the_base_configs_of_these_tests_are_valid() {
        for json in [MIXTRAL, QWEN2, DEEPSEEK] {
            ModelConfig::from_json(json).unwrap();
        }
    }

    #[test]
    fn sizes_must_be_positive_and_plausible() {
        let cases = [
            (MIXTRAL, "hidden_size", "0"),
            (MIXTRAL, "hidden_size", "65537"),
            (MIXTRAL, "num_hidden_layers", "0"),
            (MIXTRAL, "num_hidden_layers", "1000000000000"),
            (MIXTRAL, "intermediate_size", "0"),
            (MIXTRAL, "intermediate_size", "262145"),
            (MIXTRAL, "num_local_experts", "0"),
            (MIXTRAL, "num_local_experts", "16385"),
            (QWEN2, "moe_intermediate_size", "0"),
            (QWEN2, "shared_expert_intermediate_size", "0"),
            (
                QWEN2,
                "shared_expert_intermediate_size",
                "18446744073709551615",
            ),
            (QWEN2, "num_experts", "0"),
            (DEEPSEEK, "moe_intermediate_size", "0"),
            (DEEPSEEK, "n_routed_experts", "0"),
        ];
        for (base, field, value) in cases {
            refused(
                &with(base, field, value),
                &[&format!("{field} is {value}"), "must be between"],
            );
        }
    }

    #[test]
    fn a_zero_shared_expert_size_is_refused_at_load_not_at_compute() {
        refused(
            &with(QWEN2, "shared_expert_intermediate_size", "0"),
            &["shared_expert_intermediate_size is 0; it must be between 1 and 262144"],
        );
    }

    #[test]
    fn top_k_lies_between_one_and_the_experts() {
        refused(
            &with(MIXTRAL, "num_experts_per_tok", "0"),
            &["num_experts_per_tok is 0", "num_local_experts 4"],
        );
        refused(
            &with(QWEN2, "num_experts_per_tok", "5"),
            &["num_experts_per_tok is 5", "between 1 and num_experts 4"],
        );
        refused(
            &with(DEEPSEEK, "num_experts_per_tok", "9"),
            &["num_experts_per_tok is 9", "n_routed_experts 8"],
        );
    }

    #[test]
    fn qwen_layer_fields_name_existing_layers() {
        refused(
            &with(QWEN2, "decoder_sparse_step", "0"),
            &["decoder_sparse_step is 0; it must be between 1 and 3"],
        );
        refused(
            &with(QWEN2, "decoder_sparse_step", "4"),
            &["decoder_sparse_step is 4"],
        );
        refused(
            &with(QWEN2, "mlp_only_layers", "[0,3]"),
            &["mlp_only_layers names layer 3, but num_hidden_layers is 3"],
        );
        refused(
            &with(QWEN2, "mlp_only_layers", "[0,1,2]"),
            &["none of the 3 layers has an MoE block"],
        );
    }

    #[test]
    fn deepseek_groups_divide_the_experts() {
        refused(
            &with(DEEPSEEK, "n_group", "0"),
            &["n_group 0 must divide n_routed_experts 8"],
        );
        refused(
            &with(DEEPSEEK, "n_group", "3"),
            &["n_group 3 must divide n_routed_experts 8"],
        );
        refused(
            &with(DEEPSEEK, "n_group", "8"),
            &["n_group 8 leaves 1 of n_routed_experts 8 per group"],
        );
        refused(
            &with(DEEPSEEK, "topk_group", "0"),
            &["topk_group 0 must be between 1 and n_group 4"],
        );
        refused(
            &with(DEEPSEEK, "topk_group", "5"),
            &["topk_group 5 must be between 1 and n_group 4"],
        );
        let few_groups = with(
            with(DEEPSEEK, "topk_group", "1").as_str(),
            "num_experts_per_tok",
            "3",
        );
        refused(
            &few_groups,
            &["num_experts_per_tok 3 exceeds the experts in topk_group 1 groups"],
        );
    }

    #[test]
    fn deepseek_dense_layers_shared_experts_and_scaling_are_bounded() {
        refused(
            &with(DEEPSEEK, "first_k_dense_replace", "3"),
            &["first_k_dense_replace is 3; it must be below num_hidden_layers 3"],
        );
        refused(
            &with(DEEPSEEK, "n_shared_experts", "18446744073709551615"),
            &["n_shared_experts 18446744073709551615 × moe_intermediate_size 4 exceeds"],
        );
        refused(
            &with(DEEPSEEK, "n_shared_experts", "65537"),
            &["n_shared_experts 65537 × moe_intermediate_size 4 exceeds"],
        );
        for factor in ["0", "-1.5", "1e39", "1001"] {
            refused(
                &with(DEEPSEEK, "routed_scaling_factor", factor),
                &[
                    "routed_scaling_factor is",
                    "it must be above 0 and at most 1000",
                ],
            );
        }
    }

    #[test]
    fn fields_of_the_wrong_type_are_refused_not_wrapped() {
        for value in ["-1", "1.5", "\"8\"", "null"] {
            assert!(ModelConfig::from_json(&with(MIXTRAL, "hidden_size", value)).is_err());
        }
    }

    #[test]
    fn unknown_family_and_activation_are_named() {
        let error = ModelConfig::from_json(
            r#"{"model_type":"llama","hidden_size":8,"num_hidden_layers":1,"num_experts_per_tok":1}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("\"llama\""), "{error}");
        let error = ModelConfig::from_json(
            r#"{"model_type":"mixtral","hidden_size":8,"num_hidden_layers":1,"intermediate_size":4,
                "num_local_experts":4,"num_experts_per_tok":2,"hidden_act":"gelu"}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("gelu"), "{error}");
    }
}
