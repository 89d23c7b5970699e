//! `moemesh bench-device`: one expert node's compute backend on a device,
//! measured in process and printed as one JSON object (the GPU check,
//! `scripts/gpu-check.sh`, adds PyTorch's figures beside it):
//!
//! - correctness: every expert of the first MoE layer of each test
//!   checkpoint on the device against the CPU backend (relative L2), and
//!   whether a row's output is the same bits alone and in a batch;
//! - throughput: a top-k batch of `--tokens` at the model's scale;
//! - decode: the latency of `--decode-tokens`, with the bytes of the
//!   experts it touches (the weight-streaming bound's numerator);
//! - Expert Buffering: the same batches with a budget of a fraction of the
//!   experts: hit rate, bytes paged in, throughput.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use moemesh_core::compute::{
    BackendOptions, ComputeBackend, CpuBackend, Device, Expert, ExpertWork, WeightFormat,
    open_backend,
};
use moemesh_core::model::checkpoint::Checkpoint;
use moemesh_expert_node::residency::Residency;
use moemesh_expert_node::worker::{ComputeJob, ExpertAssignment};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use super::figures::Samples;
use crate::stats::{random_hidden, relative_l2};

#[derive(clap::Args)]
pub struct BenchDeviceArgs {
    /// The device to measure.
    #[arg(long, default_value = "cuda:0")]
    device: Device,
    /// Checkpoint to measure throughput, decode and buffering on (make one
    /// at Mixtral scale with `moemesh synth-model --bf16 --hidden-size 4096
    /// --intermediate-size 14336`).
    #[arg(long)]
    model: PathBuf,
    /// Test checkpoints to check correctness on: every directory here with
    /// a config.json (the repository's tests/fixtures).
    #[arg(long)]
    fixtures: Option<PathBuf>,
    /// Tokens per batch for throughput.
    #[arg(long, default_value_t = 4096)]
    tokens: usize,
    /// Tokens per batch for decode latency.
    #[arg(long, default_value_t = 8)]
    decode_tokens: usize,
    /// Timed repetitions of each figure (after two untimed ones).
    #[arg(long, default_value_t = 10)]
    repeats: usize,
    /// Expert Buffering's budget, as a fraction of the layer's experts.
    #[arg(long, default_value_t = 0.5)]
    budget_fraction: f64,
}

pub fn run_bench_device(args: BenchDeviceArgs) -> anyhow::Result<()> {
    moemesh_core::compute::device::probe_device(args.device)?;
    let mut report = serde_json::Map::new();
    report.insert("device".into(), json!(args.device.to_string()));
    if let Some(fixtures) = &args.fixtures {
        report.insert("correctness".into(), check_fixtures(&args, fixtures)?);
    }
    let checkpoint = Arc::new(Checkpoint::open(&args.model)?);
    let layer = first_moe_layer(&checkpoint)?;
    let device = open_device(&args)?;
    let experts = load_layer(device.as_ref(), &checkpoint, layer)?;
    let mut rng = StdRng::seed_from_u64(17);
    report.insert(
        "throughput".into(),
        measure_batch(
            &args,
            &checkpoint,
            device.as_ref(),
            &experts,
            args.tokens,
            &mut rng,
        )?,
    );
    report.insert(
        "decode".into(),
        measure_batch(
            &args,
            &checkpoint,
            device.as_ref(),
            &experts,
            args.decode_tokens,
            &mut rng,
        )?,
    );
    drop(experts);
    report.insert(
        "buffering".into(),
        measure_buffering(&args, &checkpoint, layer, &mut rng)?,
    );
    println!("{}", Value::Object(report));
    Ok(())
}

fn open_device(args: &BenchDeviceArgs) -> anyhow::Result<Arc<dyn ComputeBackend>> {
    Ok(open_backend(BackendOptions {
        device: args.device,
        threads: 0,
        weight_format: WeightFormat::Bf16,
        host_budget: None,
    })?)
}

fn first_moe_layer(checkpoint: &Checkpoint) -> anyhow::Result<usize> {
    checkpoint
        .config()
        .moe_layers()
        .into_iter()
        .next()
        .context("the model has no MoE layer")
}

/// Every routed expert of `layer`, resident on `backend`.
fn load_layer(
    backend: &dyn ComputeBackend,
    checkpoint: &Checkpoint,
    layer: usize,
) -> anyhow::Result<Vec<Arc<dyn Expert>>> {
    (0..checkpoint.config().num_experts as u32)
        .map(|expert| Ok(backend.page_in(checkpoint, layer, expert)?))
        .collect()
}

/// A batch of `tokens` random rows, each routed to `top_k` distinct random
/// experts with random weights: per expert, its rows and weights.
fn random_routing(
    rng: &mut StdRng,
    tokens: usize,
    experts: usize,
    top_k: usize,
) -> Vec<(Vec<u32>, Vec<f32>)> {
    let mut routing = vec![(Vec::new(), Vec::new()); experts];
    for token in 0..tokens as u32 {
        let mut chosen = Vec::with_capacity(top_k);
        while chosen.len() < top_k.min(experts) {
            let expert = rng.random_range(0..experts);
            if !chosen.contains(&expert) {
                chosen.push(expert);
            }
        }
        for expert in chosen {
            routing[expert].0.push(token);
            routing[expert].1.push(rng.random_range(0f32..1.0));
        }
    }
    for (rows, weights) in &mut routing {
        let mut pairs: Vec<(u32, f32)> =
            rows.iter().copied().zip(weights.iter().copied()).collect();
        pairs.sort_by_key(|&(row, _)| row);
        *rows = pairs.iter().map(|&(row, _)| row).collect();
        *weights = pairs.iter().map(|&(_, weight)| weight).collect();
    }
    routing
}

fn work<'a>(
    experts: &'a [Arc<dyn Expert>],
    routing: &'a [(Vec<u32>, Vec<f32>)],
) -> Vec<ExpertWork<'a>> {
    experts
        .iter()
        .zip(routing)
        .filter(|(_, (rows, _))| !rows.is_empty())
        .map(|(expert, (rows, weights))| ExpertWork {
            expert: expert.as_ref(),
            rows,
            weights,
        })
        .collect()
}

/// FLOPs of the expert FFN over `rows` token-expert pairs.
fn ffn_flops(checkpoint: &Checkpoint, rows: usize) -> f64 {
    let config = checkpoint.config();
    2.0 * rows as f64 * config.expert_weight_count(0) as f64
}

/// Times `expert_outputs` on a batch of `tokens`: the host-to-host time,
/// transfers included, the compute alone where the backend can tell it,
/// and the rows each expert took.
fn measure_batch(
    args: &BenchDeviceArgs,
    checkpoint: &Checkpoint,
    backend: &dyn ComputeBackend,
    experts: &[Arc<dyn Expert>],
    tokens: usize,
    rng: &mut StdRng,
) -> anyhow::Result<Value> {
    let config = checkpoint.config();
    let hidden = config.hidden_size;
    let routing = random_routing(rng, tokens, experts.len(), config.top_k);
    let input = random_hidden(rng, tokens, hidden);
    let work = work(experts, &routing);
    let mut times = Samples::default();
    for repeat in 0..args.repeats + 2 {
        let started = Instant::now();
        let outputs = backend.expert_outputs(&input, hidden, &work)?;
        let elapsed = started.elapsed().as_secs_f64();
        std::hint::black_box(outputs);
        if repeat >= 2 {
            times.push(elapsed);
        }
    }
    let compute_only = backend.time_compute_only(&input, hidden, &work, args.repeats);
    let pairs: usize = routing.iter().map(|(rows, _)| rows.len()).sum();
    let touched = routing.iter().filter(|(rows, _)| !rows.is_empty()).count();
    let expert_bytes = backend.resident_bytes(config, 0);
    let median = times.median().unwrap_or(f64::NAN);
    let flops = ffn_flops(checkpoint, pairs);
    let device = match compute_only {
        None => json!(null),
        Some(Ok(ms)) => json!({"median_ms": ms, "tflops": flops / (ms * 1e-3) / 1e12}),
        Some(Err(error)) => json!({"error": error.to_string()}),
    };
    Ok(json!({
        "tokens": tokens,
        "rows_per_expert": routing.iter().map(|(rows, _)| rows.len()).collect::<Vec<_>>(),
        "hidden_size": hidden,
        "intermediate_size": config.expert_intermediate_size,
        "median_ms": median * 1e3,
        "tflops": flops / median / 1e12,
        // The compute alone, input already on the device (GPU backends).
        "compute_only": device,
        "touched_expert_bytes": touched as u64 * expert_bytes,
    }))
}

/// Every routed expert of the first MoE layer of each checkpoint under
/// `fixtures`, on the device and on the CPU, on the same random batch.
fn check_fixtures(args: &BenchDeviceArgs, fixtures: &Path) -> anyhow::Result<Value> {
    let mut results = serde_json::Map::new();
    let mut names: Vec<PathBuf> = std::fs::read_dir(fixtures)
        .with_context(|| format!("cannot read {}", fixtures.display()))?
        .filter_map(|entry| Some(entry.ok()?.path()))
        .filter(|path| path.join("config.json").exists())
        .collect();
    names.sort();
    let device = open_device(args)?;
    let cpu = CpuBackend::new(0)?;
    let mut rng = StdRng::seed_from_u64(23);
    for dir in names {
        let checkpoint = Checkpoint::open(&dir)?;
        let layer = first_moe_layer(&checkpoint)?;
        let config = checkpoint.config();
        let hidden = config.hidden_size;
        let on_device = load_layer(device.as_ref(), &checkpoint, layer)?;
        let on_cpu = load_layer(&cpu, &checkpoint, layer)?;
        let tokens = 96;
        let routing = random_routing(&mut rng, tokens, on_device.len(), config.top_k);
        let input = random_hidden(&mut rng, tokens, hidden);
        let got = device.expert_outputs(&input, hidden, &work(&on_device, &routing))?;
        let want = cpu.expert_outputs(&input, hidden, &work(&on_cpu, &routing))?;
        // The first expert's first row, alone: the same bits as in the batch?
        let first = routing.iter().position(|(rows, _)| !rows.is_empty());
        let batch_invariant = match first {
            None => false,
            Some(expert) => {
                let row = routing[expert].0[0] as usize;
                let alone_input = &input[row * hidden..(row + 1) * hidden];
                let alone = device.expert_outputs(
                    alone_input,
                    hidden,
                    &[ExpertWork {
                        expert: on_device[expert].as_ref(),
                        rows: &[0],
                        weights: &[1.0],
                    }],
                )?;
                let offset: usize = routing[..expert].iter().map(|(rows, _)| rows.len()).sum();
                alone[..] == got[offset * hidden..(offset + 1) * hidden]
            }
        };
        let name = dir
            .file_name()
            .map_or_else(String::new, |name| name.to_string_lossy().into_owned());
        results.insert(
            name,
            json!({
                "relative_l2": relative_l2(&got, &want),
                "batch_invariant": batch_invariant,
                "finite": got.iter().all(|value| value.is_finite()),
            }),
        );
    }
    Ok(Value::Object(results))
}

/// The throughput batches through an expert node's residency with a
/// budget of `--budget-fraction` of the layer's experts.
fn measure_buffering(
    args: &BenchDeviceArgs,
    checkpoint: &Arc<Checkpoint>,
    layer: usize,
    rng: &mut StdRng,
) -> anyhow::Result<Value> {
    let config = checkpoint.config();
    let device = open_device(args)?;
    let experts = config.num_experts;
    let expert_bytes = device.resident_bytes(config, 0);
    let budget = (experts as f64 * args.budget_fraction).floor() as u64 * expert_bytes;
    let mut residency = Residency::new(Arc::clone(checkpoint), Arc::clone(&device), Some(budget));
    for expert in 0..experts as u32 {
        residency.serve((layer, expert), None)?;
    }
    let hidden = config.hidden_size;
    let mut times = Samples::default();
    let mut tokens_done = 0;
    for repeat in 0..args.repeats + 2 {
        let routing = random_routing(rng, args.tokens, experts, config.top_k);
        let job = ComputeJob {
            layer,
            input: random_hidden(rng, args.tokens, hidden),
            assignments: routing
                .into_iter()
                .enumerate()
                .filter(|(_, (rows, _))| !rows.is_empty())
                .map(|(expert, (rows, weights))| ExpertAssignment {
                    expert: expert as u32,
                    rows,
                    weights,
                })
                .collect(),
        };
        let started = Instant::now();
        std::hint::black_box(residency.compute(&job, hidden)?);
        if repeat >= 2 {
            times.push(started.elapsed().as_secs_f64());
            tokens_done += args.tokens;
        }
    }
    let counters = residency.counters();
    let lookups = (counters.hits + counters.misses).max(1);
    let total_s: f64 = times.total();
    Ok(json!({
        "budget_bytes": budget,
        "experts_in_budget": budget / expert_bytes.max(1),
        "hit_rate": counters.hits as f64 / lookups as f64,
        "bytes_paged_in": counters.bytes_paged_in,
        "computed_where_waiting": counters.computed_where_waiting,
        "median_ms": times.median().unwrap_or(f64::NAN) * 1e3,
        "tokens_per_s": tokens_done as f64 / total_s,
    }))
}
