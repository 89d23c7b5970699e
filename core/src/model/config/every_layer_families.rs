//! Families whose every layer is MoE with routed experts of
//! `intermediate_size`: PhiMoE, Granite MoE (with or without its shared
//! MLP) and DBRX, as transformers' `PhimoeConfig`, `GraniteMoeConfig`,
//! `GraniteMoeSharedConfig` and `DbrxConfig` read them.

use serde_json::{Map, Value};

use super::limits::MAX_INTERMEDIATE_SIZE;
use super::{Family, FamilyFields, RawConfig, in_range, required};
use crate::{CoreError, CoreResult};

/// `PhimoeConfig.router_jitter_noise` when unnamed.
const PHIMOE_DEFAULT_JITTER: f32 = 0.01;

impl RawConfig {
    /// PhiMoE, Granite MoE and DBRX (after [`flatten_dbrx`]).
    pub(super) fn every_layer_family_fields(&self, family: Family) -> CoreResult<FamilyFields> {
        let expert_intermediate_size = in_range(
            "intermediate_size",
            required(self.intermediate_size, "intermediate_size", family)?,
            1,
            MAX_INTERMEDIATE_SIZE,
        )?;
        // Granite's softmax over the top-k logits sums to one by itself.
        let mut fields =
            FamilyFields::every_layer(expert_intermediate_size, self.num_hidden_layers);
        match family {
            Family::Phimoe => {
                // sparsemixer picks two experts whatever num_experts_per_tok says.
                if self.num_experts_per_tok != 2 {
                    return Err(CoreError::Config(format!(
                        "num_experts_per_tok is {}; phimoe's sparsemixer always routes to 2 experts",
                        self.num_experts_per_tok
                    )));
                }
                let jitter = self.router_jitter_noise.unwrap_or(PHIMOE_DEFAULT_JITTER);
                if !(jitter.is_finite() && jitter >= 0.0) {
                    return Err(CoreError::Config(format!(
                        "router_jitter_noise is {jitter}; it must be finite and not negative"
                    )));
                }
                fields.router_jitter_noise = jitter;
            }
            Family::GraniteMoeShared => {
                let shared = self.shared_intermediate_size.unwrap_or(0);
                if shared > 0 {
                    let size =
                        in_range("shared_intermediate_size", shared, 1, MAX_INTERMEDIATE_SIZE)?;
                    fields.shared_intermediate_size = Some(size);
                }
            }
            Family::Dbrx => fields.norm_topk_prob = self.norm_topk_prob.unwrap_or(true),
            _ => {}
        }
        Ok(fields)
    }
}

/// DBRX's `config.json` nests the MoE fields in `ffn_config` and names the
/// sizes `d_model` and `n_layers`: moves them to the names every other
/// family uses, with `DbrxConfig`'s defaults, so that one reader serves.
pub(super) fn flatten_dbrx(config: &mut Map<String, Value>) -> CoreResult<()> {
    let ffn = match config.remove("ffn_config") {
        Some(Value::Object(ffn)) => ffn,
        None | Some(Value::Null) => Map::new(),
        Some(other) => {
            return Err(CoreError::Config(format!(
                "ffn_config is {other}; dbrx's config.json holds an object there"
            )));
        }
    };
    let field =
        |map: &Map<String, Value>, name: &str| map.get(name).cloned().unwrap_or(Value::Null);
    let (d_model, n_layers) = (field(config, "d_model"), field(config, "n_layers"));
    let mut rename = |from: &Value, to: &str, default: Value| {
        let value = if from.is_null() {
            default
        } else {
            from.clone()
        };
        config.entry(to).or_insert(value);
    };
    rename(&d_model, "hidden_size", 2048.into());
    rename(&n_layers, "num_hidden_layers", 24.into());
    rename(
        &field(&ffn, "moe_num_experts"),
        "num_local_experts",
        4.into(),
    );
    rename(&field(&ffn, "moe_top_k"), "num_experts_per_tok", 1.into());
    rename(
        &field(&ffn, "ffn_hidden_size"),
        "intermediate_size",
        3584.into(),
    );
    let activation = ffn
        .get("ffn_act_fn")
        .and_then(|act| act.get("name"))
        .cloned()
        .unwrap_or_else(|| "silu".into());
    rename(&activation, "hidden_act", Value::Null);
    // `moe_normalize_expert_weights`: the p of the norm the top-k weights
    // are divided by (1 by default), none when null.
    let norm_topk_prob = match ffn.get("moe_normalize_expert_weights") {
        Some(Value::Null) => false,
        None => true,
        Some(p) if p.as_f64() == Some(1.0) => true,
        Some(p) => {
            return Err(CoreError::Config(format!(
                "ffn_config.moe_normalize_expert_weights is {p}; moemesh serves dbrx with 1 \
                 (weights divided by their sum, as published) or null"
            )));
        }
    };
    config.insert("norm_topk_prob".into(), norm_topk_prob.into());
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::model::config::{Family, ModelConfig};

    fn parse(json: &str) -> Result<ModelConfig, String> {
        ModelConfig::from_json(json).map_err(|error| error.to_string())
    }

    #[test]
    fn dbrx_reads_its_nested_ffn_config_and_refuses_other_norms() {
        let dbrx = |normalize: &str| {
            parse(&format!(
                r#"{{"model_type":"dbrx","d_model":16,"n_layers":3,"ffn_config":{{
                    "ffn_hidden_size":8,"moe_num_experts":4,"moe_top_k":2{normalize}}}}}"#
            ))
        };
        let config = dbrx("").unwrap();
        assert_eq!(config.family, Family::Dbrx);
        assert_eq!(
            (
                config.hidden_size,
                config.num_hidden_layers,
                config.num_experts,
                config.top_k
            ),
            (16, 3, 4, 2)
        );
        assert_eq!(config.expert_intermediate_size, 8);
        assert!(config.norm_topk_prob);
        assert_eq!(config.moe_layers(), vec![0, 1, 2]);
        assert!(
            !dbrx(r#","moe_normalize_expert_weights":null"#)
                .unwrap()
                .norm_topk_prob
        );
        let error = dbrx(r#","moe_normalize_expert_weights":2.0"#).unwrap_err();
        assert!(
            error.contains("moe_normalize_expert_weights is 2.0"),
            "{error}"
        );
        let error = dbrx(r#","ffn_act_fn":{"name":"gelu"}"#).unwrap_err();
        assert!(error.contains("hidden_act \"gelu\""), "{error}");
    }

    #[test]
    fn phimoe_routes_to_two_experts_and_granite_shares_only_a_sized_mlp() {
        let phimoe = |fields: &str| {
            parse(&format!(
                r#"{{"model_type":"phimoe","hidden_size":8,"num_hidden_layers":1,
                    "intermediate_size":4,"num_local_experts":4{fields}}}"#
            ))
        };
        let config = phimoe(r#","num_experts_per_tok":2"#).unwrap();
        assert_eq!(config.router_jitter_noise, 0.01);
        let error = phimoe(r#","num_experts_per_tok":3"#).unwrap_err();
        assert!(error.contains("always routes to 2 experts"), "{error}");
        let error = phimoe(r#","num_experts_per_tok":2,"router_jitter_noise":-1"#).unwrap_err();
        assert!(error.contains("router_jitter_noise is -1"), "{error}");

        let granite = |shared: usize| {
            parse(&format!(
                r#"{{"model_type":"granitemoeshared","hidden_size":8,"num_hidden_layers":1,
                    "intermediate_size":4,"num_local_experts":4,"num_experts_per_tok":2,
                    "shared_intermediate_size":{shared}}}"#
            ))
            .unwrap()
        };
        assert_eq!(granite(0).shared_intermediate_size, None);
        assert_eq!(granite(6).shared_intermediate_size, Some(6));
    }
}
