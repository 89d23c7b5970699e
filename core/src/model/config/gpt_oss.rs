//! What an expert computes between its projections, and gpt-oss's config,
//! as transformers' `GptOssConfig` and `GptOssExperts` read it.

use super::limits::MAX_INTERMEDIATE_SIZE;
use super::{Family, FamilyFields, Quantization, RawConfig, in_range, required};
use crate::{CoreError, CoreResult};

/// The activation between an expert's gate/up and down projections.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Activation {
    /// `silu(gate) · up`: every family but gpt-oss.
    #[default]
    SiluGlu,
    /// gpt-oss: `gate` clamped above at `limit`, `up` to `±limit`, then
    /// `(up + 1) · gate · σ(alpha · gate)`.
    ClampedSwiglu { alpha: f32, limit: f32 },
}

/// `GptOssConfig.swiglu_alpha` (absent from the published config.json).
const DEFAULT_SWIGLU_ALPHA: f32 = 1.702;
/// `GptOssConfig.swiglu_limit`.
const DEFAULT_SWIGLU_LIMIT: f32 = 7.0;

impl RawConfig {
    /// gpt-oss: every layer MoE, experts of `intermediate_size` with
    /// biases and the clamped SwiGLU; the router's softmax over its top-k
    /// (biased) logits sums to one by itself.
    pub(super) fn gpt_oss_fields(&self) -> CoreResult<FamilyFields> {
        let expert_intermediate_size = in_range(
            "intermediate_size",
            required(self.intermediate_size, "intermediate_size", Family::GptOss)?,
            1,
            MAX_INTERMEDIATE_SIZE,
        )?;
        // MXFP4 packs 32 values per scale along each projection's input.
        let mxfp4 = self
            .quantization_config
            .as_ref()
            .is_some_and(|quantization| quantization.validate().ok() == Some(Quantization::Mxfp4));
        if mxfp4
            && (!self.hidden_size.is_multiple_of(32)
                || !expert_intermediate_size.is_multiple_of(32))
        {
            return Err(CoreError::Config(format!(
                "hidden_size {} and intermediate_size {expert_intermediate_size} must be \
                 multiples of 32 for MXFP4 experts",
                self.hidden_size
            )));
        }
        Ok(FamilyFields::every_layer(
            expert_intermediate_size,
            self.num_hidden_layers,
        ))
    }

    /// The experts' activation and whether they have biases.
    pub(super) fn expert_activation(&self, family: Family) -> CoreResult<(Activation, bool)> {
        if family != Family::GptOss {
            return Ok((Activation::SiluGlu, false));
        }
        let alpha = self.swiglu_alpha.unwrap_or(DEFAULT_SWIGLU_ALPHA);
        let limit = self.swiglu_limit.unwrap_or(DEFAULT_SWIGLU_LIMIT);
        for (field, value) in [("swiglu_alpha", alpha), ("swiglu_limit", limit)] {
            if !(value.is_finite() && value > 0.0) {
                return Err(CoreError::Config(format!(
                    "{field} is {value}; it must be finite and positive"
                )));
            }
        }
        Ok((Activation::ClampedSwiglu { alpha, limit }, true))
    }
}

#[cfg(test)]
mod tests {
    use super::Activation;
    use crate::model::config::{Family, ModelConfig, Quantization};

    fn gpt_oss(fields: &str) -> Result<ModelConfig, String> {
        ModelConfig::from_json(&format!(
            r#"{{"model_type":"gpt_oss","hidden_size":64,"num_hidden_layers":2,
                "intermediate_size":32,"num_local_experts":4,"num_experts_per_tok":2{fields}}}"#
        ))
        .map_err(|error| error.to_string())
    }

    #[test]
    fn gpt_oss_reads_its_swiglu_and_refuses_what_mxfp4_cannot_pack() {
        let config = gpt_oss(r#","quantization_config":{"quant_method":"mxfp4"}"#).unwrap();
        assert_eq!(config.family, Family::GptOss);
        assert_eq!(
            config.expert_activation,
            Activation::ClampedSwiglu {
                alpha: 1.702,
                limit: 7.0
            }
        );
        assert!(config.expert_biases);
        assert_eq!(config.quantization, Some(Quantization::Mxfp4));
        assert_eq!(config.moe_layers(), vec![0, 1]);
        let custom = gpt_oss(r#","swiglu_limit":5.0,"swiglu_alpha":2.0"#).unwrap();
        assert_eq!(
            custom.expert_activation,
            Activation::ClampedSwiglu {
                alpha: 2.0,
                limit: 5.0
            }
        );
        let error = gpt_oss(r#","swiglu_limit":0"#).unwrap_err();
        assert!(error.contains("swiglu_limit is 0"), "{error}");
        let error = ModelConfig::from_json(
            r#"{"model_type":"gpt_oss","hidden_size":48,"num_hidden_layers":1,
                "intermediate_size":32,"num_local_experts":4,"num_experts_per_tok":2,
                "quantization_config":{"quant_method":"mxfp4"}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("multiples of 32"), "{error}");
    }
}
