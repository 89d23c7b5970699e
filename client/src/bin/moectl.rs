//! moectl: talk to a moemesh cluster from the command line.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use moemesh_client::npy::{Matrix, read_matrix, write_matrix};
use moemesh_client::{AdminClient, Client};
use serde_json::json;

/// Talk to a moemesh cluster: run layers through a router, inspect and
/// manage the cluster through any coordinator.
#[derive(Parser)]
#[command(name = "moectl", version)]
struct Cli {
    #[command(flatten)]
    tls: moemesh_client::TlsArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs one MoE layer on hidden states from a .npy file and writes the output as .npy.
    Forward(ForwardArgs),
    /// The cluster as a whole.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Models served by the cluster.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Load per node and per expert, refreshed every second until Ctrl-C.
    Top(TopArgs),
    /// The load window.
    #[command(subcommand)]
    Stats(StatsCommand),
    /// Which node holds which expert.
    #[command(subcommand)]
    Placement(PlacementCommand),
    /// Expert nodes.
    #[command(subcommand)]
    Node(NodeCommand),
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Moves every replica off a node (one at a time, no request fails) and keeps new ones away.
    Drain(DrainArgs),
}

#[derive(clap::Args)]
struct DrainArgs {
    /// The node's id.
    node: String,
    #[command(flatten)]
    admin: AdminArgs,
}

#[derive(clap::Args)]
struct ExpertArgs {
    /// Model id; defaults to the cluster's only model.
    #[arg(long, default_value = "")]
    model: String,
    /// Decoder layer index.
    #[arg(long)]
    layer: u32,
    /// Expert id (the shared expert is the one after the routed experts).
    #[arg(long)]
    expert: u32,
}

#[derive(clap::Args)]
struct MoveArgs {
    #[command(flatten)]
    expert: ExpertArgs,
    /// The node whose replica moves.
    #[arg(long)]
    from: String,
    /// The node it moves to.
    #[arg(long)]
    to: String,
    #[command(flatten)]
    admin: AdminArgs,
}

#[derive(clap::Args)]
struct ReplicateArgs {
    #[command(flatten)]
    expert: ExpertArgs,
    /// The node that gets one more replica.
    #[arg(long)]
    to: String,
    #[command(flatten)]
    admin: AdminArgs,
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Shows the coordinators, the leader and term, the placement epoch and the expert nodes.
    Status(AdminArgs),
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Registers a model from its checkpoint directory and places its experts on the ready nodes.
    Load(LoadArgs),
}

#[derive(Subcommand)]
enum StatsCommand {
    /// Writes the load window as JSON: {"model", "window_seconds",
    /// "layer_ids", "layers": [[tokens of expert 0, ...], ...], "nodes"},
    /// which `moectl placement plan --loads` reads.
    Export(ExportArgs),
}

#[derive(clap::Args)]
struct TopArgs {
    #[command(flatten)]
    admin: AdminArgs,
    /// Model id; defaults to the only model.
    #[arg(long, default_value = "")]
    model: String,
    /// Experts listed per layer, hottest first.
    #[arg(long, default_value_t = 8)]
    experts: usize,
    /// Print once and exit instead of refreshing.
    #[arg(long)]
    once: bool,
}

#[derive(clap::Args)]
struct ExportArgs {
    #[command(flatten)]
    admin: AdminArgs,
    /// Model id; defaults to the only model.
    #[arg(long, default_value = "")]
    model: String,
    /// File to write; standard output when absent.
    #[arg(long)]
    output: Option<PathBuf>,
}

#[derive(Subcommand)]
enum PlacementCommand {
    /// Lists every expert's replicas and their state.
    Show(ShowArgs),
    /// Moves one replica to another node: add, wait until it serves, drain the old one, remove it.
    Move(MoveArgs),
    /// Adds one more replica of an expert on a node and waits until it serves.
    Replicate(ReplicateArgs),
    /// Plans a balanced placement offline from recorded expert loads: how
    /// many replicas each expert gets and which node holds each.
    Plan(PlanArgs),
    /// Plans from the live load window and moves replicas to follow it,
    /// without pausing serving (--dry-run: only show the plan).
    Rebalance(RebalanceArgs),
}

#[derive(clap::Args)]
struct RebalanceArgs {
    #[command(flatten)]
    admin: AdminArgs,
    /// Model id; defaults to the only model.
    #[arg(long, default_value = "")]
    model: String,
    /// Show the plan without moving anything.
    #[arg(long)]
    dry_run: bool,
}

#[derive(clap::Args)]
struct PlanArgs {
    /// JSON of per-layer expert loads: `moectl stats export`'s output, or
    /// simply {"layers": [[load of expert 0, load of expert 1, ...], ...]}.
    #[arg(long)]
    loads: PathBuf,
    /// Expert nodes to plan for.
    #[arg(long)]
    nodes: usize,
    /// Expert slots per node (the experts its memory holds).
    #[arg(long)]
    slots: usize,
    /// Topology groups (hosts, racks) the nodes fall in: node i in group i mod G.
    /// Replicas of one expert spread over groups.
    #[arg(long, default_value_t = 1)]
    groups: usize,
    /// Routing groups of the model's experts (DeepSeek-V3's n_group); each
    /// group is kept on as few nodes as balance allows.
    #[arg(long)]
    routing_groups: Option<usize>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct AdminArgs {
    /// Any coordinator's URL.
    #[arg(
        long,
        env = "MOEMESH_COORDINATOR",
        default_value = "http://127.0.0.1:7000"
    )]
    coordinator: String,
    /// The coordinators' admin token, when they were started with one.
    #[arg(long, env = "MOEMESH_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct LoadArgs {
    /// The checkpoint directory, as the coordinators and nodes see it.
    dir: PathBuf,
    /// Model id; defaults to the directory name.
    #[arg(long, default_value = "")]
    model: String,
    /// Replicas per expert.
    #[arg(long, default_value_t = 1)]
    replicas: u32,
    #[command(flatten)]
    admin: AdminArgs,
}

#[derive(clap::Args)]
struct ShowArgs {
    /// Only this model.
    #[arg(long, default_value = "")]
    model: String,
    /// Only this layer.
    #[arg(long)]
    layer: Option<u32>,
    #[command(flatten)]
    admin: AdminArgs,
}

#[derive(clap::Args)]
struct ForwardArgs {
    /// Router URL.
    #[arg(long, env = "MOEMESH_ROUTER", default_value = "http://127.0.0.1:50051")]
    router: String,
    /// Model id; empty selects the router's only model.
    #[arg(long, default_value = "")]
    model: String,
    /// Decoder layer index (an MoE layer of the model).
    #[arg(long)]
    layer: u32,
    /// Hidden states, a float32 .npy of shape [tokens, hidden_size].
    #[arg(long)]
    input: PathBuf,
    /// Where to write the layer's output, float32 .npy of the same shape.
    #[arg(long)]
    output: PathBuf,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    cli.tls.install()?;
    match cli.command {
        Command::Forward(args) => forward(args).await,
        Command::Cluster(ClusterCommand::Status(args)) => cluster_status(args).await,
        Command::Model(ModelCommand::Load(args)) => load_model(args).await,
        Command::Placement(PlacementCommand::Show(args)) => show_placement(args).await,
        Command::Placement(PlacementCommand::Move(args)) => move_replica(args).await,
        Command::Placement(PlacementCommand::Replicate(args)) => replicate(args).await,
        Command::Placement(PlacementCommand::Plan(args)) => plan(args),
        Command::Placement(PlacementCommand::Rebalance(args)) => rebalance(args).await,
        Command::Top(args) => top(args).await,
        Command::Stats(StatsCommand::Export(args)) => export_stats(args).await,
        Command::Node(NodeCommand::Drain(args)) => drain_node(args).await,
    }
}

async fn forward(args: ForwardArgs) -> anyhow::Result<()> {
    let input = read_matrix(&args.input)?;
    let mut client = Client::connect(&args.router).await?;
    let values = client
        .forward_f32(&args.model, args.layer, &input.values, input.columns)
        .await
        .with_context(|| format!("forward of layer {} through {}", args.layer, args.router))?;
    write_matrix(
        &args.output,
        &Matrix {
            rows: input.rows,
            columns: input.columns,
            values,
        },
    )?;
    eprintln!(
        "wrote {} tokens x {} to {}",
        input.rows,
        input.columns,
        args.output.display()
    );
    Ok(())
}

async fn admin(args: &AdminArgs) -> anyhow::Result<AdminClient> {
    Ok(AdminClient::connect(&args.coordinator)
        .await
        .context("set --coordinator or MOEMESH_COORDINATOR to any coordinator's URL")?
        .with_token(args.token.clone().unwrap_or_default()))
}

async fn cluster_status(args: AdminArgs) -> anyhow::Result<()> {
    let status = admin(&args).await?.cluster_status().await?;
    if args.json {
        let value = json!({
            "leader_id": status.leader_id,
            "term": status.term,
            "epoch": status.epoch,
            "models": status.models,
            "rebalance": {
                "runs": status.rebalance_runs,
                "moves_done": status.rebalance_moves_done,
                "moves_failed": status.rebalance_moves_failed,
            },
            "coordinators": status.coordinators.iter().map(|c| json!({
                "id": c.id, "address": c.address, "role": c.role, "term": c.term,
                "leader_id": c.leader_id, "commit_index": c.commit_index, "applied_index": c.applied_index,
            })).collect::<Vec<_>>(),
            "nodes": status.nodes.iter().map(|n| json!({
                "id": n.id, "address": n.address, "group": n.group, "device": n.device,
                "memory_bytes": n.memory_bytes, "status": n.status,
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let leader = if status.leader_id == 0 {
        "none (election running)".to_string()
    } else {
        status.leader_id.to_string()
    };
    println!(
        "leader {leader}, term {}, placement epoch {}, models: {}",
        status.term,
        status.epoch,
        status.models.join(", ")
    );
    println!(
        "rebalances on this coordinator: {} runs, {} replica moves done, {} failed",
        status.rebalance_runs, status.rebalance_moves_done, status.rebalance_moves_failed
    );
    println!();
    println!(
        "{:<4} {:<28} {:<13} {:>6} {:>8} {:>8}",
        "ID", "COORDINATOR", "ROLE", "TERM", "COMMIT", "APPLIED"
    );
    for coordinator in &status.coordinators {
        println!(
            "{:<4} {:<28} {:<13} {:>6} {:>8} {:>8}",
            coordinator.id,
            coordinator.address,
            coordinator.role,
            coordinator.term,
            coordinator.commit_index,
            coordinator.applied_index
        );
    }
    println!();
    if status.nodes.is_empty() {
        println!("no expert nodes registered");
        return Ok(());
    }
    println!(
        "{:<14} {:<28} {:<10} {:<8} {:>10} {:<8}",
        "NODE", "ADDRESS", "GROUP", "DEVICE", "MEMORY", "STATUS"
    );
    for node in &status.nodes {
        println!(
            "{:<14} {:<28} {:<10} {:<8} {:>8.1}Gi {:<8}",
            node.id,
            node.address,
            node.group,
            node.device,
            node.memory_bytes as f64 / (1u64 << 30) as f64,
            node.status
        );
    }
    Ok(())
}

async fn load_model(args: LoadArgs) -> anyhow::Result<()> {
    let dir = args
        .dir
        .canonicalize()
        .with_context(|| format!("cannot find {}", args.dir.display()))?;
    let request_id = format!(
        "moectl-load-{}-{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos()
    );
    let loaded = admin(&args.admin)
        .await?
        .load_model(
            &args.model,
            &dir.to_string_lossy(),
            args.replicas,
            &request_id,
        )
        .await?;
    if args.admin.json {
        println!(
            "{}",
            json!({"model": loaded.model, "replicas_added": loaded.replicas_added, "epoch": loaded.epoch})
        );
    } else {
        println!(
            "model {} loaded: {} replicas placed, placement epoch {}",
            loaded.model, loaded.replicas_added, loaded.epoch
        );
    }
    Ok(())
}

async fn show_placement(args: ShowArgs) -> anyhow::Result<()> {
    let placement = admin(&args.admin)
        .await?
        .show_placement(&args.model, args.layer)
        .await?;
    if args.admin.json {
        let experts: Vec<_> = placement
            .experts
            .iter()
            .map(|expert| {
                json!({
                    "model": expert.model, "layer": expert.layer, "expert": expert.expert,
                    "replicas": expert.replicas.iter().map(|r| json!({"node": r.node, "state": r.state})).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"epoch": placement.epoch, "experts": experts}))?
        );
        return Ok(());
    }
    println!("placement epoch {}", placement.epoch);
    println!("{:<16} {:>5} {:>6}  REPLICAS", "MODEL", "LAYER", "EXPERT");
    for expert in &placement.experts {
        let replicas: Vec<String> = expert
            .replicas
            .iter()
            .map(|replica| {
                if replica.state == "ready" {
                    replica.node.clone()
                } else {
                    format!("{} ({})", replica.node, replica.state)
                }
            })
            .collect();
        println!(
            "{:<16} {:>5} {:>6}  {}",
            expert.model,
            expert.layer,
            expert.expert,
            replicas.join(", ")
        );
    }
    Ok(())
}

/// Returns the model to act on: the one given, or the cluster's only one.
async fn model_or_only(admin: &mut AdminClient, model: &str) -> anyhow::Result<String> {
    if !model.is_empty() {
        return Ok(model.to_string());
    }
    let models = admin.cluster_status().await?.models;
    match &models[..] {
        [only] => Ok(only.clone()),
        [] => anyhow::bail!("the cluster has no model yet; load one with `moectl model load DIR`"),
        _ => anyhow::bail!(
            "the cluster serves several models ({}); say which with --model",
            models.join(", ")
        ),
    }
}

async fn move_replica(args: MoveArgs) -> anyhow::Result<()> {
    let mut admin = admin(&args.admin).await?;
    let model = model_or_only(&mut admin, &args.expert.model).await?;
    let ExpertArgs { layer, expert, .. } = args.expert;
    let moved = admin
        .move_replica(&model, layer, expert, &args.from, &args.to)
        .await?;
    if args.admin.json {
        println!(
            "{}",
            json!({"model": model, "layer": layer, "expert": expert, "from": args.from, "to": args.to, "epoch": moved.epoch, "took_ms": moved.took_ms})
        );
    } else {
        println!(
            "moved {model} layer {layer} expert {expert} from {} to {} in {} ms; placement epoch {}",
            args.from, args.to, moved.took_ms, moved.epoch
        );
    }
    Ok(())
}

async fn replicate(args: ReplicateArgs) -> anyhow::Result<()> {
    let mut admin = admin(&args.admin).await?;
    let model = model_or_only(&mut admin, &args.expert.model).await?;
    let ExpertArgs { layer, expert, .. } = args.expert;
    let added = admin.add_replica(&model, layer, expert, &args.to).await?;
    if args.admin.json {
        println!(
            "{}",
            json!({"model": model, "layer": layer, "expert": expert, "node": args.to, "epoch": added.epoch})
        );
    } else {
        println!(
            "{} now serves {model} layer {layer} expert {expert}; placement epoch {}",
            args.to, added.epoch
        );
    }
    Ok(())
}

async fn drain_node(args: DrainArgs) -> anyhow::Result<()> {
    let drained = admin(&args.admin).await?.drain_node(&args.node).await?;
    if args.admin.json {
        println!(
            "{}",
            json!({"node": args.node, "moved": drained.moved, "epoch": drained.epoch})
        );
    } else {
        println!(
            "{} drained: {} replicas moved; placement epoch {}",
            args.node, drained.moved, drained.epoch
        );
    }
    Ok(())
}

/// Reads `{"layers": [[load, ...], ...]}` (other keys are ignored).
fn read_loads(path: &std::path::Path) -> anyhow::Result<Vec<Vec<f64>>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let layers = value
        .get("layers")
        .and_then(|layers| layers.as_array())
        .with_context(|| {
            format!(
                "{} has no \"layers\" list; expected {{\"layers\": [[load of expert 0, ...], ...]}}",
                path.display()
            )
        })?;
    layers
        .iter()
        .enumerate()
        .map(|(index, layer)| {
            let loads = layer
                .as_array()
                .with_context(|| format!("layers[{index}] is not a list of loads"))?;
            loads
                .iter()
                .enumerate()
                .map(|(expert, load)| {
                    load.as_f64().with_context(|| {
                        format!("layers[{index}][{expert}] is {load}, not a number")
                    })
                })
                .collect()
        })
        .collect()
}

fn plan(args: PlanArgs) -> anyhow::Result<()> {
    use moemesh_core::planner::{PlanNode, PlanOptions, node_loads, plan_layer};
    if args.nodes == 0 || args.groups == 0 {
        anyhow::bail!("--nodes and --groups must be at least 1");
    }
    let layers = read_loads(&args.loads)?;
    let nodes: Vec<PlanNode> = (0..args.nodes)
        .map(|index| PlanNode {
            slots: args.slots,
            group: index % args.groups,
        })
        .collect();
    let options = PlanOptions {
        routing_groups: args.routing_groups,
        ..PlanOptions::default()
    };
    let mut planned = Vec::with_capacity(layers.len());
    for (index, loads) in layers.iter().enumerate() {
        let plan = plan_layer(loads, &nodes, None, &options)
            .map_err(|error| anyhow::anyhow!("layers[{index}]: {error}"))?;
        planned.push(plan);
    }
    if args.json {
        let layers: Vec<_> = planned
            .iter()
            .map(|plan| json!({"nodes": plan.nodes, "max_over_mean": plan.max_over_mean}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"layers": layers}))?
        );
        return Ok(());
    }
    for (index, (plan, loads)) in planned.iter().zip(&layers).enumerate() {
        let per_node = node_loads(loads, &plan.nodes);
        let total: f64 = per_node.iter().sum();
        let replicas: usize = plan.nodes.iter().map(Vec::len).sum();
        println!(
            "layers[{index}]: {} experts, {replicas} replicas on {} nodes, max/mean node load {:.3}",
            loads.len(),
            args.nodes,
            plan.max_over_mean
        );
        for (node, (experts, load)) in plan.nodes.iter().zip(&per_node).enumerate() {
            let share = if total > 0.0 {
                load / total * 100.0
            } else {
                0.0
            };
            println!(
                "  node {node:<3} group {:<3} {share:>5.1}% of the load   experts {experts:?}",
                node % args.groups
            );
        }
    }
    Ok(())
}

fn stats_json(stats: &moemesh_proto::v1::LoadStatsResponse) -> serde_json::Value {
    json!({
        "model": stats.model,
        "window_seconds": stats.window_seconds,
        "nodes_per_token": stats.nodes_per_token,
        "bytes_per_token": stats.bytes_per_token,
        "layer_ids": stats.layers.iter().map(|layer| layer.layer).collect::<Vec<_>>(),
        "layers": stats.layers.iter().map(|layer| &layer.tokens).collect::<Vec<_>>(),
        "nodes": stats.nodes.iter().map(|node| json!({
            "node": node.node,
            "queue_depth": node.queue_depth,
            "busy_fraction": node.busy_fraction,
            "pairs_per_second": node.pairs_per_second,
        })).collect::<Vec<_>>(),
    })
}

async fn export_stats(args: ExportArgs) -> anyhow::Result<()> {
    let stats = admin(&args.admin).await?.load_stats(&args.model).await?;
    let text = serde_json::to_string_pretty(&stats_json(&stats))?;
    match &args.output {
        Some(path) => {
            std::fs::write(path, text + "\n")
                .with_context(|| format!("cannot write {}", path.display()))?;
            eprintln!(
                "wrote {} ({} layers, {:.0} s window)",
                path.display(),
                stats.layers.len(),
                stats.window_seconds
            );
        }
        None => println!("{text}"),
    }
    Ok(())
}

async fn top(args: TopArgs) -> anyhow::Result<()> {
    let mut client = admin(&args.admin).await?;
    loop {
        let stats = client.load_stats(&args.model).await?;
        if args.admin.json {
            println!("{}", serde_json::to_string(&stats_json(&stats))?);
        } else {
            if !args.once {
                // Clear the screen and go home, like top.
                print!("\x1b[2J\x1b[H");
            }
            print_top(&stats, args.experts);
        }
        if args.once {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

fn print_top(stats: &moemesh_proto::v1::LoadStatsResponse, experts: usize) {
    let seconds = stats.window_seconds.max(f64::MIN_POSITIVE);
    println!(
        "model {}, last {:.0} s (tokens per second over the window); a token reached {:.2} nodes, {:.0} bytes sent per token",
        stats.model, stats.window_seconds, stats.nodes_per_token, stats.bytes_per_token
    );
    println!();
    println!(
        "{:<20} {:>6} {:>7} {:>14}",
        "NODE", "QUEUE", "BUSY", "PAIRS/S"
    );
    for node in &stats.nodes {
        println!(
            "{:<20} {:>6} {:>6.0}% {:>14.0}",
            node.node,
            node.queue_depth,
            node.busy_fraction * 100.0,
            node.pairs_per_second
        );
    }
    for layer in &stats.layers {
        let total: u64 = layer.tokens.iter().sum();
        let mut hottest: Vec<(usize, u64)> = layer.tokens.iter().copied().enumerate().collect();
        hottest.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        println!();
        println!(
            "layer {}: {:.0} tokens/s over {} experts",
            layer.layer,
            total as f64 / seconds,
            layer.tokens.len()
        );
        for (expert, tokens) in hottest.into_iter().take(experts) {
            let share = if total > 0 {
                tokens as f64 / total as f64 * 100.0
            } else {
                0.0
            };
            println!(
                "  expert {expert:<5} {:>10.0} tokens/s  {share:>5.1}%",
                tokens as f64 / seconds
            );
        }
    }
}

async fn rebalance(args: RebalanceArgs) -> anyhow::Result<()> {
    let outcome = admin(&args.admin)
        .await?
        .rebalance(&args.model, args.dry_run)
        .await?;
    if args.admin.json {
        let moves = |moves: &[moemesh_proto::v1::ReplicaMove]| {
            moves
                .iter()
                .map(|m| json!({"expert": m.expert, "node": m.node}))
                .collect::<Vec<_>>()
        };
        let value = json!({
            "model": outcome.model,
            "dry_run": outcome.dry_run,
            "window_seconds": outcome.window_seconds,
            "moves_done": outcome.moves_done,
            "moves_failed": outcome.moves_failed,
            "errors": outcome.errors,
            "layers": outcome.layers.iter().map(|layer| json!({
                "layer": layer.layer,
                "max_over_mean_before": layer.max_over_mean_before,
                "max_over_mean_after": layer.max_over_mean_after,
                "added": moves(&layer.added),
                "removed": moves(&layer.removed),
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        println!(
            "{} {}: planned from {:.0} s of load",
            if outcome.dry_run {
                "plan for"
            } else {
                "rebalanced"
            },
            outcome.model,
            outcome.window_seconds
        );
        if outcome.layers.is_empty() {
            println!("  no layer had load in the window; nothing to do");
        }
        for layer in &outcome.layers {
            println!(
                "  layer {}: max/mean node load {:.3} -> {:.3}, {} replicas added, {} removed",
                layer.layer,
                layer.max_over_mean_before,
                layer.max_over_mean_after,
                layer.added.len(),
                layer.removed.len()
            );
            for added in &layer.added {
                println!("    + expert {} on {}", added.expert, added.node);
            }
            for removed in &layer.removed {
                println!("    - expert {} on {}", removed.expert, removed.node);
            }
        }
        if !outcome.dry_run {
            println!(
                "{} moves done, {} failed",
                outcome.moves_done, outcome.moves_failed
            );
        }
        for error in &outcome.errors {
            eprintln!("failed: {error}");
        }
    }
    if outcome.moves_failed > 0 {
        anyhow::bail!("{} moves failed", outcome.moves_failed);
    }
    Ok(())
}
