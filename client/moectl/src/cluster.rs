//! `moectl cluster`: the coordinators, the leader and the expert nodes.

use moemesh_proto::v1::ClusterStatusResponse;
use serde_json::json;

use crate::connect::Ctl;
use crate::output::{OutputArg, print_pretty_json};

#[derive(clap::Subcommand)]
pub enum ClusterCommand {
    /// Shows the coordinators, the leader and term, the placement epoch and the expert nodes.
    Status(StatusArgs),
}

#[derive(clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub format: OutputArg,
}

pub async fn status(args: StatusArgs, ctl: &Ctl) -> anyhow::Result<()> {
    let status = ctl.admin().await?.cluster_status().await?;
    if ctl.is_json(&args.format) {
        return print_pretty_json(&status_json(&status));
    }
    print_summary(&status);
    println!();
    print_coordinators(&status);
    println!();
    print_nodes(&status);
    Ok(())
}

fn status_json(status: &ClusterStatusResponse) -> serde_json::Value {
    json!({
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
            "memory_bytes": n.memory_bytes, "buffer_bytes": n.buffer_bytes,
            "status": n.status().to_string(),
        })).collect::<Vec<_>>(),
    })
}

fn print_summary(status: &ClusterStatusResponse) {
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
}

fn print_coordinators(status: &ClusterStatusResponse) {
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
}

fn print_nodes(status: &ClusterStatusResponse) {
    if status.nodes.is_empty() {
        println!("no expert nodes registered");
        return;
    }
    println!(
        "{:<14} {:<28} {:<10} {:<8} {:>10} {:>10} {:<8}",
        "NODE", "ADDRESS", "GROUP", "DEVICE", "MEMORY", "BUFFER", "STATUS"
    );
    for node in &status.nodes {
        // Experts beyond MEMORY wait in BUFFER (pinned host memory, the page cache).
        let buffer = match node.buffer_bytes {
            0 => "-".to_string(),
            bytes => human_size(bytes),
        };
        println!(
            "{:<14} {:<28} {:<10} {:<8} {:>10} {:>10} {:<8}",
            node.id,
            node.address,
            node.group,
            node.device,
            human_size(node.memory_bytes),
            buffer,
            node.status().to_string()
        );
    }
}

fn human_size(bytes: u64) -> String {
    crate::output::human_bytes(bytes as f64)
}
