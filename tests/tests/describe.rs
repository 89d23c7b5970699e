//! `Describe`: a router names the model it serves and fingerprints every
//! MoE layer's gate. The fingerprints are checked against SHA-256 computed
//! here straight from each golden fixture's safetensors files, so that a
//! caller hashing the same tensors (a transformers model's gate weights)
//! gets the same bytes.

use std::collections::BTreeMap;
use std::path::Path;

use moemesh_client::ClientError;
use moemesh_core::model::checkpoint::Checkpoint;
use moemesh_tests::{ClusterSandbox, FIXTURES, fixture_dir};
use safetensors::{Dtype, SafeTensors};
use sha2::{Digest, Sha256};

/// One tensor's values widened to f32, from whichever float dtype the
/// fixture stores.
fn f32_values(dtype: Dtype, data: &[u8]) -> Vec<f32> {
    let pairs = || {
        data.chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::BF16 => pairs()
            .map(|bits| half::bf16::from_bits(bits).to_f32())
            .collect(),
        Dtype::F16 => pairs()
            .map(|bits| half::f16::from_bits(bits).to_f32())
            .collect(),
        other => panic!("gate tensors are floats, not {other:?}"),
    }
}

/// The decoder layer of a tensor named `model.layers.N.…`.
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")
        .or_else(|| name.strip_prefix("transformer.blocks."))?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// Per decoder layer, the SHA-256 the proto's `LayerGate` documents:
/// every router weight's (`*.gate.weight`, or `*.router.layer.weight` /
/// `*.router.weight` as Granite, DBRX and gpt-oss name it) f32 bytes, then
/// its layer's `*.router.bias` (gpt-oss) or
/// `*.gate.e_score_correction_bias` if there is one. Read from every
/// safetensors file of the fixture, sharded or not, with no knowledge of
/// the family's tensor names beyond the router's.
fn expected_fingerprints(dir: &Path) -> BTreeMap<usize, Vec<u8>> {
    let mut weights = BTreeMap::new();
    let mut biases = BTreeMap::new();
    for entry in std::fs::read_dir(dir).expect("fixture directory") {
        let path = entry.expect("directory entry").path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.ends_with(".safetensors") || name == "expected.safetensors" {
            continue;
        }
        let bytes = std::fs::read(&path).expect("safetensors file");
        let tensors = SafeTensors::deserialize(&bytes).expect("safetensors parses");
        for (tensor, view) in tensors.tensors() {
            let values = || f32_values(view.dtype(), view.data());
            let Some(layer) = layer_of(&tensor) else {
                continue;
            };
            let router_weight = [
                ".gate.weight",
                ".router.layer.weight",
                ".router.weight",
                ".router.classifier.weight",
            ];
            if router_weight.iter().any(|suffix| tensor.ends_with(suffix)) {
                assert!(weights.insert(layer, values()).is_none(), "{tensor}");
            } else if tensor.ends_with(".e_score_correction_bias")
                || tensor.ends_with(".router.bias")
            {
                assert!(biases.insert(layer, values()).is_none(), "{tensor}");
            }
        }
    }
    weights
        .into_iter()
        .map(|(layer, weight)| {
            let mut hasher = Sha256::new();
            let bias = biases.remove(&layer).unwrap_or_default();
            for value in weight.iter().chain(&bias) {
                hasher.update(value.to_le_bytes());
            }
            (layer, hasher.finalize().to_vec())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fixtures_gate_fingerprints_match_sha256_of_its_gate_tensors() {
    for name in FIXTURES {
        let dir = fixture_dir(name);
        let config = Checkpoint::open(&dir).unwrap().config().clone();
        let expected = expected_fingerprints(&dir);
        let moe_layers: Vec<usize> = expected.keys().copied().collect();
        assert_eq!(moe_layers, config.moe_layers(), "{name}: gate tensors");

        let cluster = ClusterSandbox::spread(&dir, 2, 1).await;
        let mut client = cluster.client().await;
        let described = client.describe("").await.unwrap();
        assert_eq!(described.model, "test-model", "{name}");
        assert_eq!(described.family, config.family.model_type(), "{name}");
        assert_eq!(described.hidden_size as usize, config.hidden_size);
        assert_eq!(described.num_experts as usize, config.num_experts);
        assert_eq!(described.top_k as usize, config.top_k);
        let served: BTreeMap<usize, Vec<u8>> = described
            .layers
            .iter()
            .map(|gate| (gate.layer as usize, gate.gate_sha256.to_vec()))
            .collect();
        assert_eq!(served, expected, "{name}: every MoE layer, fingerprinted");
        let listed: Vec<u32> = described.layers.iter().map(|gate| gate.layer).collect();
        assert!(listed.is_sorted(), "{name}: layers ascend: {listed:?}");

        assert_eq!(client.describe("test-model").await.unwrap(), described);
        cluster.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describing_another_model_is_an_invalid_argument_naming_both() {
    let cluster = ClusterSandbox::spread(&fixture_dir("mixtral"), 1, 1).await;
    let mut client = cluster.client().await;
    match client.describe("another-model").await {
        Err(ClientError::InvalidArgument(message)) => {
            assert!(message.contains("another-model"), "{message}");
            assert!(message.contains("test-model"), "{message}");
        }
        other => panic!("expected an invalid argument, got {other:?}"),
    }
    cluster.shutdown().await;
}
