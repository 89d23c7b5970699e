//! LongCat-Flash's MoE, as transformers' `LongcatFlashConfig` and
//! `LongcatFlashMoE` read it: every decoder layer's `mlp` is MoE; the
//! router's softmax spans `n_routed_experts` real experts and
//! `zero_expert_num` zero (identity) experts, a selection-only bias picks
//! the top-k, and the chosen probabilities times `routed_scaling_factor`
//! weight them. A zero expert's output is its input.

use serde_json::{Map, Value};

use super::limits::{MAX_EXPERTS, MAX_INTERMEDIATE_SIZE, MAX_ROUTED_SCALING_FACTOR};
use super::{Family, FamilyFields, RawConfig, in_range, required};
use crate::{CoreError, CoreResult};

/// `LongcatFlashConfig.routed_scaling_factor` when unnamed.
const DEFAULT_ROUTED_SCALING_FACTOR: f32 = 6.0;

impl RawConfig {
    pub(super) fn longcat_fields(&self, num_experts: usize) -> CoreResult<FamilyFields> {
        let family = Family::LongcatFlash;
        let expert_intermediate_size = in_range(
            "expert_ffn_hidden_size",
            required(self.moe_intermediate_size, "expert_ffn_hidden_size", family)?,
            1,
            MAX_INTERMEDIATE_SIZE,
        )?;
        if let Some(kind) = self.zero_expert_type.as_deref()
            && kind != "identity"
        {
            return Err(CoreError::Config(format!(
                "zero_expert_type {kind:?} is not supported; longcat_flash's zero experts are \
                 identity experts"
            )));
        }
        let zero = self.zero_expert_num.unwrap_or(0);
        in_range(
            "n_routed_experts + zero_expert_num",
            num_experts + zero,
            1,
            MAX_EXPERTS,
        )?;
        let factor = self
            .routed_scaling_factor
            .unwrap_or(DEFAULT_ROUTED_SCALING_FACTOR);
        if !(factor > 0.0 && factor <= MAX_ROUTED_SCALING_FACTOR) {
            return Err(CoreError::Config(format!(
                "routed_scaling_factor is {factor}; it must be above 0 and at most \
                 {MAX_ROUTED_SCALING_FACTOR}"
            )));
        }
        Ok(FamilyFields {
            routed_scaling_factor: factor,
            ..FamilyFields::every_layer(expert_intermediate_size, self.num_hidden_layers)
        })
    }

    /// LongCat-Flash's zero experts, none elsewhere.
    pub(super) fn zero_experts(&self, family: Family) -> usize {
        match family {
            Family::LongcatFlash => self.zero_expert_num.unwrap_or(0),
            _ => 0,
        }
    }
}

/// LongCat-Flash counts `num_layers` decoder layers (each holding two
/// attention blocks, so its `num_hidden_layers` is twice that), names its
/// experts' size `expert_ffn_hidden_size` and its top-k `moe_topk`: moves
/// them to the names the other families use.
pub(super) fn rename_longcat_fields(config: &mut Map<String, Value>) -> CoreResult<()> {
    let layers = config
        .get("num_layers")
        .cloned()
        .ok_or_else(|| CoreError::Config("longcat_flash's config.json needs num_layers".into()))?;
    config.insert("num_hidden_layers".into(), layers);
    for (from, to) in [
        ("expert_ffn_hidden_size", "moe_intermediate_size"),
        ("moe_topk", "num_experts_per_tok"),
    ] {
        if let Some(value) = config.remove(from) {
            config.insert(to.into(), value);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::model::config::{Family, ModelConfig};

    fn longcat(fields: &str) -> Result<ModelConfig, String> {
        ModelConfig::from_json(&format!(
            r#"{{"model_type":"longcat_flash","hidden_size":8,"num_layers":3,
                "num_hidden_layers":6,"n_routed_experts":4,"moe_topk":2,
                "expert_ffn_hidden_size":4,"ffn_hidden_size":16{fields}}}"#
        ))
        .map_err(|error| error.to_string())
    }

    #[test]
    fn longcat_counts_decoder_layers_and_its_zero_experts() {
        let config = longcat(r#","zero_expert_num":2,"zero_expert_type":"identity""#).unwrap();
        assert_eq!(config.family, Family::LongcatFlash);
        assert_eq!(config.num_hidden_layers, 3);
        assert_eq!(config.moe_layers(), vec![0, 1, 2]);
        assert_eq!((config.num_experts, config.zero_experts), (4, 2));
        assert_eq!(config.gate_experts(), 6);
        assert_eq!((config.top_k, config.expert_intermediate_size), (2, 4));
        assert_eq!(config.routed_scaling_factor, 6.0);
        assert_eq!(longcat("").unwrap().zero_experts, 0);
        let error = longcat(r#","zero_expert_type":"constant""#).unwrap_err();
        assert!(error.contains("zero_expert_type \"constant\""), "{error}");
        let error = ModelConfig::from_json(r#"{"model_type":"longcat_flash","hidden_size":8}"#)
            .unwrap_err()
            .to_string();
        assert!(error.contains("num_layers"), "{error}");
    }
}
