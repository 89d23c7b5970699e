//! `moectl model inspect` on the golden fixtures, on a checkpoint whose
//! experts are stored in FP8, and on a family moemesh does not serve.

use std::path::Path;
use std::process::{Command, Output};

use moemesh_tests::{FIXTURES, Fixture, fixture_dir};
use safetensors::tensor::{Dtype, TensorView};
use serde_json::Value;

const MOECTL: &str = env!("CARGO_BIN_EXE_moectl");

fn inspect(dir: &Path, json: bool) -> Output {
    let mut command = Command::new(MOECTL);
    command.args(["model", "inspect"]).arg(dir);
    if json {
        command.args(["--output", "json"]);
    }
    command
        .env_remove("MOEMESH_OUTPUT")
        .output()
        .expect("moectl runs")
}

fn report(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout).expect("one JSON document")
}

#[test]
fn every_fixture_is_reported_servable_with_its_moe_layers_and_expert_sizes() {
    for name in FIXTURES {
        let fixture = Fixture::open(name);
        let output = inspect(&fixture.dir, true);
        assert!(
            output.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let report = report(&output);
        let config = fixture.checkpoint.config();
        assert_eq!(report["servable"], true, "{name}");
        assert_eq!(report["model_type"], config.family.model_type(), "{name}");
        let mut moe_layers: Vec<usize> = fixture.cases.keys().copied().collect();
        moe_layers.sort_unstable();
        assert_eq!(
            report["moe_layers"],
            serde_json::json!(moe_layers),
            "{name}"
        );
        // Three projections of hidden × intermediate weights, at the
        // stored size of one weight (MXFP4: 17 bytes per 32).
        let weights = 3 * config.hidden_size * config.expert_intermediate_size;
        let expected_bytes = match name {
            "gpt_oss_mxfp4" => weights / 32 * 17,
            "deepseek_v3_fp8" => weights,
            _ => {
                let checkpoint = &fixture.checkpoint;
                let gate = &checkpoint.expert_projections(moe_layers[0], 0).unwrap()[0];
                match checkpoint
                    .tensor_dtype_and_shape(&gate.tensor)
                    .unwrap()
                    .0
                    .as_str()
                {
                    "F32" => weights * 4,
                    "BF16" | "F16" => weights * 2,
                    other => panic!("{name}: {other}"),
                }
            }
        };
        for layer in report["per_layer"].as_array().unwrap() {
            let moe = layer["moe"].as_bool().unwrap();
            let index = layer["layer"].as_u64().unwrap() as usize;
            assert_eq!(moe, moe_layers.contains(&index), "{name} layer {index}");
            if moe {
                assert_eq!(
                    layer["bytes_per_expert"], expected_bytes,
                    "{name} layer {index}"
                );
                assert!(
                    layer["action"].as_str().unwrap().starts_with("serves"),
                    "{layer}"
                );
            } else {
                assert!(
                    layer["action"].as_str().unwrap().contains("not served"),
                    "{layer}"
                );
            }
        }
        let table = inspect(&fixture.dir, false);
        assert!(table.status.success());
        let text = String::from_utf8(table.stdout).unwrap();
        assert!(
            text.contains(&format!("family     {}", config.family)),
            "{text}"
        );
    }
}

/// The Mixtral fixture with layer 1's expert 3 stored as FP8 with a block
/// scale, as DeepSeek-V3's published checkpoints store theirs.
fn with_an_fp8_expert(dir: &Path) {
    let source = fixture_dir("mixtral");
    std::fs::copy(source.join("config.json"), dir.join("config.json")).unwrap();
    let bytes = std::fs::read(source.join("model.safetensors")).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let fp8_name = "model.layers.1.block_sparse_moe.experts.3.w1.weight";
    let mut views: Vec<(String, TensorView<'_>)> = Vec::new();
    let (rows, columns) = {
        let view = tensors.tensor(fp8_name).unwrap();
        (view.shape()[0], view.shape()[1])
    };
    let fp8_values = vec![0x38u8; rows * columns];
    let scale = 1.0f32.to_le_bytes();
    for (name, view) in tensors.tensors() {
        if name == fp8_name {
            views.push((
                name,
                TensorView::new(Dtype::F8_E4M3, vec![rows, columns], &fp8_values).unwrap(),
            ));
        } else {
            views.push((name, view));
        }
    }
    views.push((
        fp8_name.replace(".weight", ".weight_scale_inv"),
        TensorView::new(Dtype::F32, vec![1, 1], &scale).unwrap(),
    ));
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

#[test]
fn experts_stored_in_fp8_without_a_quantization_config_are_named_and_refused() {
    let dir = tempfile::tempdir().unwrap();
    with_an_fp8_expert(dir.path());
    let output = inspect(dir.path(), true);
    assert!(!output.status.success());
    let report = report(&output);
    assert_eq!(report["servable"], false);
    let layers = report["per_layer"].as_array().unwrap();
    assert!(
        layers[0]["action"].as_str().unwrap().starts_with("serves"),
        "{}",
        layers[0]
    );
    let refused = layers[1]["action"].as_str().unwrap();
    assert!(
        refused.contains("experts.3.w1.weight is stored as F8_E4M3 with block scales (FP8)")
            && refused.contains("where config.json's quantization_config says fp8"),
        "{refused}"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot serve yet"), "{stderr}");
}

#[test]
fn an_fp8_checkpoint_is_served_dequantized() {
    let output = inspect(&fixture_dir("deepseek_v3_fp8"), true);
    assert!(output.status.success(), "{output:?}");
    let report = report(&output);
    assert_eq!(
        report["quantization"],
        "fp8 e4m3, one scale per 16x32 block"
    );
    let layer = &report["per_layer"][1];
    assert_eq!(layer["dtypes"], serde_json::json!(["F8_E4M3"]));
    // gate, up [32, 64] and down [64, 32], one byte each.
    assert_eq!(layer["bytes_per_expert"], 3 * 32 * 64);
    assert!(
        layer["action"]
            .as_str()
            .unwrap()
            .contains("FP8 dequantized on load"),
        "{layer}"
    );
}

#[test]
fn a_family_moemesh_does_not_serve_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"model_type":"jamba","hidden_size":8,"num_hidden_layers":1,"num_experts_per_tok":1}"#,
    )
    .unwrap();
    let output = inspect(dir.path(), false);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("(jamba) cannot be served"), "{stderr}");
    assert!(stderr.contains("\"jamba\" is not supported"), "{stderr}");
    let json = report(&inspect(dir.path(), true));
    assert_eq!(
        (json["servable"].as_bool(), json["model_type"].as_str()),
        (Some(false), Some("jamba"))
    );
}
