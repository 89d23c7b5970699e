//! Golden tests: moemesh against the transformers modules, in process and
//! through a cluster, on every committed fixture.

use moemesh_core::compute::{CpuBackend, WeightFormat};
use moemesh_core::layer::MoeLayer;
use moemesh_tests::{ClusterSandbox, FIXTURES, Fixture, partly_replicated, relative_l2};

#[test]
fn in_process_layers_match_transformers() {
    let backend = CpuBackend::new(2).unwrap();
    for name in FIXTURES {
        let fixture = Fixture::open(name);
        assert!(!fixture.cases.is_empty(), "{name} has no MoE layer");
        for (&layer, (input, expected)) in &fixture.cases {
            let moe = MoeLayer::load(&fixture.checkpoint, layer, &backend).unwrap();
            let tokens = input.len() / fixture.hidden_size();
            let output = moe.forward(input, tokens).unwrap();
            let error = relative_l2(&output, expected);
            println!("{name} layer {layer}: relative L2 error {error:.2e}");
            assert!(
                error < 1e-5,
                "{name} layer {layer}: relative L2 error {error:e}"
            );
        }
    }
}

/// bf16 compute (weights rounded to bf16 at load, f32 accumulation) stays
/// within the 1e-2 that bf16 inference is held to.
#[test]
fn in_process_layers_with_bf16_weights_match_transformers() {
    let backend = CpuBackend::with_format(2, WeightFormat::Bf16).unwrap();
    for name in FIXTURES {
        let fixture = Fixture::open(name);
        for (&layer, (input, expected)) in &fixture.cases {
            let moe = MoeLayer::load(&fixture.checkpoint, layer, &backend).unwrap();
            let output = moe
                .forward(input, input.len() / fixture.hidden_size())
                .unwrap();
            let error = relative_l2(&output, expected);
            println!("{name} layer {layer}, bf16 weights: relative L2 error {error:.2e}");
            assert!(
                error < 1e-2,
                "{name} layer {layer}, bf16: relative L2 error {error:e}"
            );
        }
    }
}

#[test]
fn dense_layers_are_not_moe_layers() {
    for (name, dense_layer) in [("qwen2_moe", 0), ("deepseek_v3", 0)] {
        let fixture = Fixture::open(name);
        assert!(!fixture.checkpoint.config().is_moe_layer(dense_layer));
        let error = MoeLayer::load(
            &fixture.checkpoint,
            dense_layer,
            &CpuBackend::new(1).unwrap(),
        )
        .err()
        .unwrap();
        assert!(error.to_string().contains("not an MoE layer"), "{error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_matches_transformers_and_the_in_process_layer() {
    let backend = CpuBackend::new(1).unwrap();
    for name in FIXTURES {
        let fixture = Fixture::open(name);
        let cluster = ClusterSandbox::start(&fixture.dir, 3, partly_replicated(&fixture.dir)).await;
        let mut client = cluster.client().await;
        for (&layer, (input, expected)) in &fixture.cases {
            let output = client
                .forward_f32("", layer as u32, input, fixture.hidden_size())
                .await
                .unwrap();
            let error = relative_l2(&output, expected);
            assert!(
                error < 1e-5,
                "{name} layer {layer} through the cluster: relative L2 error {error:e}"
            );
            let in_process = MoeLayer::load(&fixture.checkpoint, layer, &backend)
                .unwrap()
                .forward(input, input.len() / fixture.hidden_size())
                .unwrap();
            let error = relative_l2(&output, &in_process);
            assert!(
                error < 1e-6,
                "{name} layer {layer}: cluster vs in process, relative L2 error {error:e}"
            );
        }
        cluster.shutdown().await;
    }
}

/// Published Llama 4 checkpoints are multimodal (`llama4`): the text
/// model's config sits in `text_config` and its tensors under
/// `language_model.`; moemesh serves the text model's MoE layers.
#[test]
fn a_multimodal_llama4_checkpoint_serves_its_text_model() {
    let fixture = Fixture::open("llama4_text");
    let dir = tempfile::tempdir().unwrap();
    let text_config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.dir.join("config.json")).unwrap())
            .unwrap();
    let config = serde_json::json!({"model_type": "llama4", "text_config": text_config});
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let bytes = std::fs::read(fixture.dir.join("model.safetensors")).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let renamed: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .tensors()
        .into_iter()
        .map(|(name, view)| (format!("language_model.{name}"), view))
        .collect();
    safetensors::serialize_to_file(renamed, None, &dir.path().join("model.safetensors")).unwrap();
    let checkpoint = moemesh_core::model::checkpoint::Checkpoint::open(dir.path()).unwrap();
    assert_eq!(checkpoint.config().moe_layers(), vec![1, 3]);
    let backend = CpuBackend::new(1).unwrap();
    for (&layer, (input, expected)) in &fixture.cases {
        let moe = MoeLayer::load(&checkpoint, layer, &backend).unwrap();
        let output = moe
            .forward(input, input.len() / fixture.hidden_size())
            .unwrap();
        let error = relative_l2(&output, expected);
        assert!(error < 1e-5, "layer {layer}: relative L2 error {error:e}");
    }
}
