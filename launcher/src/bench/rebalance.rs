//! `moemesh bench-rebalance`: a skewed workload before, during and after
//! one live rebalance.
//!
//! 64 experts, top-2, expert popularity following Zipf (exponent 1.2), four
//! expert nodes as separate processes with slots for 16 + 4 experts each,
//! 512-token batches. The gate is calibrated so that the traffic the bench
//! sends has exactly that popularity. The report gives, before and after
//! one rebalance, the busiest node's load over the mean (token-expert
//! pairs each node computed), throughput and latency percentiles, and the
//! throughput while the rebalance runs (in half-second buckets: it must
//! never reach zero, and no request may fail).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use moemesh_client::{Client, CoordinatorClient, TlsArgs};
use rand::{Rng, SeedableRng};
use serde_json::json;

use super::expert_node_info;
use crate::local_cluster::{LocalCluster, UpArgs};
use crate::stats::percentile;
use crate::synthetic::{SyntheticShape, write_mixtral_with_gate};

#[derive(clap::Args)]
pub struct BenchRebalanceArgs {
    /// Routed experts.
    #[arg(long, default_value_t = 64)]
    experts: usize,
    /// Zipf exponent of expert popularity.
    #[arg(long, default_value_t = 1.2)]
    zipf: f64,
    /// Expert nodes (separate processes).
    #[arg(long, default_value_t = 4)]
    nodes: usize,
    /// Expert slots per node: its memory holds this many experts.
    #[arg(long, default_value_t = 20)]
    slots: usize,
    /// Hidden size of the synthetic model.
    #[arg(long, default_value_t = 512)]
    hidden: usize,
    /// Intermediate size of each expert.
    #[arg(long, default_value_t = 1408)]
    intermediate: usize,
    /// Tokens per request.
    #[arg(long, default_value_t = 512)]
    tokens: usize,
    /// Requests per measured phase (before and after).
    #[arg(long, default_value_t = 60)]
    requests: usize,
    /// Requests in flight.
    #[arg(long, default_value_t = 2)]
    in_flight: usize,
    /// Print one JSON object instead of the report.
    #[arg(long)]
    json: bool,
}

/// Expert `e`'s share of routed pairs under Zipf: rank `e + 1`.
fn zipf_shares(experts: usize, exponent: f64) -> Vec<f64> {
    let weights: Vec<f64> = (1..=experts)
        .map(|rank| (rank as f64).powf(-exponent))
        .collect();
    let total: f64 = weights.iter().sum();
    weights.iter().map(|weight| weight / total).collect()
}

/// Random token rows; column 0 is always 1, so the gate's column 0 acts
/// as a per-expert bias.
fn tokens(rng: &mut impl Rng, count: usize, hidden: usize) -> Vec<f32> {
    (0..count * hidden)
        .map(|index| {
            if index % hidden == 0 {
                1.0
            } else {
                rng.random_range(-1.7f32..1.7)
            }
        })
        .collect()
}

/// Top-`k` experts of each token under `gate` (`[experts, hidden]`).
fn route_counts(gate: &[f32], hidden: usize, rows: &[f32], k: usize) -> Vec<f64> {
    let experts = gate.len() / hidden;
    let mut counts = vec![0f64; experts];
    let mut logits = vec![0f32; experts];
    for row in rows.chunks_exact(hidden) {
        for (logit, weights) in logits.iter_mut().zip(gate.chunks_exact(hidden)) {
            *logit = weights.iter().zip(row).map(|(w, x)| w * x).sum();
        }
        let mut order: Vec<usize> = (0..experts).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        for &expert in &order[..k] {
            counts[expert] += 1.0;
        }
    }
    counts
}

/// A gate whose top-`k` routing of [`tokens`] follows `shares`: random
/// weights of unit logit spread, and a bias column fitted by repeated
/// routing of a sample.
fn calibrated_gate(shares: &[f64], hidden: usize, k: usize, seed: u64) -> Vec<f32> {
    let experts = shares.len();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // x in ±1.7 has variance ~1: weights of variance 1/hidden give logits
    // of unit spread around the bias.
    let spread = (3.0 / hidden as f32).sqrt();
    let mut gate: Vec<f32> = (0..experts * hidden)
        .map(|index| {
            if index % hidden == 0 {
                0.0
            } else {
                rng.random_range(-spread..spread)
            }
        })
        .collect();
    let sample = tokens(&mut rng, 4096, hidden);
    let target: Vec<f64> = shares
        .iter()
        .map(|share| share * 4096.0 * k as f64)
        .collect();
    for _ in 0..40 {
        let counts = route_counts(&gate, hidden, &sample, k);
        for expert in 0..experts {
            let ratio = target[expert] / counts[expert].max(0.5);
            gate[expert * hidden] += 0.5 * ratio.ln() as f32;
        }
    }
    gate
}

/// What one phase measured.
#[derive(Debug, Clone, serde::Serialize)]
struct Phase {
    tokens_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Pairs each node computed during the phase.
    node_pairs: Vec<u64>,
    max_over_mean: f64,
    failures: usize,
}

/// Token-expert pairs each node has computed so far.
async fn node_pairs(cluster: &LocalCluster) -> anyhow::Result<Vec<u64>> {
    let nodes = expert_node_info(cluster).await?;
    Ok(nodes
        .iter()
        .map(|(_, info)| info.load.iter().map(|load| load.tokens).sum())
        .collect())
}

/// Sends `requests` requests, `in_flight` at a time, recording each one's
/// completion time and latency.
async fn drive(
    client: &Client,
    inputs: &[Arc<Vec<f32>>],
    hidden: usize,
    requests: usize,
    in_flight: usize,
    stop: Option<Arc<AtomicBool>>,
) -> (Vec<(Instant, Duration)>, usize) {
    let sent = Arc::new(AtomicU64::new(0));
    let mut streams = Vec::new();
    for stream in 0..in_flight {
        let mut client = client.clone();
        let inputs = inputs.to_vec();
        let sent = Arc::clone(&sent);
        let stop = stop.clone();
        streams.push(tokio::spawn(async move {
            let mut done = Vec::new();
            let mut failures = 0;
            loop {
                let index = sent.fetch_add(1, Ordering::Relaxed) as usize;
                let stopped = stop
                    .as_ref()
                    .is_some_and(|stop| stop.load(Ordering::Relaxed));
                if (stop.is_none() && index >= requests) || stopped {
                    break;
                }
                let input = &inputs[(index + stream) % inputs.len()];
                let started = Instant::now();
                match client.forward_f32("", 0, input, hidden).await {
                    Ok(_) => done.push((Instant::now(), started.elapsed())),
                    Err(error) => {
                        failures += 1;
                        eprintln!("request failed: {error}");
                    }
                }
            }
            (done, failures)
        }));
    }
    let mut done = Vec::new();
    let mut failures = 0;
    for stream in streams {
        let (stream_done, stream_failures) = stream.await.expect("request stream");
        done.extend(stream_done);
        failures += stream_failures;
    }
    (done, failures)
}

fn max_over_mean(pairs: &[u64]) -> f64 {
    let total: u64 = pairs.iter().sum();
    if total == 0 {
        return 1.0;
    }
    let mean = total as f64 / pairs.len() as f64;
    *pairs.iter().max().unwrap_or(&0) as f64 / mean
}

async fn phase(
    cluster: &LocalCluster,
    client: &Client,
    inputs: &[Arc<Vec<f32>>],
    args: &BenchRebalanceArgs,
) -> anyhow::Result<Phase> {
    let before = node_pairs(cluster).await?;
    let started = Instant::now();
    let (done, failures) = drive(
        client,
        inputs,
        args.hidden,
        args.requests,
        args.in_flight,
        None,
    )
    .await;
    let elapsed = started.elapsed();
    let after = node_pairs(cluster).await?;
    let node_pairs: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    let mut latencies: Vec<Duration> = done.iter().map(|&(_, latency)| latency).collect();
    latencies.sort();
    let ms = |fraction| percentile(&latencies, fraction).as_secs_f64() * 1e3;
    Ok(Phase {
        tokens_per_s: (done.len() * args.tokens) as f64 / elapsed.as_secs_f64(),
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        max_over_mean: max_over_mean(&node_pairs),
        node_pairs,
        failures,
    })
}

pub async fn run_bench_rebalance(args: BenchRebalanceArgs, tls: &TlsArgs) -> anyhow::Result<()> {
    if args.nodes == 0
        || args.slots * args.nodes < args.experts
        || args.requests == 0
        || args.in_flight == 0
    {
        bail!("need nodes x slots >= experts, and at least one request and one in flight");
    }
    let shares = zipf_shares(args.experts, args.zipf);
    eprintln!(
        "calibrating a gate to Zipf({}) popularity over {} experts",
        args.zipf, args.experts
    );
    let gate = calibrated_gate(&shares, args.hidden, 2, 17);
    let workdir = tempfile::Builder::new()
        .prefix("moemesh-bench-rebalance-")
        .tempdir()?;
    let model = write_model(&args, workdir.path(), &gate)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(29);
    let inputs: Vec<Arc<Vec<f32>>> = (0..8)
        .map(|_| Arc::new(tokens(&mut rng, args.tokens, args.hidden)))
        .collect();
    let measured = routed_shares(&gate, args.hidden, &inputs);
    let cluster = start_cluster(&args, tls, model).await?;
    let result = measure(&cluster, &inputs, &args).await;
    cluster.shutdown().await?;
    let measurements = result?;
    let top_shares: Vec<f64> = measured.iter().take(4).copied().collect();
    if args.json {
        print_json(&args, &top_shares, &measurements)
    } else {
        print_report(&args, &top_shares, &measurements);
        Ok(())
    }
}

/// Writes a one-layer model of `args`' shape with `gate`; returns its folder.
fn write_model(args: &BenchRebalanceArgs, workdir: &Path, gate: &[f32]) -> anyhow::Result<PathBuf> {
    let shape = SyntheticShape {
        hidden_size: args.hidden,
        intermediate_size: args.intermediate,
        layers: 1,
        experts: args.experts,
        top_k: 2,
    };
    let model = workdir.join("model");
    std::fs::create_dir(&model)?;
    eprintln!("writing the model to {}", model.display());
    write_mixtral_with_gate(&model, shape, 23, Some(gate))?;
    Ok(model)
}

/// Each expert's share of the pairs `gate` routes `inputs` to.
fn routed_shares(gate: &[f32], hidden: usize, inputs: &[Arc<Vec<f32>>]) -> Vec<f64> {
    let sample: Vec<f32> = inputs
        .iter()
        .flat_map(|input| input.iter().copied())
        .collect();
    let counts = route_counts(gate, hidden, &sample, 2);
    let total: f64 = counts.iter().sum();
    counts.iter().map(|count| count / total).collect()
}

/// `args.nodes` expert nodes whose memory holds `args.slots` experts each,
/// three coordinators and a router.
async fn start_cluster(
    args: &BenchRebalanceArgs,
    tls: &TlsArgs,
    model: PathBuf,
) -> anyhow::Result<LocalCluster> {
    let expert_bytes = 3 * args.hidden * args.intermediate * size_of::<f32>();
    LocalCluster::start(
        &UpArgs {
            model,
            expert_nodes: args.nodes,
            replicas: 1,
            router_addr: "127.0.0.1:0".into(),
            threads_per_node: 0,
            model_id: Some("skewed".into()),
            coordinators: 3,
            announce: !args.json,
            // Slots for `slots` experts, and a little more for bookkeeping.
            node_memory_bytes: Some((args.slots * expert_bytes + expert_bytes / 2) as u64),
            tiers: Default::default(),
        },
        tls,
    )
    .await
}

fn print_json(
    args: &BenchRebalanceArgs,
    top_shares: &[f64],
    measurements: &Measurements,
) -> anyhow::Result<()> {
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({
            "experts": args.experts,
            "zipf": args.zipf,
            "nodes": args.nodes,
            "slots": args.slots,
            "tokens": args.tokens,
            "in_flight": args.in_flight,
            "hottest_expert_shares": top_shares,
            "before": measurements.before,
            "during": measurements.during,
            "after": measurements.after,
            "rebalance": measurements.rebalance,
        }))?
    );
    Ok(())
}

fn print_report(args: &BenchRebalanceArgs, top_shares: &[f64], measurements: &Measurements) {
    let Measurements {
        before,
        during,
        after,
        rebalance,
    } = measurements;
    println!(
        "skewed workload: {} experts, top-2, Zipf({}) popularity (hottest experts take {:.1}%, {:.1}%, {:.1}%, {:.1}% of pairs), {} nodes x {} slots, {} tokens per request, {} in flight",
        args.experts,
        args.zipf,
        top_shares[0] * 100.0,
        top_shares[1] * 100.0,
        top_shares[2] * 100.0,
        top_shares[3] * 100.0,
        args.nodes,
        args.slots,
        args.tokens,
        args.in_flight
    );
    println!();
    println!(
        "{:<28} {:>10} {:>12} {:>10} {:>10}   pairs per node",
        "", "max/mean", "tokens/s", "p50 ms", "p99 ms"
    );
    for (name, phase) in [
        ("before (static placement)", before),
        ("after one rebalance", after),
    ] {
        println!(
            "{:<28} {:>10.3} {:>12.0} {:>10.1} {:>10.1}   {:?}",
            name,
            phase.max_over_mean,
            phase.tokens_per_s,
            phase.p50_ms,
            phase.p99_ms,
            phase.node_pairs
        );
    }
    println!(
        "during the rebalance ({:.1} s, {} replicas added, {} removed): {:.0} tokens/s, lowest half-second {:.0} tokens/s, {} failed requests",
        rebalance["seconds"].as_f64().unwrap_or(0.0),
        rebalance["added"],
        rebalance["removed"],
        during["tokens_per_s"].as_f64().unwrap_or(0.0),
        during["lowest_half_second_tokens_per_s"]
            .as_f64()
            .unwrap_or(0.0),
        during["failures"]
    );
    let cores = std::thread::available_parallelism().map_or(1, |cores| cores.get());
    if args.nodes > cores {
        println!(
            "note: {} expert nodes share this machine's {cores} cores, so throughput is bound by the cores' total work, not by the busiest node; extra replicas add work (each streams its weights per batch)",
            args.nodes
        );
    }
    println!(
        "goal max/mean <= 1.10 after: {}; higher throughput than static: {} ({:+.1}%)",
        if after.max_over_mean <= 1.10 {
            "met"
        } else {
            "MISSED"
        },
        if after.tokens_per_s > before.tokens_per_s {
            "met"
        } else {
            "MISSED"
        },
        (after.tokens_per_s / before.tokens_per_s - 1.0) * 100.0
    );
}

/// What the bench measured: the phases before and after the rebalance,
/// the traffic while it ran, and what it did.
struct Measurements {
    before: Phase,
    during: serde_json::Value,
    after: Phase,
    rebalance: serde_json::Value,
}

async fn measure(
    cluster: &LocalCluster,
    inputs: &[Arc<Vec<f32>>],
    args: &BenchRebalanceArgs,
) -> anyhow::Result<Measurements> {
    let client = Client::connect_with_tls(cluster.router_url.clone(), &cluster.tls).await?;
    let mut admin =
        CoordinatorClient::connect(cluster.coordinator_urls.clone(), cluster.tls.clone()).await?;
    // Warm up, and let the routers' reports fill the load window.
    drive(
        &client,
        inputs,
        args.hidden,
        args.in_flight * 4,
        args.in_flight,
        None,
    )
    .await;
    eprintln!("measuring the static placement");
    let before = phase(cluster, &client, inputs, args).await?;

    eprintln!("rebalancing under load");
    let stop = Arc::new(AtomicBool::new(false));
    let background = {
        let client = client.clone();
        let inputs = inputs.to_vec();
        let stop = Arc::clone(&stop);
        let (hidden, in_flight) = (args.hidden, args.in_flight);
        tokio::spawn(async move { drive(&client, &inputs, hidden, 0, in_flight, Some(stop)).await })
    };
    let started = Instant::now();
    let outcome = admin.rebalance("", false).await;
    let seconds = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let (done, failures) = background.await?;
    let outcome = outcome.context("the rebalance failed")?;
    let (added, removed) = outcome
        .layers
        .iter()
        .fold((0, 0), |(added, removed), layer| {
            (added + layer.added.len(), removed + layer.removed.len())
        });
    // Throughput while the rebalance ran, in half-second buckets.
    let mut buckets: BTreeMap<u64, usize> = (0..((seconds / 0.5).ceil() as u64).max(1))
        .map(|bucket| (bucket, 0))
        .collect();
    let mut in_window = 0;
    for &(finished, _) in &done {
        if finished < started {
            continue;
        }
        let offset = finished.duration_since(started).as_secs_f64();
        if offset <= seconds {
            in_window += 1;
            *buckets.entry((offset / 0.5) as u64).or_default() += 1;
        }
    }
    // The last bucket is partial: judge only whole ones (or the one there is).
    let whole = ((seconds / 0.5).floor() as usize).max(1);
    let lowest =
        buckets.values().take(whole).min().copied().unwrap_or(0) as f64 * args.tokens as f64 / 0.5;
    let during = json!({
        "tokens_per_s": in_window as f64 * args.tokens as f64 / seconds,
        "lowest_half_second_tokens_per_s": lowest,
        "failures": failures,
    });
    let rebalance = json!({
        "seconds": seconds,
        "added": added,
        "removed": removed,
        "moves_done": outcome.moves_done,
        "moves_failed": outcome.moves_failed,
        "max_over_mean_planned": outcome.layers.first().map(|layer| layer.max_over_mean_after),
    });
    // Routers pick up the new placement with the next epoch; give them a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    eprintln!("measuring the rebalanced placement");
    let after = phase(cluster, &client, inputs, args).await?;
    Ok(Measurements {
        before,
        during,
        after,
        rebalance,
    })
}
