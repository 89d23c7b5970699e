//! `Describe`: what a router serves. A caller that computes the gate itself
//! (a transformers model whose experts run on the cluster) checks with it
//! that the cluster serves the same checkpoint: the model's shape, and per
//! MoE layer a SHA-256 fingerprint of the gate, taken as the router loads
//! its gates.

use std::collections::BTreeMap;

use moemesh_core::model::checkpoint::GateWeights;
use moemesh_core::model::config::ModelConfig;
use moemesh_proto::v1::{DescribeResponse, LayerGate};
use sha2::{Digest, Sha256};

use crate::{RouterError, RouterResult};

/// SHA-256 of one layer's gate (see [`gate_fingerprint`]).
pub type GateFingerprint = [u8; 32];

/// The gate's values as little-endian f32 bytes, hashed: `gate.weight`
/// row-major `[num_experts, hidden_size]`, then DeepSeek-V3's
/// (and GLM-4.5's) `e_score_correction_bias`, the only gate bias of the
/// families served.
/// Qwen2-MoE's shared expert gate is left out: it belongs to the shared
/// expert, which a pre-routed caller runs itself. The proto's `LayerGate`
/// documents the same bytes for other implementations.
pub fn gate_fingerprint(weights: &GateWeights) -> GateFingerprint {
    /// Values hashed per `update`: a large model's gates hold millions.
    const CHUNK: usize = 1024;
    let mut hasher = Sha256::new();
    let mut bytes = [0u8; CHUNK * 4];
    let bias = weights.score_correction_bias.as_deref().unwrap_or_default();
    let logit_bias = weights.logit_bias.as_deref().unwrap_or_default();
    for values in [weights.weight.as_slice(), bias, logit_bias] {
        for chunk in values.chunks(CHUNK) {
            for (slot, value) in bytes.chunks_exact_mut(4).zip(chunk) {
                slot.copy_from_slice(&value.to_le_bytes());
            }
            hasher.update(&bytes[..chunk.len() * 4]);
        }
    }
    hasher.finalize().into()
}

/// The answer to a `Describe` of `requested` (empty: the only model) from
/// a router serving `model_id`: the model's shape and every served
/// layer's gate fingerprint, ascending by layer.
pub fn describe(
    requested: &str,
    model_id: &str,
    config: &ModelConfig,
    fingerprints: &BTreeMap<usize, GateFingerprint>,
) -> RouterResult<DescribeResponse> {
    if !requested.is_empty() && requested != model_id {
        return Err(RouterError::InvalidArgument(format!(
            "unknown model {requested:?}; this router serves {model_id:?}"
        )));
    }
    let count = |value: usize, what: &str| {
        u32::try_from(value)
            .map_err(|_| RouterError::Internal(format!("{what} {value} does not fit the wire")))
    };
    let layers = fingerprints
        .iter()
        .map(|(&layer, fingerprint)| {
            Ok(LayerGate {
                layer: count(layer, "layer")?,
                gate_sha256: fingerprint.to_vec().into(),
            })
        })
        .collect::<RouterResult<_>>()?;
    Ok(DescribeResponse {
        model: model_id.to_string(),
        family: config.family.model_type().to_string(),
        hidden_size: count(config.hidden_size, "hidden size")?,
        num_experts: count(config.num_experts, "expert count")?,
        top_k: count(config.top_k, "top_k")?,
        layers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"{"model_type":"deepseek_v3","hidden_size":2,"num_hidden_layers":2,
        "first_k_dense_replace":1,"moe_intermediate_size":3,"intermediate_size":4,
        "n_routed_experts":2,"num_experts_per_tok":1,"n_shared_experts":1,"n_group":1,
        "topk_group":1,"routed_scaling_factor":1.0,"norm_topk_prob":true}"#;

    fn weights(bias: Option<Vec<f32>>) -> GateWeights {
        GateWeights {
            weight: vec![1.0, -2.5, 0.0, 3.25],
            score_correction_bias: bias,
            logit_bias: None,
            shared_expert_gate: Some(vec![7.0, 8.0]),
        }
    }

    #[test]
    fn the_fingerprint_hashes_the_weight_then_the_bias_as_little_endian_f32() {
        let values = [1.0f32, -2.5, 0.0, 3.25, 0.5, -0.125];
        let bytes: Vec<u8> = values
            .iter()
            .flat_map(|value| value.to_le_bytes())
            .collect();
        let expected: GateFingerprint = Sha256::digest(&bytes).into();
        assert_eq!(
            gate_fingerprint(&weights(Some(vec![0.5, -0.125]))),
            expected
        );
        let without_bias: GateFingerprint = Sha256::digest(&bytes[..16]).into();
        assert_eq!(gate_fingerprint(&weights(None)), without_bias);
    }

    #[test]
    fn gates_larger_than_one_hashed_chunk_hash_all_their_bytes_in_order() {
        let weight: Vec<f32> = (0..2500).map(|index| index as f32 / 3.0).collect();
        let bias: Vec<f32> = (0..7).map(|index| -(index as f32)).collect();
        let bytes: Vec<u8> = weight
            .iter()
            .chain(&bias)
            .flat_map(|value| value.to_le_bytes())
            .collect();
        let gate = GateWeights {
            weight,
            score_correction_bias: Some(bias),
            logit_bias: None,
            shared_expert_gate: None,
        };
        let expected: GateFingerprint = Sha256::digest(&bytes).into();
        assert_eq!(gate_fingerprint(&gate), expected);
    }

    #[test]
    fn one_changed_value_changes_the_fingerprint() {
        let mut changed = weights(Some(vec![0.5, -0.125]));
        changed.score_correction_bias = Some(vec![0.5, -0.25]);
        assert_ne!(
            gate_fingerprint(&changed),
            gate_fingerprint(&weights(Some(vec![0.5, -0.125])))
        );
    }

    #[test]
    fn describe_lists_the_shape_and_every_layer_and_refuses_other_models() {
        let config = ModelConfig::from_json(CONFIG).unwrap();
        let fingerprints = BTreeMap::from([(1, [7u8; 32])]);
        let response = describe("", "tiny", &config, &fingerprints).unwrap();
        assert_eq!(response.model, "tiny");
        assert_eq!(response.family, "deepseek_v3");
        assert_eq!(
            (response.hidden_size, response.num_experts, response.top_k),
            (2, 2, 1)
        );
        assert_eq!(
            response.layers,
            [LayerGate {
                layer: 1,
                gate_sha256: vec![7; 32].into()
            }]
        );
        assert_eq!(
            describe("tiny", "tiny", &config, &fingerprints).unwrap(),
            response
        );
        let error = describe("other", "tiny", &config, &fingerprints).unwrap_err();
        assert!(error.to_string().contains("\"other\""), "{error}");
    }
}
