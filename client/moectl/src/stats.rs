//! `moectl top` and `moectl stats`: the load window the coordinators keep.

use std::path::PathBuf;

use anyhow::Context;
use moemesh_proto::v1::{LoadStatsResponse, NodeWork};
use serde_json::json;

use crate::connect::Ctl;
use crate::output::{OutputArg, human_bytes, percent_of};

#[derive(clap::Args)]
pub struct TopArgs {
    /// Model id; defaults to the only model.
    #[arg(long, default_value = "")]
    model: String,
    /// Experts listed per layer, hottest first.
    #[arg(long, default_value_t = 8)]
    experts: usize,
    /// Print once and exit instead of refreshing. With JSON output, each
    /// refresh prints one line.
    #[arg(long)]
    once: bool,
    #[command(flatten)]
    format: OutputArg,
}

#[derive(clap::Subcommand)]
pub enum StatsCommand {
    /// Writes the load window as JSON: {"model", "window_seconds",
    /// "layer_ids", "layers": [[tokens of expert 0, ...], ...], "nodes"},
    /// which `moectl placement plan --loads` reads. Each node has its
    /// device, work and Expert Buffering (window rates and cumulative counts).
    /// It is JSON whatever the output format.
    Export(ExportArgs),
}

#[derive(clap::Args)]
pub struct ExportArgs {
    /// Model id; defaults to the only model.
    #[arg(long, default_value = "")]
    model: String,
    /// File to write; standard output when absent.
    #[arg(long)]
    output: Option<PathBuf>,
}

fn stats_json(stats: &LoadStatsResponse) -> serde_json::Value {
    json!({
        "model": stats.model,
        "window_seconds": stats.window_seconds,
        "nodes_per_token": stats.nodes_per_token,
        "bytes_per_token": stats.bytes_per_token,
        "layer_ids": stats.layers.iter().map(|layer| layer.layer).collect::<Vec<_>>(),
        "layers": stats.layers.iter().map(|layer| &layer.tokens).collect::<Vec<_>>(),
        "nodes": stats.nodes.iter().map(|node| json!({
            "node": node.node,
            "device": node.device,
            "queue_depth": node.queue_depth,
            "busy_fraction": node.busy_fraction,
            "pairs_per_second": node.pairs_per_second,
            "buffer_hit_rate": node.buffer_hit_rate,
            "bytes_paged_in_per_second": node.bytes_paged_in_per_second,
            "host_fallbacks_per_second": node.host_fallbacks_per_second,
            "buffer_hits": node.buffer_hits,
            "buffer_misses": node.buffer_misses,
            "bytes_paged_in": node.bytes_paged_in,
            "host_fallbacks": node.host_fallbacks,
        })).collect::<Vec<_>>(),
    })
}

pub async fn export(args: ExportArgs, ctl: &Ctl) -> anyhow::Result<()> {
    let mut admin = ctl.admin().await?;
    let stats = admin.load_stats(&args.model).await?;
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

pub async fn top(args: TopArgs, ctl: &Ctl) -> anyhow::Result<()> {
    let mut client = ctl.admin().await?;
    let json = ctl.is_json(&args.format);
    loop {
        let stats = client.load_stats(&args.model).await?;
        if json {
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

fn print_top(stats: &LoadStatsResponse, experts: usize) {
    println!(
        "model {}, last {:.0} s (tokens per second over the window); a token reached {:.2} nodes, {:.0} bytes sent per token",
        stats.model, stats.window_seconds, stats.nodes_per_token, stats.bytes_per_token
    );
    println!();
    for line in node_table(&stats.nodes) {
        println!("{line}");
    }
    print_hottest_experts(stats, experts);
}

/// Whether the node has ever had an expert that was not resident: only
/// then do its Expert Buffering figures say anything.
fn buffers_experts(node: &NodeWork) -> bool {
    node.buffer_misses + node.host_fallbacks + node.bytes_paged_in > 0
}

/// The node table: a header, then one line per node. The Expert
/// Buffering columns (hit rate, bytes paged in and host fallbacks per
/// second over the window) appear when some node buffers experts, with
/// `-` on the nodes that do not.
fn node_table(nodes: &[NodeWork]) -> Vec<String> {
    let buffering = nodes.iter().any(buffers_experts);
    let mut header = format!(
        "{:<20} {:<8} {:>6} {:>7} {:>14}",
        "NODE", "DEVICE", "QUEUE", "BUSY", "PAIRS/S"
    );
    if buffering {
        header += &format!(" {:>6} {:>12} {:>11}", "HIT", "PAGED-IN/S", "FALLBACK/S");
    }
    let mut lines = vec![header];
    for node in nodes {
        let mut line = format!(
            "{:<20} {:<8} {:>6} {:>6.0}% {:>14.0}",
            node.node,
            node.device,
            node.queue_depth,
            node.busy_fraction * 100.0,
            node.pairs_per_second
        );
        if buffering && buffers_experts(node) {
            line += &format!(
                " {:>5.1}% {:>12} {:>11.1}",
                node.buffer_hit_rate * 100.0,
                human_bytes(node.bytes_paged_in_per_second),
                node.host_fallbacks_per_second
            );
        } else if buffering {
            line += &format!(" {:>6} {:>12} {:>11}", "-", "-", "-");
        }
        lines.push(line);
    }
    lines
}

/// Prints each layer's token rate and its `experts` busiest experts.
fn print_hottest_experts(stats: &LoadStatsResponse, experts: usize) {
    let seconds = stats.window_seconds.max(f64::MIN_POSITIVE);
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
            let share = percent_of(tokens as f64, total as f64);
            println!(
                "  expert {expert:<5} {:>10.0} tokens/s  {share:>5.1}%",
                tokens as f64 / seconds
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu_node() -> NodeWork {
        NodeWork {
            node: "cpu-0".into(),
            device: "cpu".into(),
            queue_depth: 2,
            busy_fraction: 0.5,
            pairs_per_second: 1000.0,
            buffer_hit_rate: 1.0,
            ..NodeWork::default()
        }
    }

    fn gpu_node() -> NodeWork {
        NodeWork {
            node: "gpu-0".into(),
            device: "cuda:0".into(),
            buffer_hit_rate: 0.875,
            bytes_paged_in_per_second: 3.0 * (1u64 << 20) as f64,
            host_fallbacks_per_second: 2.5,
            buffer_hits: 70,
            buffer_misses: 10,
            bytes_paged_in: 30 << 20,
            host_fallbacks: 4,
            ..cpu_node()
        }
    }

    #[test]
    fn the_node_table_shows_devices_and_buffering_only_where_there_is_some() {
        let table = node_table(&[cpu_node()]);
        assert!(
            table[0].contains("DEVICE") && !table[0].contains("HIT"),
            "{table:?}"
        );
        assert!(
            table[1].starts_with("cpu-0") && table[1].contains(" cpu "),
            "{table:?}"
        );

        let table = node_table(&[cpu_node(), gpu_node()]);
        assert!(
            table[0].contains("HIT") && table[0].contains("PAGED-IN/S"),
            "{table:?}"
        );
        let gpu = &table[2];
        for figure in ["cuda:0", "87.5%", "3.0 MiB", "2.5"] {
            assert!(gpu.contains(figure), "{figure} missing from {gpu:?}");
        }
        assert!(table[1].trim_end().ends_with('-'), "{table:?}");
        // The columns line up.
        assert!(
            table.iter().all(|line| line.len() == table[0].len()),
            "{table:#?}"
        );
    }

    #[test]
    fn stats_json_carries_each_nodes_device_and_buffering() {
        let stats = LoadStatsResponse {
            model: "m".into(),
            nodes: vec![gpu_node()],
            ..LoadStatsResponse::default()
        };
        let node = &stats_json(&stats)["nodes"][0];
        assert_eq!(node["device"], "cuda:0");
        assert_eq!(node["buffer_hit_rate"], 0.875);
        assert_eq!(node["bytes_paged_in_per_second"], 3.0 * (1u64 << 20) as f64);
        assert_eq!(node["host_fallbacks_per_second"], 2.5);
        assert_eq!(node["buffer_hits"], 70);
        assert_eq!(node["buffer_misses"], 10);
        assert_eq!(node["bytes_paged_in"], 30u64 << 20);
        assert_eq!(node["host_fallbacks"], 4);
    }
}
