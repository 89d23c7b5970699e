//! `quantization_config`: the quantized formats moemesh dequantizes on load
//! (see [`crate::model::quantized`]), and a clear refusal of the others.

use serde::Deserialize;

use crate::{CoreError, CoreResult};

/// How a checkpoint's quantized weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantization {
    /// FP8 e4m3 `.weight` with one scale per `block` (rows, columns) tile in
    /// `.weight_scale_inv`, as DeepSeek-V3/R1, Kimi K2 and Qwen3-FP8 ship.
    Fp8Blocks { block: [usize; 2] },
    /// MXFP4 `_blocks` and `_scales`, as gpt-oss ships its experts.
    Mxfp4,
}

/// The block of DeepSeek-V3's and Qwen3-FP8's published checkpoints,
/// and transformers' `FineGrainedFP8Config` default.
const DEFAULT_FP8_BLOCK: [usize; 2] = [128, 128];

/// `quantization_config` as transformers writes it.
#[derive(Debug, Deserialize)]
pub(super) struct RawQuantization {
    quant_method: String,
    #[serde(default)]
    fmt: Option<String>,
    #[serde(default)]
    weight_block_size: Option<Vec<usize>>,
    #[serde(default)]
    activation_scheme: Option<String>,
}

impl RawQuantization {
    pub(super) fn validate(&self) -> CoreResult<Quantization> {
        match self.quant_method.as_str() {
            "fp8" => self.fp8(),
            "mxfp4" => Ok(Quantization::Mxfp4),
            other => Err(CoreError::Config(format!(
                "quantization_config.quant_method {other:?} is not supported; moemesh \
                 dequantizes fp8 (e4m3, block scales) and mxfp4 checkpoints on load"
            ))),
        }
    }

    fn fp8(&self) -> CoreResult<Quantization> {
        if let Some(fmt) = self.fmt.as_deref()
            && fmt != "e4m3"
        {
            return Err(CoreError::Config(format!(
                "quantization_config.fmt {fmt:?} is not supported; moemesh reads e4m3 FP8"
            )));
        }
        // Static activation scales would change what the reference computes
        // beyond its weights.
        if let Some(scheme) = self.activation_scheme.as_deref()
            && scheme != "dynamic"
        {
            return Err(CoreError::Config(format!(
                "quantization_config.activation_scheme {scheme:?} is not supported; moemesh \
                 dequantizes the weights of dynamic-activation FP8 checkpoints"
            )));
        }
        let block = match self.weight_block_size.as_deref() {
            None => DEFAULT_FP8_BLOCK,
            Some(&[rows, columns]) if rows > 0 && columns > 0 => [rows, columns],
            Some(other) => {
                return Err(CoreError::Config(format!(
                    "quantization_config.weight_block_size {other:?} must be two positive sizes"
                )));
            }
        };
        Ok(Quantization::Fp8Blocks { block })
    }
}

#[cfg(test)]
mod tests {
    use crate::model::config::{ModelConfig, Quantization};

    fn with_quantization(quantization: &str) -> Result<ModelConfig, String> {
        ModelConfig::from_json(&format!(
            r#"{{"model_type":"qwen3_moe","hidden_size":8,"num_hidden_layers":1,
                "moe_intermediate_size":4,"num_experts":2,"num_experts_per_tok":1,
                "quantization_config":{quantization}}}"#
        ))
        .map_err(|error| error.to_string())
    }

    #[test]
    fn fp8_and_mxfp4_are_read_and_other_schemes_refused_by_name() {
        let published = r#"{"activation_scheme":"dynamic","fmt":"e4m3","quant_method":"fp8",
            "weight_block_size":[128,128]}"#;
        assert_eq!(
            with_quantization(published).unwrap().quantization,
            Some(Quantization::Fp8Blocks { block: [128, 128] })
        );
        assert_eq!(
            with_quantization(r#"{"quant_method":"fp8"}"#)
                .unwrap()
                .quantization,
            Some(Quantization::Fp8Blocks { block: [128, 128] })
        );
        assert_eq!(
            with_quantization(r#"{"quant_method":"mxfp4","modules_to_not_convert":[]}"#)
                .unwrap()
                .quantization,
            Some(Quantization::Mxfp4)
        );
        for (quantization, named) in [
            (r#"{"quant_method":"awq","bits":4}"#, "quant_method \"awq\""),
            (r#"{"quant_method":"fp8","fmt":"e5m2"}"#, "fmt \"e5m2\""),
            (
                r#"{"quant_method":"fp8","activation_scheme":"static"}"#,
                "activation_scheme \"static\"",
            ),
            (
                r#"{"quant_method":"fp8","weight_block_size":[128]}"#,
                "weight_block_size [128]",
            ),
            (
                r#"{"quant_method":"fp8","weight_block_size":[0,128]}"#,
                "weight_block_size [0, 128]",
            ),
        ] {
            let error = with_quantization(quantization).unwrap_err();
            assert!(error.contains(named), "{quantization}: {error}");
        }
    }
}
