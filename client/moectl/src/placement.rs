//! `moectl placement`: which node holds which expert, changing it by hand,
//! planning it offline from recorded loads and rebalancing the live cluster.

use std::path::{Path, PathBuf};

use anyhow::Context;
use moemesh_client::CoordinatorClient;
use moemesh_core::model::placement::planner::{
    LayerPlan, PlanNode, PlanOptions, node_loads, plan_layer,
};
use moemesh_proto::v1::{RebalanceResponse, ReplicaMove, ReplicaState};
use serde_json::json;

use crate::connect::Ctl;
use crate::output::{OutputArg, percent_of, print_outcome, print_pretty_json};
use crate::wait::WaitArgs;

mod moves;
use moves::Replica;

#[derive(clap::Subcommand)]
pub enum PlacementCommand {
    /// Lists every expert's replicas and their state.
    Show(ShowArgs),
    /// Moves one replica to another node: add, wait until it serves, drain
    /// the old one, remove it. The call returns when the move is done;
    /// --wait adds a bar of its steps and --timeout.
    Move(MoveArgs),
    /// Adds one more replica of an expert on a node and waits until it
    /// serves; --wait adds a bar of its state and --timeout.
    Replicate(ReplicateArgs),
    /// Plans a balanced placement offline from recorded expert loads: how
    /// many replicas each expert gets and which node holds each.
    Plan(PlanArgs),
    /// Plans from the live load window and moves replicas to follow it,
    /// without pausing serving (--dry-run: only show the plan). The call
    /// returns when the moves are done; --wait adds a bar of moves done
    /// (sized by a dry run first) and --timeout.
    Rebalance(RebalanceArgs),
}

#[derive(clap::Args)]
pub struct ShowArgs {
    /// Only this model.
    #[arg(long, default_value = "")]
    model: String,
    /// Only this layer.
    #[arg(long)]
    layer: Option<u32>,
    #[command(flatten)]
    format: OutputArg,
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
pub struct MoveArgs {
    #[command(flatten)]
    expert: ExpertArgs,
    /// The node whose replica moves.
    #[arg(long)]
    from: String,
    /// The node it moves to.
    #[arg(long)]
    to: String,
    #[command(flatten)]
    wait: WaitArgs,
    #[command(flatten)]
    format: OutputArg,
}

#[derive(clap::Args)]
pub struct ReplicateArgs {
    #[command(flatten)]
    expert: ExpertArgs,
    /// The node that gets one more replica.
    #[arg(long)]
    to: String,
    #[command(flatten)]
    wait: WaitArgs,
    #[command(flatten)]
    format: OutputArg,
}

#[derive(clap::Args)]
pub struct PlanArgs {
    /// JSON of per-layer expert loads: `moectl stats export`'s output, or
    /// simply {"layers": [[load of expert 0, load of expert 1, ...], ...]}.
    #[arg(long)]
    loads: PathBuf,
    /// Expert nodes to plan for.
    #[arg(long)]
    nodes: usize,
    /// Expert slots per node (the experts its memory and buffer hold).
    #[arg(long)]
    slots: usize,
    /// Of those, the slots whose experts stay resident (its memory); the
    /// rest wait in the next tier and count as costlier. All by default.
    #[arg(long)]
    resident_slots: Option<usize>,
    /// Topology groups (hosts, racks) the nodes fall in: node i in group i mod G.
    /// Replicas of one expert spread over groups.
    #[arg(long, default_value_t = 1)]
    groups: usize,
    /// Routing groups of the model's experts (DeepSeek-V3's n_group); each
    /// group is kept on as few nodes as balance allows.
    #[arg(long)]
    routing_groups: Option<usize>,
    #[command(flatten)]
    format: OutputArg,
}

#[derive(clap::Args)]
pub struct RebalanceArgs {
    /// Model id; defaults to the only model.
    #[arg(long, default_value = "")]
    model: String,
    /// Show the plan without moving anything.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    wait: WaitArgs,
    #[command(flatten)]
    format: OutputArg,
}

pub async fn show(args: ShowArgs, ctl: &Ctl) -> anyhow::Result<()> {
    let mut admin = ctl.admin().await?;
    let placement = admin.show_placement(&args.model, args.layer).await?;
    if ctl.is_json(&args.format) {
        let experts: Vec<_> = placement
            .experts
            .iter()
            .map(|expert| {
                json!({
                    "model": expert.model, "layer": expert.layer, "expert": expert.expert,
                    "replicas": expert.replicas.iter().map(|r| json!({"node": r.node, "state": r.state().to_string()})).collect::<Vec<_>>(),
                })
            })
            .collect();
        return print_pretty_json(&json!({"epoch": placement.epoch, "experts": experts}));
    }
    println!("placement epoch {}", placement.epoch);
    println!("{:<16} {:>5} {:>6}  REPLICAS", "MODEL", "LAYER", "EXPERT");
    for expert in &placement.experts {
        let replicas: Vec<String> = expert
            .replicas
            .iter()
            .map(|replica| {
                if replica.state() == ReplicaState::Ready {
                    replica.node.clone()
                } else {
                    format!("{} ({})", replica.node, replica.state())
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
async fn model_or_only(admin: &mut CoordinatorClient, model: &str) -> anyhow::Result<String> {
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

pub async fn move_replica(args: MoveArgs, ctl: &Ctl) -> anyhow::Result<()> {
    let mut admin = ctl.admin().await?;
    let model = model_or_only(&mut admin, &args.expert.model).await?;
    let ExpertArgs { layer, expert, .. } = args.expert;
    let replica = Replica {
        model: &model,
        layer,
        expert,
    };
    let moved = if args.wait.wait {
        let visible = ctl.shows_progress(&args.format);
        moves::move_and_wait(
            &mut admin,
            replica,
            (&args.from, &args.to),
            &args.wait,
            visible,
        )
        .await?
    } else {
        admin
            .move_replica(&model, layer, expert, &args.from, &args.to)
            .await?
    };
    print_outcome(
        ctl.is_json(&args.format),
        json!({"model": model, "layer": layer, "expert": expert, "from": args.from, "to": args.to, "epoch": moved.epoch, "took_ms": moved.took_ms}),
        || {
            format!(
                "moved {model} layer {layer} expert {expert} from {} to {} in {} ms; placement epoch {}",
                args.from, args.to, moved.took_ms, moved.epoch
            )
        },
    );
    Ok(())
}

pub async fn replicate(args: ReplicateArgs, ctl: &Ctl) -> anyhow::Result<()> {
    let mut admin = ctl.admin().await?;
    let model = model_or_only(&mut admin, &args.expert.model).await?;
    let ExpertArgs { layer, expert, .. } = args.expert;
    let replica = Replica {
        model: &model,
        layer,
        expert,
    };
    let added = if args.wait.wait {
        let visible = ctl.shows_progress(&args.format);
        moves::replicate_and_wait(&mut admin, replica, &args.to, &args.wait, visible).await?
    } else {
        admin.add_replica(&model, layer, expert, &args.to).await?
    };
    print_outcome(
        ctl.is_json(&args.format),
        json!({"model": model, "layer": layer, "expert": expert, "node": args.to, "epoch": added.epoch}),
        || {
            format!(
                "{} now serves {model} layer {layer} expert {expert}; placement epoch {}",
                args.to, added.epoch
            )
        },
    );
    Ok(())
}

/// Reads `{"layers": [[load, ...], ...]}` (other keys are ignored).
fn read_loads(path: &Path) -> anyhow::Result<Vec<Vec<f64>>> {
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

pub fn plan(args: PlanArgs, ctl: &Ctl) -> anyhow::Result<()> {
    if args.nodes == 0 || args.groups == 0 {
        anyhow::bail!("--nodes and --groups must be at least 1");
    }
    let layers = read_loads(&args.loads)?;
    let nodes: Vec<PlanNode> = (0..args.nodes)
        .map(|index| PlanNode {
            slots: args.slots,
            resident_slots: args.resident_slots.unwrap_or(args.slots),
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
    if ctl.is_json(&args.format) {
        let layers: Vec<_> = planned
            .iter()
            .map(|plan| json!({"nodes": plan.nodes, "max_over_mean": plan.max_over_mean}))
            .collect();
        return print_pretty_json(&json!({"layers": layers}));
    }
    print_plans(&planned, &layers, &args);
    Ok(())
}

/// Prints each layer's plan: its balance, then each node's share of the
/// load and the experts it holds.
fn print_plans(planned: &[LayerPlan], layers: &[Vec<f64>], args: &PlanArgs) {
    for (index, (plan, loads)) in planned.iter().zip(layers).enumerate() {
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
            let share = percent_of(*load, total);
            println!(
                "  node {node:<3} group {:<3} {share:>5.1}% of the load   experts {experts:?}",
                node % args.groups
            );
        }
    }
}

pub async fn rebalance(args: RebalanceArgs, ctl: &Ctl) -> anyhow::Result<()> {
    let mut admin = ctl.admin().await?;
    let outcome = if args.wait.wait && !args.dry_run {
        let visible = ctl.shows_progress(&args.format);
        moves::rebalance_and_wait(&mut admin, &args.model, &args.wait, visible).await?
    } else {
        admin.rebalance(&args.model, args.dry_run).await?
    };
    if ctl.is_json(&args.format) {
        print_pretty_json(&rebalance_json(&outcome))?;
    } else {
        print_rebalance(&outcome);
    }
    if outcome.moves_failed > 0 {
        anyhow::bail!("{} moves failed", outcome.moves_failed);
    }
    Ok(())
}

fn rebalance_json(outcome: &RebalanceResponse) -> serde_json::Value {
    let moves = |moves: &[ReplicaMove]| {
        moves
            .iter()
            .map(|m| json!({"expert": m.expert, "node": m.node}))
            .collect::<Vec<_>>()
    };
    json!({
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
    })
}

fn print_rebalance(outcome: &RebalanceResponse) {
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
