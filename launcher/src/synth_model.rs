//! `moemesh synth-model`: writes a random Mixtral-shaped checkpoint with
//! the real tensor names, to try moemesh or measure it at a chosen scale
//! without downloading weights.

use std::path::PathBuf;

use anyhow::Context;

use crate::synthetic::{SyntheticShape, write_mixtral, write_mixtral_bf16};

#[derive(clap::Args)]
pub struct SynthModelArgs {
    /// Directory to write `config.json` and `model.safetensors` into
    /// (created if missing).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = SyntheticShape::DEMO.hidden_size)]
    hidden_size: usize,
    /// Each expert's intermediate size.
    #[arg(long, default_value_t = SyntheticShape::DEMO.intermediate_size)]
    intermediate_size: usize,
    /// MoE layers.
    #[arg(long, default_value_t = SyntheticShape::DEMO.layers)]
    layers: usize,
    /// Experts per layer.
    #[arg(long, default_value_t = SyntheticShape::DEMO.experts)]
    experts: usize,
    /// Experts per token.
    #[arg(long, default_value_t = SyntheticShape::DEMO.top_k)]
    top_k: usize,
    /// Store the experts' weights in bf16 (as GPU checkpoints are), not f32.
    #[arg(long)]
    bf16: bool,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

pub fn run_synth_model(args: SynthModelArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.top_k >= 1 && args.top_k <= args.experts,
        "--top-k must be between 1 and --experts ({})",
        args.experts
    );
    let shape = SyntheticShape {
        hidden_size: args.hidden_size,
        intermediate_size: args.intermediate_size,
        layers: args.layers,
        experts: args.experts,
        top_k: args.top_k,
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    if args.bf16 {
        write_mixtral_bf16(&args.out, shape, args.seed)?;
    } else {
        write_mixtral(&args.out, shape, args.seed)?;
    }
    println!("{}", args.out.display());
    Ok(())
}
