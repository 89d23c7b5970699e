//! Llama 4's text MoE, as transformers' `Llama4TextConfig` and
//! `Llama4TextMoe` read it: `moe_layers` (or every
//! `interleave_moe_layer_step`-th layer), experts and a shared expert of
//! `intermediate_size`, and a routing weight that scales each expert's
//! input.

use serde_json::{Map, Value};

use super::limits::MAX_INTERMEDIATE_SIZE;
use super::{Family, FamilyFields, RawConfig, in_range, required};
use crate::{CoreError, CoreResult};

/// Where the multimodal `llama4` checkpoints keep the text model's tensors.
pub(super) const MULTIMODAL_PREFIX: &str = "language_model.";

impl RawConfig {
    pub(super) fn llama4_fields(&self) -> CoreResult<FamilyFields> {
        let family = Family::Llama4Text;
        let intermediate = in_range(
            "intermediate_size",
            required(self.intermediate_size, "intermediate_size", family)?,
            1,
            MAX_INTERMEDIATE_SIZE,
        )?;
        let layers = self.num_hidden_layers;
        let moe_layers = match &self.llama4_moe_layers {
            Some(listed) => {
                let mut moe_layers = vec![false; layers];
                for &layer in listed {
                    let Some(is_moe) = moe_layers.get_mut(layer) else {
                        return Err(CoreError::Config(format!(
                            "moe_layers names layer {layer}; the model has {layers}"
                        )));
                    };
                    *is_moe = true;
                }
                moe_layers
            }
            None => {
                let step = self.interleave_moe_layer_step.unwrap_or(1);
                let step = in_range("interleave_moe_layer_step", step, 1, layers)?;
                (0..layers).map(|layer| (layer + 1) % step == 0).collect()
            }
        };
        Ok(FamilyFields {
            shared_intermediate_size: Some(intermediate),
            moe_layers,
            ..FamilyFields::every_layer(intermediate, layers)
        })
    }
}

/// The multimodal `llama4` config keeps the text model's fields in
/// `text_config`: lifts them to the top, as a `llama4_text` config.
pub(super) fn lift_text_config(config: &mut Map<String, Value>) -> CoreResult<()> {
    let Some(Value::Object(text)) = config.remove("text_config") else {
        return Err(CoreError::Config(
            "a llama4 config.json holds the text model's fields in text_config, which is missing"
                .into(),
        ));
    };
    *config = text;
    config.insert("model_type".into(), "llama4_text".into());
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::model::config::{Family, ModelConfig};

    const TEXT: &str = r#""hidden_size":8,"num_hidden_layers":4,"intermediate_size":4,
        "intermediate_size_mlp":16,"num_local_experts":4,"num_experts_per_tok":1"#;

    fn text(fields: &str) -> Result<ModelConfig, String> {
        ModelConfig::from_json(&format!(r#"{{"model_type":"llama4_text",{TEXT}{fields}}}"#))
            .map_err(|error| error.to_string())
    }

    #[test]
    fn llama4_layers_follow_the_interleave_step_or_the_explicit_list() {
        let config = text("").unwrap();
        assert_eq!(config.family, Family::Llama4Text);
        assert_eq!(config.moe_layers(), vec![0, 1, 2, 3]);
        assert!(config.weights_scale_input);
        assert_eq!(config.shared_intermediate_size, Some(4));
        assert_eq!(config.tensor_prefix, "");
        let maverick = text(r#","interleave_moe_layer_step":2"#).unwrap();
        assert_eq!(maverick.moe_layers(), vec![1, 3]);
        let listed = text(r#","interleave_moe_layer_step":2,"moe_layers":[0,2]"#).unwrap();
        assert_eq!(listed.moe_layers(), vec![0, 2]);
        let error = text(r#","moe_layers":[4]"#).unwrap_err();
        assert!(error.contains("moe_layers names layer 4"), "{error}");
    }

    #[test]
    fn the_multimodal_config_serves_its_text_model_under_its_prefix() {
        let config = ModelConfig::from_json(&format!(
            r#"{{"model_type":"llama4","vision_config":{{}},"text_config":{{
                "model_type":"llama4_text",{TEXT}}}}}"#
        ))
        .unwrap();
        assert_eq!(config.family, Family::Llama4Text);
        assert_eq!(config.tensor_prefix, "language_model.");
        assert_eq!(config.hidden_size, 8);
        let error = ModelConfig::from_json(r#"{"model_type":"llama4"}"#)
            .unwrap_err()
            .to_string();
        assert!(error.contains("text_config"), "{error}");
    }
}
