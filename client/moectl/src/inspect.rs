//! `moectl model inspect DIR`: what moemesh makes of a checkpoint before
//! any cluster sees it: the family and its routing, which layers are MoE,
//! the experts' storage formats and sizes, and what moemesh does with each
//! layer. Reads `config.json` and the safetensors headers only.

use std::path::{Path, PathBuf};

use anyhow::Context;
use moemesh_core::model::checkpoint::{Checkpoint, ProjectionLayout};
use moemesh_core::model::config::{Activation, Family, ModelConfig, Quantization};
use serde_json::{Value, json};

use crate::output::{OutputArg, human_bytes, print_pretty_json};

#[derive(clap::Args)]
pub struct InspectArgs {
    /// The checkpoint directory (config.json and safetensors).
    dir: PathBuf,
    #[command(flatten)]
    pub format: OutputArg,
}

/// One decoder layer as moemesh sees it.
struct LayerReport {
    layer: usize,
    moe: bool,
    /// Storage dtypes of the routed experts' projections, deduplicated.
    dtypes: Vec<String>,
    /// Stored bytes of one routed expert (its three projections).
    expert_bytes: u64,
    /// What moemesh does with the layer, or why it cannot serve it.
    action: String,
    servable: bool,
}

/// Prints the report; fails (after printing it) when moemesh cannot serve
/// the checkpoint, so that scripts can test the exit status.
pub fn inspect(args: InspectArgs, json_output: bool) -> anyhow::Result<()> {
    let dir = &args.dir;
    let model_type = read_model_type(dir)?;
    let checkpoint = match Checkpoint::open(dir) {
        Ok(checkpoint) => checkpoint,
        Err(error) => {
            let reason = error.to_string();
            if json_output {
                print_pretty_json(&json!({
                    "dir": dir, "model_type": model_type, "servable": false, "reason": reason,
                }))?;
            }
            anyhow::bail!(
                "{} ({model_type}) cannot be served: {reason}",
                dir.display()
            );
        }
    };
    let config = checkpoint.config();
    let layers: Vec<LayerReport> = (0..config.num_hidden_layers)
        .map(|layer| layer_report(&checkpoint, layer))
        .collect();
    let servable = layers.iter().all(|layer| layer.servable);
    if json_output {
        print_pretty_json(&report_json(dir, config, &layers, servable))?;
    } else {
        print_table(dir, config, &layers);
    }
    if !servable {
        anyhow::bail!(
            "{} has MoE layers moemesh cannot serve yet (see above)",
            dir.display()
        );
    }
    Ok(())
}

/// `config.json`'s `model_type`, read even when moemesh does not serve it.
fn read_model_type(dir: &Path) -> anyhow::Result<String> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let config: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    Ok(config["model_type"]
        .as_str()
        .unwrap_or("(none)")
        .to_string())
}

fn layer_report(checkpoint: &Checkpoint, layer: usize) -> LayerReport {
    let config = checkpoint.config();
    let mut report = LayerReport {
        layer,
        moe: config.is_moe_layer(layer),
        dtypes: Vec::new(),
        expert_bytes: 0,
        action: "dense MLP: stays with the model, not served".into(),
        servable: true,
    };
    if !report.moe {
        return report;
    }
    match expert_storage(checkpoint, layer) {
        Ok((dtypes, bytes)) => {
            report.expert_bytes = bytes;
            let shared = if config.has_shared_expert() {
                " and the shared expert"
            } else {
                ""
            };
            let dequantized = match dtypes
                .iter()
                .find(|dtype| ["F8_E4M3", "MXFP4"].contains(&dtype.as_str()))
            {
                Some(dtype) if dtype == "MXFP4" => {
                    " (MXFP4 dequantized on load to the node's f32 or bf16)"
                }
                Some(_) => " (FP8 dequantized on load to the node's f32 or bf16)",
                None => "",
            };
            report.action = format!(
                "serves {} routed experts{shared}{dequantized}",
                config.num_experts
            );
            report.dtypes = dtypes;
        }
        Err(reason) => {
            report.action = format!("cannot serve: {reason}");
            report.servable = false;
        }
    }
    report
}

/// The storage dtypes and stored bytes of one routed expert of `layer`,
/// after checking that every routed expert's projections are present and
/// stored in a format moemesh reads.
fn expert_storage(checkpoint: &Checkpoint, layer: usize) -> Result<(Vec<String>, u64), String> {
    let config = checkpoint.config();
    let mut dtypes: Vec<String> = Vec::new();
    let mut expert_bytes = 0;
    for expert in 0..config.experts_per_layer() as u32 {
        let projections = checkpoint
            .expert_projections(layer, expert)
            .map_err(|error| error.to_string())?;
        for projection in &projections {
            let (name, dtype) = match projection.layout {
                // Blocks of 32 FP4 values (16 bytes) and one scale byte.
                ProjectionLayout::Mxfp4 { .. } => {
                    let blocks = format!("{}_blocks", projection.tensor);
                    let present = checkpoint.has_tensor(&blocks);
                    (blocks, present.then(|| "MXFP4".to_string()))
                }
                _ => (
                    projection.tensor.clone(),
                    checkpoint
                        .tensor_dtype_and_shape(&projection.tensor)
                        .map(|(dtype, _)| dtype),
                ),
            };
            let Some(dtype) = dtype else {
                return Err(format!("tensor {name} is missing"));
            };
            let Some(bytes_per_32) = bytes_per_32_weights(&dtype, config) else {
                return Err(format!(
                    "{name} is stored as {dtype}{}; moemesh reads F32, BF16 and F16, and \
                     F8_E4M3 with block scales where config.json's quantization_config says fp8",
                    quantization_hint(checkpoint, &name)
                ));
            };
            if expert == 0 {
                // Each projection holds hidden × intermediate weights.
                let weights = config.hidden_size * config.intermediate_size_of(expert);
                expert_bytes += weights as u64 / 32 * bytes_per_32;
            }
            if !dtypes.contains(&dtype) {
                dtypes.push(dtype);
            }
        }
    }
    Ok((dtypes, expert_bytes))
}

/// The stored bytes of 32 weights in `dtype` (MXFP4: 16 bytes of values
/// and a scale byte).
fn bytes_per_32_weights(dtype: &str, config: &ModelConfig) -> Option<u64> {
    match dtype {
        "F32" => Some(128),
        "BF16" | "F16" => Some(64),
        "F8_E4M3" if matches!(config.quantization, Some(Quantization::Fp8Blocks { .. })) => {
            Some(32)
        }
        "MXFP4" => Some(17),
        _ => None,
    }
}

/// Names the quantization scheme a tensor's companions reveal.
fn quantization_hint(checkpoint: &Checkpoint, name: &str) -> &'static str {
    let stem = name.trim_end_matches(".weight");
    if checkpoint.has_tensor(&format!("{stem}.weight_scale_inv")) {
        " with block scales (FP8)"
    } else if checkpoint.has_tensor(&format!("{stem}_scales")) {
        " with scales (MXFP4)"
    } else {
        ""
    }
}

/// The family's routing rule in words.
fn routing_text(config: &ModelConfig) -> String {
    let mut text = format!(
        "{}: top-{} of {} experts",
        config.family, config.top_k, config.num_experts
    );
    if config.norm_topk_prob {
        text += ", weights renormalised";
    }
    if let Some(limit) = config.group_limit {
        text += &format!(", best {} of {} groups", limit.top_groups, limit.groups);
    }
    if matches!(
        config.family,
        Family::GraniteMoe | Family::GraniteMoeShared | Family::GptOss
    ) {
        text += ", softmax over the top-k logits";
    }
    if let Activation::ClampedSwiglu { alpha, limit } = config.expert_activation {
        text += &format!("; experts: SwiGLU clamped at {limit}, alpha {alpha}");
    }
    if config.expert_biases {
        text += ", with biases";
    }
    if config.zero_experts > 0 {
        text += &format!(
            " and {} zero (identity) experts the router adds itself",
            config.zero_experts
        );
    }
    if config.weights_scale_input {
        text += ", each weight (its logit's sigmoid) scaling the expert's input";
    }
    if config.router_jitter_noise > 0.0 {
        text += &format!(", sparsemixer within {}", config.router_jitter_noise);
    }
    if config.routed_scaling_factor != 1.0 {
        text += &format!(", scaled by {}", config.routed_scaling_factor);
    }
    text
}

/// The checkpoint's quantization in words.
fn quantization_text(config: &ModelConfig) -> String {
    match config.quantization {
        None => "no".into(),
        Some(Quantization::Fp8Blocks { block }) => {
            format!("fp8 e4m3, one scale per {}x{} block", block[0], block[1])
        }
        Some(Quantization::Mxfp4) => "mxfp4, one scale per 32 values".into(),
    }
}

fn report_json(dir: &Path, config: &ModelConfig, layers: &[LayerReport], servable: bool) -> Value {
    json!({
        "dir": dir,
        "model_type": config.family.model_type(),
        "servable": servable,
        "hidden_size": config.hidden_size,
        "layers": config.num_hidden_layers,
        "moe_layers": config.moe_layers(),
        "experts": config.num_experts,
        "top_k": config.top_k,
        "norm_topk_prob": config.norm_topk_prob,
        "routed_scaling_factor": config.routed_scaling_factor,
        "expert_intermediate_size": config.expert_intermediate_size,
        "shared_expert_intermediate_size": config.shared_intermediate_size,
        "routing": routing_text(config),
        "quantization": quantization_text(config),
        "per_layer": layers.iter().map(|layer| json!({
            "layer": layer.layer,
            "moe": layer.moe,
            "dtypes": layer.dtypes,
            "bytes_per_expert": layer.expert_bytes,
            "action": layer.action,
        })).collect::<Vec<_>>(),
    })
}

fn print_table(dir: &Path, config: &ModelConfig, layers: &[LayerReport]) {
    println!("model      {}", dir.display());
    println!(
        "family     {} ({} layers, hidden {}, {} MoE)",
        config.family,
        config.num_hidden_layers,
        config.hidden_size,
        config.moe_layers().len()
    );
    println!("routing    {}", routing_text(config));
    println!(
        "experts    intermediate {}; shared expert {}",
        config.expert_intermediate_size,
        config
            .shared_intermediate_size
            .map_or("none".to_string(), |size| format!("intermediate {size}"))
    );
    println!("quantized  {}", quantization_text(config));
    println!();
    println!(
        "{:<6} {:<6} {:<12} {:>14}  moemesh",
        "layer", "kind", "stored", "per expert"
    );
    for layer in layers {
        println!(
            "{:<6} {:<6} {:<12} {:>14}  {}",
            layer.layer,
            if layer.moe { "MoE" } else { "dense" },
            layer.dtypes.join(","),
            if layer.moe && layer.servable {
                human_bytes(layer.expert_bytes as f64)
            } else {
                String::new()
            },
            layer.action
        );
    }
}
