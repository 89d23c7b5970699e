//! `moectl top` and `moectl stats`: the load window the coordinators keep.

use std::path::PathBuf;

use anyhow::Context;
use moemesh_client::TlsConfig;
use moemesh_proto::v1::LoadStatsResponse;
use serde_json::json;

use crate::connect::AdminArgs;
use crate::output::percent_of;

#[derive(clap::Args)]
pub struct TopArgs {
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

#[derive(clap::Subcommand)]
pub enum StatsCommand {
    /// Writes the load window as JSON: {"model", "window_seconds",
    /// "layer_ids", "layers": [[tokens of expert 0, ...], ...], "nodes"},
    /// which `moectl placement plan --loads` reads.
    Export(ExportArgs),
}

#[derive(clap::Args)]
pub struct ExportArgs {
    #[command(flatten)]
    admin: AdminArgs,
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
            "queue_depth": node.queue_depth,
            "busy_fraction": node.busy_fraction,
            "pairs_per_second": node.pairs_per_second,
        })).collect::<Vec<_>>(),
    })
}

pub async fn export(args: ExportArgs, tls: &TlsConfig) -> anyhow::Result<()> {
    let mut admin = args.admin.connect(tls).await?;
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

pub async fn top(args: TopArgs, tls: &TlsConfig) -> anyhow::Result<()> {
    let mut client = args.admin.connect(tls).await?;
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

fn print_top(stats: &LoadStatsResponse, experts: usize) {
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
    print_hottest_experts(stats, experts);
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
