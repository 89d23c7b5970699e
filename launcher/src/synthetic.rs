//! A synthetic Mixtral-shaped checkpoint with the real tensor names, so that
//! `moemesh demo` needs no download.

use std::path::Path;

use anyhow::Context;
use rand::{Rng, SeedableRng};
use safetensors::tensor::{Dtype, TensorView};

/// The shape of the synthetic model.
#[derive(Debug, Clone, Copy)]
pub struct SyntheticShape {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub layers: usize,
    pub experts: usize,
    pub top_k: usize,
}

impl SyntheticShape {
    /// Small enough that the demo's cluster loads and serves in seconds on two cores.
    pub const DEMO: Self = Self {
        hidden_size: 512,
        intermediate_size: 1408,
        layers: 2,
        experts: 8,
        top_k: 2,
    };
}

fn random_matrix(rng: &mut impl Rng, rows: usize, columns: usize, scale: f32) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(rows * columns * 4);
    for _ in 0..rows * columns {
        bytes.extend_from_slice(&rng.random_range(-scale..scale).to_le_bytes());
    }
    bytes
}

/// `random_matrix` rounded to bf16, as GPU checkpoints are stored.
fn random_matrix_bf16(rng: &mut impl Rng, rows: usize, columns: usize, scale: f32) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(rows * columns * 2);
    for _ in 0..rows * columns {
        let value = half::bf16::from_f32(rng.random_range(-scale..scale));
        bytes.extend_from_slice(&value.to_le_bytes());
    }
    bytes
}

/// Writes `config.json` and `model.safetensors` (MoE blocks only) to `dir`.
pub fn write_mixtral(dir: &Path, shape: SyntheticShape, seed: u64) -> anyhow::Result<()> {
    write_mixtral_with_gate(dir, shape, seed, None)
}

/// Like [`write_mixtral`], with the experts' weights in bf16.
pub fn write_mixtral_bf16(dir: &Path, shape: SyntheticShape, seed: u64) -> anyhow::Result<()> {
    write_model(dir, shape, seed, None, Dtype::BF16)
}

/// Like [`write_mixtral`], with `gate` (`[experts, hidden]`, f32) as every
/// layer's gate instead of a random one.
pub fn write_mixtral_with_gate(
    dir: &Path,
    shape: SyntheticShape,
    seed: u64,
    gate: Option<&[f32]>,
) -> anyhow::Result<()> {
    write_model(dir, shape, seed, gate, Dtype::F32)
}

fn write_model(
    dir: &Path,
    shape: SyntheticShape,
    seed: u64,
    gate: Option<&[f32]>,
    expert_dtype: Dtype,
) -> anyhow::Result<()> {
    let SyntheticShape {
        hidden_size: hidden,
        intermediate_size: intermediate,
        layers,
        experts,
        top_k,
    } = shape;
    let config = serde_json::json!({
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_local_experts": experts,
        "num_experts_per_tok": top_k,
        "hidden_act": "silu",
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "vocab_size": 32000,
        "torch_dtype": if expert_dtype == Dtype::BF16 { "bfloat16" } else { "float32" },
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )
    .with_context(|| format!("cannot write {}", dir.display()))?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Uniform(-a, a) with variance 1/fan_in keeps activations of order one.
    let scale_for = |fan_in: usize| (3.0 / fan_in as f32).sqrt();
    let mut tensors: Vec<(String, Vec<usize>, Dtype, Vec<u8>)> = Vec::new();
    for layer in 0..layers {
        let prefix = format!("model.layers.{layer}.block_sparse_moe");
        // A larger gate scale gives the uneven expert loads real routers see.
        let gate_bytes = match gate {
            Some(gate) => {
                anyhow::ensure!(gate.len() == experts * hidden, "gate has the wrong size");
                gate.iter().flat_map(|value| value.to_le_bytes()).collect()
            }
            None => random_matrix(&mut rng, experts, hidden, 4.0 * scale_for(hidden)),
        };
        tensors.push((
            format!("{prefix}.gate.weight"),
            vec![experts, hidden],
            Dtype::F32,
            gate_bytes,
        ));
        for expert in 0..experts {
            for (name, rows, columns) in [
                ("w1", intermediate, hidden),
                ("w3", intermediate, hidden),
                ("w2", hidden, intermediate),
            ] {
                let scale = scale_for(columns);
                tensors.push((
                    format!("{prefix}.experts.{expert}.{name}.weight"),
                    vec![rows, columns],
                    expert_dtype,
                    match expert_dtype {
                        Dtype::BF16 => random_matrix_bf16(&mut rng, rows, columns, scale),
                        _ => random_matrix(&mut rng, rows, columns, scale),
                    },
                ));
            }
        }
    }
    let views = tensors
        .iter()
        .map(|(name, shape, dtype, bytes)| {
            Ok((name.clone(), TensorView::new(*dtype, shape.clone(), bytes)?))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use moemesh_core::compute::CpuBackend;
    use moemesh_core::layer::MoeLayer;
    use moemesh_core::model::checkpoint::Checkpoint;

    use super::*;

    #[test]
    fn synthetic_checkpoint_loads_as_mixtral() {
        let dir = tempfile::tempdir().unwrap();
        let shape = SyntheticShape {
            hidden_size: 16,
            intermediate_size: 24,
            layers: 2,
            experts: 4,
            top_k: 2,
        };
        write_mixtral(dir.path(), shape, 1).unwrap();
        let checkpoint = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(checkpoint.config().moe_layers(), vec![0, 1]);
        let layer = MoeLayer::load(&checkpoint, 1, &CpuBackend::new(1).unwrap()).unwrap();
        let output = layer.forward(&[0.5; 32], 2).unwrap();
        assert!(
            output.iter().all(|value| value.is_finite())
                && output.iter().any(|&value| value != 0.0)
        );
    }
}
