//! The report of `moemesh bench`: each figure's median over the rounds, the
//! ratios its goals are stated in, as a table or as one JSON object.

use std::time::Duration;

use serde_json::json;

use super::figures::{Figures, NodeMemory, Samples};
use super::layer::BenchArgs;
use crate::stats::percentile;

/// What the report needs besides the figures.
pub(super) struct RunContext<'a> {
    pub(super) args: &'a BenchArgs,
    pub(super) threads: usize,
    pub(super) threads_per_node: usize,
    pub(super) torch_version: Option<String>,
    pub(super) torch_skipped: Option<String>,
    pub(super) torch_error: Option<f64>,
    pub(super) cluster_error: f64,
    pub(super) bf16_error: f64,
    pub(super) memory: Vec<NodeMemory>,
    /// Tokens routed to each expert in the full batch.
    pub(super) expert_loads: Vec<usize>,
    pub(super) inprocess_flops: f64,
}

impl RunContext<'_> {
    /// The expert node whose memory is furthest above its weights.
    fn worst_node(&self) -> Option<&NodeMemory> {
        self.memory.iter().max_by(|a, b| {
            let ratio = |node: &NodeMemory| {
                node.rss_bytes.unwrap_or(0) as f64 / node.weight_bytes.max(1) as f64
            };
            ratio(a).total_cmp(&ratio(b))
        })
    }
}

/// Prints the report on stdout: one JSON object with --json, else the table.
pub(super) fn print_report(context: &RunContext<'_>, figures: &Figures) -> anyhow::Result<()> {
    if context.args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&to_json(context, figures))?
        );
    } else {
        Table::new(context, figures).print();
    }
    Ok(())
}

/// The derived figures: medians and the ratios the goals are stated in.
struct Summary {
    ceiling_gflops: f64,
    torch_gemm_gflops: Option<f64>,
    /// The larger of the two ceilings.
    best_ceiling_gflops: f64,
    memory_read_gbps: f64,
    /// The time a decode step takes to read its experts' f32 weights once
    /// at `memory_read_gbps` (median over the steps).
    decode_bound_us: f64,
    /// The median over rounds of the in-process decode steps' stream rate
    /// over the read rate measured beside them: the goal's figure, since
    /// it pairs each round's steps with the memory they ran against.
    decode_inprocess_over_bound: f64,
    decode_p50_us_inprocess_bf16: f64,
    inprocess_tokens_per_s: f64,
    inprocess_gflops: f64,
    torch_tokens_per_s: Option<f64>,
    cluster_tokens_per_s: f64,
    cluster_sequential_tokens_per_s: f64,
    bf16_tokens_per_s: f64,
    decode_p50_us_inprocess: f64,
    decode_p99_us_inprocess: f64,
    decode_p50_us_cluster: f64,
    decode_p99_us_cluster: f64,
    decode_dispatch_p50_us: f64,
    decode_dispatch_p99_us: f64,
    decode_p50_us_one_hop: f64,
    decode_p99_us_one_hop: f64,
    decode_one_hop_dispatch_p50_us: f64,
    grpc_round_trip_p50_us: f64,
}

impl Summary {
    fn new(context: &RunContext<'_>, figures: &Figures) -> Self {
        let median = |samples: &Samples| samples.median().unwrap_or(f64::NAN);
        let quantile = |values: &[f64], fraction: f64| {
            let mut sorted: Vec<Duration> = values
                .iter()
                .map(|&us| Duration::from_secs_f64(us / 1e6))
                .collect();
            sorted.sort();
            if sorted.is_empty() {
                f64::NAN
            } else {
                percentile(&sorted, fraction).as_secs_f64() * 1e6
            }
        };
        let inprocess_tokens_per_s = median(&figures.inprocess_tokens_per_s);
        let ceiling_gflops = median(&figures.ceiling_gflops);
        let torch_gemm_gflops = figures.torch_gemm_gflops.median();
        let memory_read_gbps = median(&figures.memory_read_gbps);
        Self {
            ceiling_gflops,
            torch_gemm_gflops,
            best_ceiling_gflops: ceiling_gflops.max(torch_gemm_gflops.unwrap_or(0.0)),
            memory_read_gbps,
            decode_bound_us: median(&figures.decode_expert_bytes) / (memory_read_gbps * 1e9) * 1e6,
            decode_inprocess_over_bound: median(&figures.decode_inprocess_over_bound),
            decode_p50_us_inprocess_bf16: quantile(&figures.decode_inprocess_bf16_us, 0.5),
            inprocess_tokens_per_s,
            inprocess_gflops: inprocess_tokens_per_s * context.inprocess_flops
                / context.args.tokens as f64
                / 1e9,
            torch_tokens_per_s: figures.torch_tokens_per_s.median(),
            cluster_tokens_per_s: median(&figures.cluster_tokens_per_s),
            cluster_sequential_tokens_per_s: median(&figures.cluster_sequential_tokens_per_s),
            bf16_tokens_per_s: median(&figures.bf16_tokens_per_s),
            decode_p50_us_inprocess: quantile(&figures.decode_inprocess_us, 0.5),
            decode_p99_us_inprocess: quantile(&figures.decode_inprocess_us, 0.99),
            decode_p50_us_cluster: quantile(&figures.decode_cluster_us, 0.5),
            decode_p99_us_cluster: quantile(&figures.decode_cluster_us, 0.99),
            decode_dispatch_p50_us: quantile(&figures.decode_dispatch_us, 0.5),
            grpc_round_trip_p50_us: quantile(&figures.grpc_round_trip_us, 0.5),
            decode_dispatch_p99_us: quantile(&figures.decode_dispatch_us, 0.99),
            decode_p50_us_one_hop: quantile(&figures.decode_one_hop_us, 0.5),
            decode_p99_us_one_hop: quantile(&figures.decode_one_hop_us, 0.99),
            decode_one_hop_dispatch_p50_us: quantile(&figures.decode_one_hop_dispatch_us, 0.5),
        }
    }
}

fn to_json(context: &RunContext<'_>, figures: &Figures) -> serde_json::Value {
    let summary = Summary::new(context, figures);
    let range = |samples: &Samples| samples.range().map(|(low, high)| json!([low, high]));
    let worst = context.worst_node();
    let mut report = json!({
        "threads": context.threads,
        "threads_per_expert_node": context.threads_per_node,
        "tokens_per_expert": context.expert_loads,
        "rounds": context.args.rounds,
        "tokens": context.args.tokens,
        "decode_tokens": context.args.decode_tokens,
        "ceiling_gflops": summary.ceiling_gflops,
        "torch_gemm_gflops": summary.torch_gemm_gflops,
        "best_ceiling_gflops": summary.best_ceiling_gflops,
        "inprocess_tokens_per_s": summary.inprocess_tokens_per_s,
        "inprocess_gflops": summary.inprocess_gflops,
        "inprocess_over_ceiling": summary.inprocess_gflops / summary.ceiling_gflops,
        "inprocess_over_best_ceiling": summary.inprocess_gflops / summary.best_ceiling_gflops,
        "memory_read_gbps": summary.memory_read_gbps,
        "torch_tokens_per_s": summary.torch_tokens_per_s,
        "torch_skipped": context.torch_skipped,
        "torch_version": context.torch_version,
        "inprocess_over_torch": summary.torch_tokens_per_s.map(|torch| summary.inprocess_tokens_per_s / torch),
        "cluster_tokens_per_s": summary.cluster_tokens_per_s,
        "cluster_over_inprocess": summary.cluster_tokens_per_s / summary.inprocess_tokens_per_s,
        "cluster_in_flight": context.args.in_flight,
        "cluster_sequential_tokens_per_s": summary.cluster_sequential_tokens_per_s,
        "bf16_tokens_per_s": summary.bf16_tokens_per_s,
        "bf16_over_f32": summary.bf16_tokens_per_s / summary.inprocess_tokens_per_s,
        "expert_node_rss_bytes": worst.and_then(|node| node.rss_bytes),
        "expert_node_peak_rss_bytes": worst.and_then(|node| node.peak_rss_bytes),
        "expert_node_weight_bytes": worst.map(|node| node.weight_bytes),
        "expert_nodes": context.memory.iter().map(|node| json!({
            "rss_bytes": node.rss_bytes,
            "peak_rss_bytes": node.peak_rss_bytes,
            "weight_bytes": node.weight_bytes,
        })).collect::<Vec<_>>(),
        "relative_l2_vs_inprocess": {
            "cluster": context.cluster_error,
            "torch": context.torch_error,
            "bf16": context.bf16_error,
        },
        "range": {
            "ceiling_gflops": range(&figures.ceiling_gflops),
            "torch_gemm_gflops": range(&figures.torch_gemm_gflops),
            "memory_read_gbps": range(&figures.memory_read_gbps),
            "decode_inprocess_over_bound": range(&figures.decode_inprocess_over_bound),
            "inprocess_tokens_per_s": range(&figures.inprocess_tokens_per_s),
            "torch_tokens_per_s": range(&figures.torch_tokens_per_s),
            "cluster_tokens_per_s": range(&figures.cluster_tokens_per_s),
            "cluster_sequential_tokens_per_s": range(&figures.cluster_sequential_tokens_per_s),
            "bf16_tokens_per_s": range(&figures.bf16_tokens_per_s),
        },
    });
    if let (Some(report), serde_json::Value::Object(decode)) =
        (report.as_object_mut(), decode_json(&summary))
    {
        report.extend(decode);
    }
    report
}

/// The decode figures: in process, through the router, in one hop, and
/// the bare round trip they stand on.
fn decode_json(summary: &Summary) -> serde_json::Value {
    json!({
        "decode_p50_us_inprocess": summary.decode_p50_us_inprocess,
        "decode_p99_us_inprocess": summary.decode_p99_us_inprocess,
        "decode_bound_us": summary.decode_bound_us,
        "decode_inprocess_over_bound": summary.decode_inprocess_over_bound,
        "decode_p50_us_inprocess_bf16": summary.decode_p50_us_inprocess_bf16,
        "decode_bound_us_bf16": summary.decode_bound_us / 2.0,
        "decode_bf16_over_f32": summary.decode_p50_us_inprocess_bf16 / summary.decode_p50_us_inprocess,
        "decode_p50_us_cluster": summary.decode_p50_us_cluster,
        "decode_p99_us_cluster": summary.decode_p99_us_cluster,
        "decode_dispatch_overhead_p50_us": summary.decode_p50_us_cluster - summary.decode_p50_us_inprocess,
        "decode_dispatch_p50_us": summary.decode_dispatch_p50_us,
        "decode_dispatch_p99_us": summary.decode_dispatch_p99_us,
        "decode_p50_us_one_hop": summary.decode_p50_us_one_hop,
        "decode_p99_us_one_hop": summary.decode_p99_us_one_hop,
        "decode_dispatch_overhead_p50_us_one_hop": summary.decode_p50_us_one_hop - summary.decode_p50_us_inprocess,
        "decode_dispatch_p50_us_one_hop": summary.decode_one_hop_dispatch_p50_us,
        "grpc_round_trip_p50_us": summary.grpc_round_trip_p50_us,
    })
}

/// "met" or "missed" against a goal of at least `goal`.
fn verdict(value: f64, goal: f64) -> &'static str {
    if value >= goal { "met" } else { "MISSED" }
}

/// "met" or "missed" against a goal of at most `goal`.
fn verdict_at_most(value: f64, goal: f64) -> &'static str {
    if value <= goal { "met" } else { "MISSED" }
}

/// A figure's range over the rounds, as the table shows it.
fn range_text(samples: &Samples) -> String {
    samples
        .range()
        .map_or(String::new(), |(low, high)| format!("{low:.0}-{high:.0}"))
}

/// The table: one row per contestant, then the memory of each expert node
/// and the checks of every contestant's output.
struct Table<'a> {
    context: &'a RunContext<'a>,
    figures: &'a Figures,
    summary: Summary,
}

impl<'a> Table<'a> {
    fn new(context: &'a RunContext<'a>, figures: &'a Figures) -> Self {
        Self {
            context,
            figures,
            summary: Summary::new(context, figures),
        }
    }

    fn print(&self) {
        self.print_heading();
        self.print_in_process_rows();
        self.print_cluster_rows();
        self.print_decode_rows();
        self.print_bf16_row();
        self.print_memory_rows();
        self.print_checks();
    }

    fn print_heading(&self) {
        let args = self.context.args;
        let shape = args.shape();
        println!(
            "moemesh bench: Mixtral-shaped layer (hidden {}, intermediate {}, {} experts, top-{}, f32), {} threads, {} rounds (median, range)",
            shape.hidden_size,
            shape.intermediate_size,
            shape.experts,
            shape.top_k,
            self.context.threads,
            args.rounds
        );
        println!();
        println!(
            "{:<44} {:>12} {:>15}   ratio (goal)",
            "contestant", "median", "range"
        );
    }

    /// The ceiling, moemesh's layer in process and PyTorch.
    fn print_in_process_rows(&self) {
        let (args, summary, figures) = (self.context.args, &self.summary, self.figures);
        let shape = args.shape();
        let ceiling = summary.ceiling_gflops;
        println!(
            "{:<44} {:>12} {:>15}",
            format!(
                "ceiling: GEMM {}x{}x{}",
                args.tokens, shape.hidden_size, shape.intermediate_size
            ),
            format!("{ceiling:.1} GFLOP/s"),
            range_text(&figures.ceiling_gflops)
        );
        match summary.torch_gemm_gflops {
            Some(torch_gemm) => println!(
                "{:<44} {:>12} {:>15}",
                "ceiling: PyTorch's GEMM, same shape",
                format!("{torch_gemm:.1} GFLOP/s"),
                range_text(&figures.torch_gemm_gflops)
            ),
            None => println!(
                "{:<44} {:>12}",
                "ceiling: PyTorch's GEMM, same shape", "skipped"
            ),
        }
        let over_ceiling = summary.inprocess_gflops / summary.best_ceiling_gflops;
        println!(
            "{:<44} {:>12} {:>15}   {:.2} of the larger ceiling, {:.1} GFLOP/s (>= 0.9: {})",
            format!("experts in process, {} tokens", args.tokens),
            format!("{:.0} tok/s", summary.inprocess_tokens_per_s),
            range_text(&figures.inprocess_tokens_per_s),
            over_ceiling,
            summary.inprocess_gflops,
            verdict(over_ceiling, 0.9)
        );
        match (summary.torch_tokens_per_s, &self.context.torch_skipped) {
            (Some(torch), _) => {
                let ratio = summary.inprocess_tokens_per_s / torch;
                println!(
                    "{:<44} {:>12} {:>15}   in process is {ratio:.2}x PyTorch (>= 1.3: {})",
                    "PyTorch MixtralSparseMoeBlock",
                    format!("{torch:.0} tok/s"),
                    range_text(&figures.torch_tokens_per_s),
                    verdict(ratio, 1.3)
                );
            }
            (None, reason) => println!(
                "{:<44} {:>12}   {}",
                "PyTorch MixtralSparseMoeBlock",
                "skipped",
                reason.as_deref().unwrap_or("")
            ),
        }
    }

    /// The cluster's throughput, with requests in flight and one at a time.
    fn print_cluster_rows(&self) {
        let (context, summary, figures) = (self.context, &self.summary, self.figures);
        let over_inprocess = summary.cluster_tokens_per_s / summary.inprocess_tokens_per_s;
        println!(
            "{:<44} {:>12} {:>15}   {over_inprocess:.2} of in process (>= 0.9: {})",
            format!(
                "cluster, 2 nodes x {} threads, {} in flight",
                context.threads_per_node, context.args.in_flight
            ),
            format!("{:.0} tok/s", summary.cluster_tokens_per_s),
            range_text(&figures.cluster_tokens_per_s),
            verdict(over_inprocess, 0.9)
        );
        println!(
            "{:<44} {:>12} {:>15}   {:.2} of in process",
            "cluster, one request at a time",
            format!("{:.0} tok/s", summary.cluster_sequential_tokens_per_s),
            range_text(&figures.cluster_sequential_tokens_per_s),
            summary.cluster_sequential_tokens_per_s / summary.inprocess_tokens_per_s
        );
    }

    /// Decode latencies in process and through the cluster, and the cluster's dispatch alone.
    fn print_decode_rows(&self) {
        let (decode_tokens, summary) = (self.context.args.decode_tokens, &self.summary);
        let overhead = summary.decode_p50_us_cluster - summary.decode_p50_us_inprocess;
        let over_bound = summary.decode_inprocess_over_bound;
        println!(
            "{:<44} {:>12} {:>15}   {over_bound:.2} of the read bound (per round), {:.0} us at {:.1} GB/s (>= 0.8: {})",
            format!("decode {decode_tokens} tokens in process, p50 / p99"),
            format!("{:.0} us", summary.decode_p50_us_inprocess),
            format!("p99 {:.0} us", summary.decode_p99_us_inprocess),
            summary.decode_bound_us,
            summary.memory_read_gbps,
            verdict(over_bound, 0.8)
        );
        let bf16_over_f32 = summary.decode_p50_us_inprocess_bf16 / summary.decode_p50_us_inprocess;
        println!(
            "{:<44} {:>12} {:>15}   {bf16_over_f32:.2} of f32 (<= 0.6: {})",
            format!("decode {decode_tokens} tokens in process, bf16 weights"),
            format!("{:.0} us", summary.decode_p50_us_inprocess_bf16),
            "",
            verdict_at_most(bf16_over_f32, 0.6)
        );
        let round_trip = summary.grpc_round_trip_p50_us;
        println!(
            "{:<44} {:>12} {:>15}   dispatch overhead p50 {overhead:.0} us (<= 2 round trips + 150: {})",
            format!("decode {decode_tokens} tokens through the router, p50 / p99"),
            format!("{:.0} us", summary.decode_p50_us_cluster),
            format!("p99 {:.0} us", summary.decode_p99_us_cluster),
            verdict_at_most(overhead, 2.0 * round_trip + 150.0)
        );
        println!(
            "{:<44} {:>12} {:>15}   latency minus the slowest node's compute (<= 200: {})",
            "decode dispatch alone, p50 / p99",
            format!("{:.0} us", summary.decode_dispatch_p50_us),
            format!("p99 {:.0} us", summary.decode_dispatch_p99_us),
            verdict_at_most(summary.decode_dispatch_p50_us, 200.0)
        );
        let one_hop_overhead = summary.decode_p50_us_one_hop - summary.decode_p50_us_inprocess;
        println!(
            "{:<44} {:>12} {:>15}   dispatch overhead p50 {one_hop_overhead:.0} us (<= round trip + 100: {})",
            format!("decode {decode_tokens} tokens in one hop, p50 / p99"),
            format!("{:.0} us", summary.decode_p50_us_one_hop),
            format!("p99 {:.0} us", summary.decode_p99_us_one_hop),
            verdict_at_most(one_hop_overhead, round_trip + 100.0)
        );
        println!(
            "{:<44} {:>12}",
            "one-hop dispatch alone, p50",
            format!("{:.0} us", summary.decode_one_hop_dispatch_p50_us),
        );
        println!(
            "{:<44} {:>12}",
            "empty gRPC call to the router, p50",
            format!("{round_trip:.0} us"),
        );
    }

    fn print_bf16_row(&self) {
        let summary = &self.summary;
        let bf16_ratio = summary.bf16_tokens_per_s / summary.inprocess_tokens_per_s;
        println!(
            "{:<44} {:>12} {:>15}   {bf16_ratio:.2} of f32 (>= 1.2: {})",
            format!(
                "bf16 weights in process, {} tokens",
                self.context.args.tokens
            ),
            format!("{:.0} tok/s", summary.bf16_tokens_per_s),
            range_text(&self.figures.bf16_tokens_per_s),
            verdict(bf16_ratio, 1.2)
        );
    }

    /// Each expert node's resident memory at rest beside its weights.
    fn print_memory_rows(&self) {
        let mib = |bytes: u64| bytes as f64 / (1 << 20) as f64;
        for (index, node) in self.context.memory.iter().enumerate() {
            match (node.rss_bytes, node.peak_rss_bytes) {
                (Some(rss), Some(peak)) => {
                    let ratio = rss as f64 / node.weight_bytes.max(1) as f64;
                    println!(
                        "{:<44} {:>12} {:>15}   {ratio:.3} of its {:.0} MiB of weights (<= 1.15: {})",
                        format!("expert node {index}: resident memory at rest"),
                        format!("{:.0} MiB", mib(rss)),
                        format!("peak {:.0} MiB", mib(peak)),
                        mib(node.weight_bytes),
                        verdict_at_most(ratio, 1.15)
                    );
                }
                _ => println!(
                    "{:<44} {:>12}   (no /proc on this system)",
                    format!("expert node {index}: resident memory"),
                    "unknown"
                ),
            }
        }
    }

    /// Every contestant's error against the in-process f32 layer, and the batch's routing.
    fn print_checks(&self) {
        let context = self.context;
        println!();
        println!(
            "check (relative L2 vs the in-process f32 layer): cluster {:.1e}, PyTorch {}, bf16 weights {:.1e} (weights and activations rounded to bf16)",
            context.cluster_error,
            context
                .torch_error
                .map_or("skipped".to_string(), |error| format!("{error:.1e}")),
            context.bf16_error
        );
        println!(
            "tokens per expert in the {}-token batch: {:?}",
            context.args.tokens, context.expert_loads
        );
        if let Some(version) = &context.torch_version {
            println!("PyTorch: {version}");
        }
    }
}
