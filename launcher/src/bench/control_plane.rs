//! `moemesh bench-control-plane`: the control plane of a large cluster on
//! one machine.
//!
//! Three coordinator processes (a Raft group); in this process, N simulated
//! expert nodes ([`fleet`]: register with the experts they serve,
//! heartbeat, report placed replicas ready) and M simulated routers
//! ([`watchers`]: follow the placement), all through the SDK's
//! coordinator client, over gRPC. The model is described by a config
//! alone (DeepSeek-V3's shape by default); no weights are read. The bench
//! then moves K replicas, as a rebalance does, and reports what the
//! placement streams cost, how fast changes reach every watcher, what the
//! coordinators spent, how the Raft log grew, and how a watcher that
//! missed many epochs catches up.

mod fleet;
mod watchers;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use moemesh_client::{CoordinatorClient, TlsArgs};
use moemesh_proto::LayerExperts;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::json;

use fleet::{Fleet, FleetSpec, node_id};
use watchers::{CatchUp, Laggard, Seen, Watchers};

use crate::local_cluster::CoordinatorGroup;

#[derive(clap::Args)]
pub struct BenchControlPlaneArgs {
    /// Simulated expert nodes.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Simulated routers following the placement.
    #[arg(long, default_value_t = 1000)]
    watchers: usize,
    /// Replica moves of the measured rebalance.
    #[arg(long, default_value_t = 100)]
    moves: usize,
    /// MoE layers of the model.
    #[arg(long, default_value_t = 58)]
    layers: usize,
    /// Routed experts per layer.
    #[arg(long, default_value_t = 256)]
    experts: usize,
    /// Experts per token.
    #[arg(long, default_value_t = 8)]
    top_k: usize,
    /// Expert groups of the gate.
    #[arg(long, default_value_t = 8)]
    groups: usize,
    /// Moves in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrent_moves: usize,
    /// Epochs the catch-up watcher misses before it comes back; more moves
    /// are made after the measured ones until it has.
    #[arg(long, default_value_t = 1000)]
    catch_up_epochs: u64,
    /// Milliseconds between each node's heartbeats.
    #[arg(long, default_value_t = 1000)]
    heartbeat_ms: u64,
    /// Print one JSON object instead of the report.
    #[arg(long)]
    json: bool,
}

/// Dense layers before the first MoE layer, as in DeepSeek-V3.
const DENSE_LAYERS: usize = 3;
/// The model's id in the cluster.
const MODEL: &str = "control-plane-bench";
/// How long every watcher may take to see the last move.
const PROPAGATION_PATIENCE: Duration = Duration::from_secs(60);
/// How long heartbeats run alone to show whether they reach the log.
const QUIET_WINDOW: Duration = Duration::from_secs(5);

pub async fn run_bench_control_plane(
    args: BenchControlPlaneArgs,
    tls: &TlsArgs,
) -> anyhow::Result<()> {
    if args.nodes == 0 || args.watchers == 0 || args.layers == 0 || args.experts == 0 {
        bail!("--nodes, --watchers, --layers and --experts must be at least 1");
    }
    let checkpoint = tempfile::tempdir()?;
    write_config(checkpoint.path(), &args)?;
    eprintln!("starting 3 coordinators");
    let group = CoordinatorGroup::start(3, tls).await?;
    let result = measure(&args, &group, checkpoint.path()).await;
    group.shutdown().await;
    let report = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

/// A DeepSeek-V3 config with the shape asked for (routed experts plus one
/// shared, as moemesh places them).
fn write_config(dir: &Path, args: &BenchControlPlaneArgs) -> anyhow::Result<()> {
    let config = json!({
        "model_type": "deepseek_v3",
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "moe_intermediate_size": 2048,
        "num_hidden_layers": args.layers + DENSE_LAYERS,
        "first_k_dense_replace": DENSE_LAYERS,
        "n_routed_experts": args.experts,
        "n_shared_experts": 1,
        "num_experts_per_tok": args.top_k,
        "n_group": args.groups,
        "topk_group": (args.groups / 2).max(1),
        "norm_topk_prob": true,
        "routed_scaling_factor": 2.5,
        "hidden_act": "silu",
    });
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config)?)?;
    Ok(())
}

/// Expert (layer, expert) pairs of the model, dealt to the nodes round-robin.
fn deal_experts(args: &BenchControlPlaneArgs) -> Vec<Vec<LayerExperts>> {
    let mut serving: Vec<Vec<LayerExperts>> = vec![Vec::new(); args.nodes];
    let mut next = 0;
    for layer in DENSE_LAYERS..DENSE_LAYERS + args.layers {
        // The shared expert is expert `experts`.
        for expert in 0..=args.experts {
            let node = &mut serving[next % args.nodes];
            match node.last_mut() {
                Some(entry) if entry.layer == layer as u32 => entry.experts.push(expert as u32),
                _ => node.push(LayerExperts {
                    layer: layer as u32,
                    experts: vec![expert as u32],
                }),
            }
            next += 1;
        }
    }
    serving
}

async fn measure(
    args: &BenchControlPlaneArgs,
    group: &CoordinatorGroup,
    checkpoint: &Path,
) -> anyhow::Result<serde_json::Value> {
    let urls = group.urls.clone();
    let security = &group.security;
    let mut admin = CoordinatorClient::connect(urls.clone(), security.client_tls()?)
        .await?
        .with_call_timeout(Duration::from_secs(30));
    let leader = wait_for_leader(&mut admin).await?;
    eprintln!("registering {} expert nodes", args.nodes);
    let serving = deal_experts(args);
    let fleet = Fleet::start(
        security,
        FleetSpec {
            coordinator_urls: urls.clone(),
            model: MODEL.into(),
            checkpoint: checkpoint.to_string_lossy().into_owned(),
            serving,
            heartbeat_every: Duration::from_millis(args.heartbeat_ms),
        },
    )
    .await?;
    eprintln!("starting {} watchers", args.watchers);
    let watchers = Watchers::start(security, &urls, MODEL, args.watchers).await?;
    let laggard = Laggard::start(security, &urls, MODEL).await?;

    eprintln!("heartbeats alone for {} s", QUIET_WINDOW.as_secs());
    let quiet = quiet_window(&mut admin, &fleet).await?;

    eprintln!("moving {} replicas", args.moves);
    let before = Usage::take(group, &mut admin).await?;
    let started = Instant::now();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let move_marks = make_moves(&admin, args, args.moves, &mut rng).await?;
    let last_epoch = move_marks
        .iter()
        .map(|(epoch, _)| *epoch)
        .max()
        .unwrap_or(0);
    let all_arrived = watchers
        .wait_for_epoch(last_epoch, PROPAGATION_PATIENCE)
        .await;
    let after = Usage::take(group, &mut admin).await?;
    let marks: Vec<(u64, Instant)> = fleet
        .ready_marks()
        .into_iter()
        .filter(|(_, at)| *at >= started)
        .chain(move_marks)
        .collect();
    let seen = watchers.seen_since(started);
    let propagation = propagation_ms(&marks, &seen);
    let bytes: u64 = seen.iter().flatten().map(|seen| seen.wire_bytes).sum();
    let bytes_per_watcher_per_change = bytes as f64 / (args.watchers * args.moves.max(1)) as f64;

    let missing = args
        .catch_up_epochs
        .saturating_sub(after.epoch - laggard.epoch());
    if missing > 0 {
        // About three epochs per move: ready, drained, removed.
        let extra = missing.div_ceil(3) as usize;
        eprintln!("{extra} more moves for the catch-up watcher to miss");
        make_moves(&admin, args, extra, &mut rng).await?;
    }
    let catch_up = laggard.come_back().await?;
    drop(watchers);
    drop(fleet);
    Ok(report_json(
        args,
        Figures {
            leader,
            quiet,
            before,
            after,
            propagation,
            all_arrived,
            bytes_per_watcher_per_change,
            catch_up,
        },
    ))
}

/// The leader's id, once the group has one.
async fn wait_for_leader(admin: &mut CoordinatorClient) -> anyhow::Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = admin.cluster_status().await?;
        if status.leader_id != 0 {
            return Ok(status.leader_id);
        }
        if Instant::now() > deadline {
            bail!("the coordinators elected no leader in 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Heartbeats answered and log entries applied while nothing else happens.
#[derive(Debug, Clone, Copy)]
struct Quiet {
    heartbeats: u64,
    log_entries: u64,
}

async fn quiet_window(admin: &mut CoordinatorClient, fleet: &Fleet) -> anyhow::Result<Quiet> {
    let entries_before = applied_index(admin).await?;
    let heartbeats_before = fleet.heartbeats();
    tokio::time::sleep(QUIET_WINDOW).await;
    Ok(Quiet {
        heartbeats: fleet.heartbeats() - heartbeats_before,
        log_entries: applied_index(admin).await? - entries_before,
    })
}

/// The highest applied log index among the coordinators.
async fn applied_index(admin: &mut CoordinatorClient) -> anyhow::Result<u64> {
    let status = admin.cluster_status().await?;
    Ok(status
        .coordinators
        .iter()
        .map(|coordinator| coordinator.applied_index)
        .max()
        .unwrap_or(0))
}

/// The coordinators' CPU time and memory, the log and the epoch, at one moment.
#[derive(Debug, Clone)]
struct Usage {
    epoch: u64,
    applied_index: u64,
    /// Per coordinator (by id from 1): CPU seconds so far and peak RSS bytes.
    cpu_seconds: Vec<f64>,
    peak_rss: Vec<u64>,
}

impl Usage {
    async fn take(group: &CoordinatorGroup, admin: &mut CoordinatorClient) -> anyhow::Result<Self> {
        let status = admin.cluster_status().await?;
        let pids = group.pids();
        Ok(Self {
            epoch: status.epoch,
            applied_index: applied_index(admin).await?,
            cpu_seconds: pids
                .iter()
                .map(|pid| pid.map_or(0.0, cpu_seconds))
                .collect(),
            peak_rss: pids
                .iter()
                .map(|pid| {
                    pid.and_then(super::resident_bytes)
                        .map_or(0, |(_, peak)| peak)
                })
                .collect(),
        })
    }
}

/// User and system CPU seconds process `pid` has used.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name, which ends at the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |index: usize| {
        fields
            .get(index)
            .and_then(|field| field.parse::<u64>().ok())
    };
    // utime and stime are fields 14 and 15 of the whole line.
    let used = ticks(11).unwrap_or(0) + ticks(12).unwrap_or(0);
    // SAFETY: sysconf reads a constant of the system.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    used as f64 / per_second as f64
}

/// Moves `count` random replicas, `--concurrent-moves` at a time, each to a
/// node that does not hold its expert; returns (epoch after the move, when
/// its answer came) for each.
async fn make_moves(
    admin: &CoordinatorClient,
    args: &BenchControlPlaneArgs,
    count: usize,
    rng: &mut impl Rng,
) -> anyhow::Result<Vec<(u64, Instant)>> {
    let placement = admin.clone().show_placement(MODEL, None).await?;
    let mut experts = placement.experts;
    experts.shuffle(rng);
    if experts.len() < count {
        bail!(
            "{count} moves asked for, but the model has {} experts",
            experts.len()
        );
    }
    let plans: Vec<_> = experts
        .into_iter()
        .take(count)
        .map(|placement| {
            let from = placement.replicas[0].node.clone();
            let to = loop {
                let candidate = node_id(rng.random_range(0..args.nodes));
                if placement
                    .replicas
                    .iter()
                    .all(|replica| replica.node != candidate)
                {
                    break candidate;
                }
            };
            (placement.layer, placement.expert, from, to)
        })
        .collect();
    let moves = futures::stream::iter(plans)
        .map(|(layer, expert, from, to)| {
            let mut admin = admin.clone();
            async move {
                let answer = admin
                    .move_replica(MODEL, layer, expert, &from, &to)
                    .await
                    .with_context(|| format!("moving layer {layer} expert {expert} to {to}"))?;
                anyhow::Ok((answer.epoch, Instant::now()))
            }
        })
        .buffer_unordered(args.concurrent_moves.max(1));
    futures::pin_mut!(moves);
    let mut marks = Vec::with_capacity(count);
    while let Some(mark) = moves.next().await {
        marks.push(mark?);
        if marks.len() % 25 == 0 || marks.len() == count {
            eprintln!("  {}/{count} moves done", marks.len());
        }
    }
    Ok(marks)
}

/// For each change (the epoch it made, when the leader answered the call
/// that made it), the time until the last watcher had it: p50, p99 and max
/// in milliseconds, over the changes.
fn propagation_ms(marks: &[(u64, Instant)], seen: &[Vec<Seen>]) -> Option<[f64; 3]> {
    let mut latencies: Vec<Duration> = marks
        .iter()
        .map(|(epoch, committed)| {
            seen.iter()
                .map(|log| {
                    log.iter()
                        .find(|seen| seen.epoch >= *epoch)
                        .map_or(Duration::MAX, |seen| {
                            seen.at.saturating_duration_since(*committed)
                        })
                })
                .max()
                .unwrap_or(Duration::ZERO)
        })
        .collect();
    if latencies.is_empty() {
        return None;
    }
    latencies.sort();
    let ms = |fraction| crate::stats::percentile(&latencies, fraction).as_secs_f64() * 1e3;
    Some([ms(0.5), ms(0.99), ms(1.0)])
}

/// What the bench measured, for the report.
struct Figures {
    leader: u64,
    quiet: Quiet,
    before: Usage,
    after: Usage,
    propagation: Option<[f64; 3]>,
    all_arrived: bool,
    bytes_per_watcher_per_change: f64,
    catch_up: CatchUp,
}

fn report_json(args: &BenchControlPlaneArgs, figures: Figures) -> serde_json::Value {
    let Figures {
        before,
        after,
        quiet,
        catch_up,
        ..
    } = &figures;
    let leader = figures.leader;
    let leader_index = (leader as usize).saturating_sub(1);
    let cpu: Vec<f64> = after
        .cpu_seconds
        .iter()
        .zip(&before.cpu_seconds)
        .map(|(after, before)| after - before)
        .collect();
    let log_growth = after.applied_index - before.applied_index;
    let [p50, p99, max] = figures.propagation.unwrap_or([f64::NAN; 3]);
    json!({
        "nodes": args.nodes,
        "watchers": args.watchers,
        "moves": args.moves,
        "moe_layers": args.layers,
        "experts_per_layer": args.experts + 1,
        "bytes_per_watcher_per_change": figures.bytes_per_watcher_per_change,
        "propagation_p50_ms": p50,
        "propagation_p99_ms": p99,
        "propagation_max_ms": max,
        "every_watcher_saw_every_change": figures.all_arrived,
        "epochs_during_moves": after.epoch - before.epoch,
        "leader_id": leader,
        "leader_peak_rss_bytes": after.peak_rss.get(leader_index).copied().unwrap_or(0),
        "coordinator_peak_rss_bytes": after.peak_rss,
        "leader_cpu_seconds_during_moves": cpu.get(leader_index).copied().unwrap_or(0.0),
        "coordinator_cpu_seconds_during_moves": cpu,
        "log_entries_during_moves": log_growth,
        "log_entries_per_move": log_growth as f64 / args.moves.max(1) as f64,
        "quiet_heartbeats": quiet.heartbeats,
        "quiet_log_entries": quiet.log_entries,
        "log_entries_per_heartbeat": quiet.log_entries as f64 / quiet.heartbeats.max(1) as f64,
        "catch_up_epochs_missed": catch_up.epochs_missed,
        "catch_up_was_snapshot": catch_up.first.snapshot,
        "catch_up_bytes": catch_up.first.wire_bytes,
        "catch_up_ms": catch_up.took.as_secs_f64() * 1e3,
        "catch_up_matches_snapshot": catch_up.matches_snapshot,
        "snapshot_bytes": catch_up.snapshot_bytes,
    })
}

fn print_report(report: &serde_json::Value) {
    let number = |key: &str| report[key].as_f64().unwrap_or(f64::NAN);
    println!(
        "control plane: {} nodes, {} watchers, {} moves; {} MoE layers x {} experts",
        report["nodes"],
        report["watchers"],
        report["moves"],
        report["moe_layers"],
        report["experts_per_layer"]
    );
    let goals = [
        (
            "bytes_per_watcher_per_change",
            "<= 300",
            number("bytes_per_watcher_per_change") <= 300.0,
        ),
        (
            "propagation_p99_ms",
            "<= 500",
            number("propagation_p99_ms") <= 500.0,
        ),
        (
            "leader_peak_rss_bytes",
            "<= 512 MiB",
            number("leader_peak_rss_bytes") <= 512.0 * MIB,
        ),
        (
            "log_entries_per_heartbeat",
            "= 0",
            number("log_entries_per_heartbeat") == 0.0,
        ),
    ];
    for (key, goal, met) in goals {
        let verdict = if met { "met" } else { "MISSED" };
        println!(
            "  {key:<38} {:>16}   goal {goal:<10} {verdict}",
            shown(key, &report[key])
        );
    }
    for key in [
        "propagation_p50_ms",
        "propagation_max_ms",
        "every_watcher_saw_every_change",
        "epochs_during_moves",
        "log_entries_per_move",
        "quiet_heartbeats",
        "leader_cpu_seconds_during_moves",
        "coordinator_cpu_seconds_during_moves",
        "coordinator_peak_rss_bytes",
        "catch_up_epochs_missed",
        "catch_up_was_snapshot",
        "catch_up_bytes",
        "catch_up_ms",
        "catch_up_matches_snapshot",
        "snapshot_bytes",
    ] {
        println!("  {key:<38} {:>16}", shown(key, &report[key]));
    }
}

const MIB: f64 = 1024.0 * 1024.0;

/// A figure of the report as people read it: memory in MiB, times and
/// rates with one or two decimals.
fn shown(key: &str, value: &serde_json::Value) -> String {
    if let Some(values) = value.as_array() {
        let parts: Vec<String> = values.iter().map(|value| shown(key, value)).collect();
        return parts.join(", ");
    }
    let Some(number) = value
        .as_f64()
        .filter(|_| !value.is_u64() || key.ends_with("rss_bytes"))
    else {
        return value.to_string();
    };
    if key.ends_with("rss_bytes") {
        format!("{:.0} MiB", number / MIB)
    } else if key.ends_with("_seconds_during_moves") {
        format!("{number:.2} s")
    } else if key.ends_with("_ms") {
        format!("{number:.1} ms")
    } else {
        format!("{number:.1}")
    }
}
