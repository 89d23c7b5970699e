//! The `--experts` flag: which experts an expert node holds.
//!
//! Each value is `LAYER:EXPERTS`, where LAYER is a layer index or `*` (every
//! MoE layer) and EXPERTS is `*` (every expert, shared included), or a
//! comma-separated list of ids and ranges such as `0-3,7` (the shared
//! expert, where the model has one, is the id after the routed experts, or
//! `shared`).

use anyhow::{Context, bail};
use moemesh_core::model::config::ModelConfig;
use moemesh_core::model::placement::LayerExpert;

/// Expands `--experts` values into experts, checked against the model.
pub fn parse_expert_specs(
    specs: &[String],
    config: &ModelConfig,
) -> anyhow::Result<Vec<LayerExpert>> {
    let mut held = Vec::new();
    for spec in specs {
        let (layers, experts) = spec
            .split_once(':')
            .with_context(|| format!("--experts {spec:?}: expected LAYER:EXPERTS, e.g. 1:0-3"))?;
        let layers = if layers == "*" {
            config.moe_layers()
        } else {
            let layer: usize = layers
                .parse()
                .with_context(|| format!("--experts {spec:?}: bad layer {layers:?}"))?;
            if !config.is_moe_layer(layer) {
                bail!(
                    "--experts {spec:?}: layer {layer} is not an MoE layer (MoE layers: {:?})",
                    config.moe_layers()
                );
            }
            vec![layer]
        };
        let all = config.experts_per_layer() as u32;
        let mut ids = Vec::new();
        for part in experts.split(',') {
            match part {
                "*" => ids.extend(0..all),
                "shared" => ids.push(config.shared_expert_id().with_context(|| {
                    format!("--experts {spec:?}: the model has no shared expert")
                })?),
                range => {
                    let (first, last) = range.split_once('-').unwrap_or((range, range));
                    let parse = |text: &str| -> anyhow::Result<u32> {
                        text.parse()
                            .with_context(|| format!("--experts {spec:?}: bad expert id {text:?}"))
                    };
                    let (first, last) = (parse(first)?, parse(last)?);
                    if first > last || last >= all {
                        bail!(
                            "--experts {spec:?}: {range} is outside the experts 0..{all} of this model"
                        );
                    }
                    ids.extend(first..=last);
                }
            }
        }
        for layer in layers {
            held.extend(ids.iter().map(|&expert| LayerExpert { layer, expert }));
        }
    }
    held.sort_unstable();
    held.dedup();
    Ok(held)
}

/// Writes experts back as `--experts` values, one per layer.
pub fn format_expert_specs(held: &[LayerExpert]) -> Vec<String> {
    let mut specs: Vec<(usize, Vec<String>)> = Vec::new();
    for &LayerExpert { layer, expert } in held {
        match specs.last_mut() {
            Some((last_layer, ids)) if *last_layer == layer => ids.push(expert.to_string()),
            _ => specs.push((layer, vec![expert.to_string()])),
        }
    }
    specs
        .into_iter()
        .map(|(layer, ids)| format!("{layer}:{}", ids.join(",")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ModelConfig {
        ModelConfig::from_json(
            r#"{"model_type":"qwen2_moe","hidden_size":8,"num_hidden_layers":3,
                "moe_intermediate_size":4,"shared_expert_intermediate_size":8,
                "num_experts":4,"num_experts_per_tok":2,"mlp_only_layers":[0]}"#,
        )
        .unwrap()
    }

    #[test]
    fn specs_expand_and_round_trip() {
        let config = config();
        let held = parse_expert_specs(&["1:0-1,shared".into(), "2:3".into()], &config).unwrap();
        let pairs: Vec<(usize, u32)> = held.iter().map(|held| (held.layer, held.expert)).collect();
        assert_eq!(pairs, vec![(1, 0), (1, 1), (1, 4), (2, 3)]);
        assert_eq!(
            parse_expert_specs(&format_expert_specs(&held), &config).unwrap(),
            held
        );
        assert_eq!(
            parse_expert_specs(&["*:*".into()], &config).unwrap().len(),
            10
        );
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        let config = config();
        let error = |spec: &str| {
            parse_expert_specs(&[spec.to_string()], &config)
                .unwrap_err()
                .to_string()
        };
        assert!(error("0:1").contains("layer 0 is not an MoE layer"));
        assert!(error("1:2-9").contains("outside the experts 0..5"));
        assert!(error("1").contains("expected LAYER:EXPERTS"));
        assert!(error("1:x").contains("bad expert id \"x\""));
    }
}
