//! `moemesh bench`: moemesh's speed beside the machine's own limit and
//! beside PyTorch, measured in one run on one machine.
//!
//! Every contestant computes the same Mixtral-shaped MoE layer (hidden
//! 1024, intermediate 2816, 8 experts, top-2, f32) on the same input with
//! the same number of threads. The run is split into rounds, and each round
//! runs every contestant once in turn, so that drift in the machine's speed
//! (other tenants, clocks, heat) falls on all of them alike; the report
//! gives each figure's median over the rounds and its range.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use gemm::Parallelism;
use indicatif::{ProgressBar, ProgressStyle};
use moemesh_client::Client;
use moemesh_client::npy::{Matrix, read_matrix, write_matrix};
use moemesh_core::backend::{CpuBackend, WeightFormat, matmul};
use moemesh_core::checkpoint::Checkpoint;
use moemesh_core::layer::MoeLayer;
use moemesh_proto::ExpertServiceClient;
use moemesh_proto::v1::InfoRequest;
use rand::SeedableRng;
use serde_json::json;

use crate::local_cluster::{LocalCluster, UpArgs};
use crate::stats::{percentile, random_hidden, relative_l2, resident_bytes};
use crate::synthetic::{SyntheticShape, write_mixtral};

/// The PyTorch contestant, run by the bench when torch and transformers are installed.
const TORCH_SCRIPT: &str = include_str!("../bench/torch_mixtral_block.py");

/// The layer every contestant computes.
const MIXTRAL_SHAPED: SyntheticShape = SyntheticShape {
    hidden_size: 1024,
    intermediate_size: 2816,
    layers: 1,
    experts: 8,
    top_k: 2,
};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Compute threads for every contestant; 0 uses every core. The
    /// cluster's two expert nodes share them, half each, since they share
    /// this machine's cores.
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Compute threads of each expert node instead of half of --threads.
    #[arg(long, default_value_t = 0)]
    node_threads: usize,
    /// Rounds; each runs every contestant once, in turn.
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    /// Forwards per contestant per round at the full batch size.
    #[arg(long, default_value_t = 3)]
    forwards: usize,
    /// Tokens per forward for the throughput contestants.
    #[arg(long, default_value_t = 512)]
    tokens: usize,
    /// Tokens per forward for the decode latencies.
    #[arg(long, default_value_t = 8)]
    decode_tokens: usize,
    /// Requests in flight at once for the cluster's throughput (a serving
    /// cluster overlaps one request's transfers with another's compute);
    /// the one-at-a-time figure is reported beside it.
    #[arg(long, default_value_t = 2)]
    in_flight: usize,
    /// Decode-sized forwards per round, in process and through the cluster each.
    #[arg(long, default_value_t = 40)]
    decode_steps: usize,
    /// Python interpreter with torch and transformers for the PyTorch contestant.
    #[arg(long, default_value = "python3")]
    python: String,
    /// Skips the PyTorch contestant.
    #[arg(long)]
    no_torch: bool,
    /// Prints one JSON object on stdout instead of the table.
    #[arg(long)]
    json: bool,
    /// A tiny layer instead, to check that the bench itself runs.
    #[arg(long, hide = true)]
    small: bool,
}

impl BenchArgs {
    fn shape(&self) -> SyntheticShape {
        if self.small {
            SyntheticShape {
                hidden_size: 64,
                intermediate_size: 96,
                layers: 1,
                experts: 8,
                top_k: 2,
            }
        } else {
            MIXTRAL_SHAPED
        }
    }
}

/// One figure measured once per round.
#[derive(Default)]
struct Samples(Vec<f64>);

impl Samples {
    fn push(&mut self, value: f64) {
        self.0.push(value);
    }

    fn sorted(&self) -> Vec<f64> {
        let mut values = self.0.clone();
        values.sort_by(f64::total_cmp);
        values
    }

    fn median(&self) -> Option<f64> {
        let values = self.sorted();
        if values.is_empty() {
            return None;
        }
        let middle = values.len() / 2;
        Some(if values.len() % 2 == 1 {
            values[middle]
        } else {
            (values[middle - 1] + values[middle]) / 2.0
        })
    }

    fn range(&self) -> Option<(f64, f64)> {
        let values = self.sorted();
        Some((*values.first()?, *values.last()?))
    }
}

/// The plain GEMM every expert runs, alone: the machine's practical ceiling.
struct Ceiling {
    pool: rayon::ThreadPool,
    threads: usize,
    lhs: Vec<f32>,
    rhs: Vec<f32>,
    dst: Vec<f32>,
    m: usize,
    k: usize,
    n: usize,
}

impl Ceiling {
    fn new(threads: usize, m: usize, shape: SyntheticShape) -> anyhow::Result<Self> {
        let (k, n) = (shape.hidden_size, shape.intermediate_size);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        Ok(Self {
            pool,
            threads,
            lhs: random_hidden(&mut rng, m, k),
            rhs: random_hidden(&mut rng, k, n),
            dst: vec![0f32; m * n],
            m,
            k,
            n,
        })
    }

    fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.k as f64 * self.n as f64
    }

    /// Runs the product `count` times and returns the seconds they took.
    fn run(&mut self, count: usize) -> f64 {
        let parallelism = if self.threads > 1 {
            Parallelism::Rayon(self.threads)
        } else {
            Parallelism::None
        };
        let Self {
            pool,
            lhs,
            rhs,
            dst,
            m,
            k,
            n,
            ..
        } = self;
        let started = Instant::now();
        pool.install(|| {
            for _ in 0..count {
                matmul(dst, lhs, rhs, *m, *k, *n, parallelism);
            }
        });
        started.elapsed().as_secs_f64()
    }
}

/// The transformers block in a Python process that runs forwards on request.
struct TorchContestant {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    version: String,
}

impl TorchContestant {
    /// Starts the script, or says why the PyTorch contestant is skipped.
    fn start(
        python: &str,
        workdir: &Path,
        model: &Path,
        input: &Path,
        output: &Path,
        threads: usize,
    ) -> Result<Self, String> {
        let probe = Command::new(python)
            .args(["-c", "import torch, transformers, safetensors, numpy"])
            .stdin(Stdio::null())
            .output()
            .map_err(|error| format!("cannot run {python}: {error}"))?;
        if !probe.status.success() {
            let stderr = String::from_utf8_lossy(&probe.stderr);
            let reason = stderr.lines().last().unwrap_or("import failed").to_string();
            return Err(format!(
                "{python} cannot import torch and transformers ({reason}); pip install torch transformers safetensors numpy"
            ));
        }
        let script = workdir.join("torch_mixtral_block.py");
        std::fs::write(&script, TORCH_SCRIPT).map_err(|error| error.to_string())?;
        let mut child = Command::new(python)
            .arg(&script)
            .arg("--model")
            .arg(model)
            .arg("--input")
            .arg(input)
            .arg("--output")
            .arg(output)
            .arg("--threads")
            .arg(threads.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|error| format!("cannot start {python}: {error}"))?;
        let stdin = child.stdin.take().expect("stdin is piped");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout is piped"));
        let mut line = String::new();
        match stdout.read_line(&mut line) {
            Ok(read) if read > 0 && line.starts_with("ready ") => {}
            _ => {
                let _ = child.kill();
                return Err("the PyTorch script failed to start; its errors are above".into());
            }
        }
        let version = line.trim_start_matches("ready ").trim().to_string();
        Ok(Self {
            child,
            stdin,
            stdout,
            version,
        })
    }

    /// Runs `count` forwards in the Python process; returns their seconds.
    fn run(&mut self, count: usize) -> anyhow::Result<f64> {
        writeln!(self.stdin, "{count}")?;
        self.stdin.flush()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        line.trim()
            .parse()
            .with_context(|| format!("the PyTorch script answered {line:?}"))
    }
}

impl Drop for TorchContestant {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Memory of one expert node after the run.
struct NodeMemory {
    rss_bytes: Option<u64>,
    peak_rss_bytes: Option<u64>,
    weight_bytes: u64,
}

/// Everything the bench measured.
#[derive(Default)]
struct Figures {
    ceiling_gflops: Samples,
    inprocess_tokens_per_s: Samples,
    torch_tokens_per_s: Samples,
    cluster_tokens_per_s: Samples,
    /// The cluster with one request at a time.
    cluster_sequential_tokens_per_s: Samples,
    bf16_tokens_per_s: Samples,
    decode_inprocess_us: Vec<f64>,
    decode_cluster_us: Vec<f64>,
    /// Per cluster decode step, its latency minus the slowest node's compute.
    decode_dispatch_us: Vec<f64>,
}

pub async fn run_bench(args: BenchArgs) -> anyhow::Result<()> {
    if args.rounds == 0
        || args.forwards == 0
        || args.tokens == 0
        || args.decode_tokens == 0
        || args.in_flight == 0
    {
        bail!("--rounds, --forwards, --tokens, --decode-tokens and --in-flight must be at least 1");
    }
    let threads = if args.threads == 0 {
        std::thread::available_parallelism().map_or(1, |cores| cores.get())
    } else {
        args.threads
    };
    let workdir = tempfile::Builder::new()
        .prefix("moemesh-bench-")
        .tempdir()?;
    let shape = args.shape();
    let model = workdir.path().join("model");
    std::fs::create_dir(&model)?;
    eprintln!(
        "writing a Mixtral-shaped layer (hidden {}, intermediate {}, {} experts, top-{}, f32) to {}",
        shape.hidden_size,
        shape.intermediate_size,
        shape.experts,
        shape.top_k,
        model.display()
    );
    write_mixtral(&model, shape, 11)?;
    let hidden = shape.hidden_size;
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let input = random_hidden(&mut rng, args.tokens, hidden);
    let decode_inputs: Vec<Vec<f32>> = (0..16)
        .map(|_| random_hidden(&mut rng, args.decode_tokens, hidden))
        .collect();

    eprintln!("loading the in-process layers ({threads} threads)");
    let checkpoint = Checkpoint::open(&model)?;
    let f32_layer = MoeLayer::load(
        &checkpoint,
        0,
        &CpuBackend::with_format(threads, WeightFormat::F32)?,
    )?;
    let bf16_layer = MoeLayer::load(
        &checkpoint,
        0,
        &CpuBackend::with_format(threads, WeightFormat::Bf16)?,
    )?;
    let reference = f32_layer.forward(&input, args.tokens);
    let mut expert_loads = vec![0usize; shape.experts];
    for &expert in &f32_layer.gate().route(&input, args.tokens).experts {
        expert_loads[expert as usize] += 1;
    }
    let bf16_error = relative_l2(&bf16_layer.forward(&input, args.tokens), &reference);
    let mut ceiling = Ceiling::new(threads, args.tokens, shape)?;

    let input_path = workdir.path().join("input.npy");
    let torch_output_path = workdir.path().join("torch_output.npy");
    write_matrix(
        &input_path,
        &Matrix {
            rows: args.tokens,
            columns: hidden,
            values: input.clone(),
        },
    )?;
    let mut torch = if args.no_torch {
        Err("--no-torch".to_string())
    } else {
        eprintln!("starting the PyTorch contestant ({})", args.python);
        tokio::task::block_in_place(|| {
            TorchContestant::start(
                &args.python,
                workdir.path(),
                &model,
                &input_path,
                &torch_output_path,
                threads,
            )
        })
    };
    let torch_error = match &torch {
        Ok(_) => Some(relative_l2(
            &read_matrix(&torch_output_path)?.values,
            &reference,
        )),
        Err(reason) => {
            eprintln!("skipping PyTorch: {reason}");
            None
        }
    };

    let threads_per_node = if args.node_threads == 0 {
        (threads / 2).max(1)
    } else {
        args.node_threads
    };
    eprintln!("starting a router and two expert nodes ({threads_per_node} threads each)");
    let cluster = LocalCluster::start(&UpArgs {
        model: model.clone(),
        expert_nodes: 2,
        replicas: 1,
        router_addr: "127.0.0.1:0".into(),
        threads_per_node,
        model_id: Some("bench".into()),
        coordinators: 0,
        announce: !args.json,
        node_memory_bytes: None,
    })
    .await?;
    let result = measure(
        &args,
        &cluster,
        &mut ceiling,
        [&f32_layer, &bf16_layer],
        torch.as_mut().ok(),
        &input,
        &reference,
        &decode_inputs,
    )
    .await;
    let memory = match &result {
        Ok(_) => node_memory(&cluster).await,
        Err(_) => Ok(Vec::new()),
    };
    cluster.shutdown().await?;
    let (figures, cluster_error) = result?;
    let context = RunContext {
        args: &args,
        threads,
        threads_per_node,
        torch_version: torch.as_ref().ok().map(|torch| torch.version.clone()),
        torch_skipped: torch.as_ref().err().cloned(),
        torch_error,
        cluster_error,
        bf16_error,
        memory: memory?,
        expert_loads,
        inprocess_flops: layer_flops(shape, args.tokens),
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&to_json(&context, &figures))?
        );
    } else {
        print_table(&context, &figures);
    }
    Ok(())
}

/// FLOPs of one forward of `tokens` tokens: 2·T·k·3·H·F for the experts
/// plus 2·T·H·E for the gate.
fn layer_flops(shape: SyntheticShape, tokens: usize) -> f64 {
    let (t, h, f) = (
        tokens as f64,
        shape.hidden_size as f64,
        shape.intermediate_size as f64,
    );
    2.0 * t * shape.top_k as f64 * 3.0 * h * f + 2.0 * t * h * shape.experts as f64
}

#[allow(clippy::too_many_arguments)]
async fn measure(
    args: &BenchArgs,
    cluster: &LocalCluster,
    ceiling: &mut Ceiling,
    [f32_layer, bf16_layer]: [&MoeLayer; 2],
    mut torch: Option<&mut TorchContestant>,
    input: &[f32],
    reference: &[f32],
    decode_inputs: &[Vec<f32>],
) -> anyhow::Result<(Figures, f64)> {
    let hidden = args.shape().hidden_size;
    let mut client = Client::connect(cluster.router_url.clone()).await?;
    let cluster_output = client.forward_f32("", 0, input, hidden).await?;
    let cluster_error = relative_l2(&cluster_output, reference);
    // Warm every path once: allocations, connections, page faults.
    for decode_input in decode_inputs {
        client.forward_f32("", 0, decode_input, hidden).await?;
        f32_layer.forward(decode_input, args.decode_tokens);
    }

    let progress = if args.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(args.rounds as u64)
    };
    progress.set_style(
        ProgressStyle::with_template("{bar:40} round {pos}/{len}  {msg}  [{elapsed_precise}]")
            .expect("valid template"),
    );
    let tokens = (args.tokens * args.forwards) as f64;
    let time_layer = |layer: &MoeLayer| {
        tokio::task::block_in_place(|| {
            let started = Instant::now();
            for _ in 0..args.forwards {
                std::hint::black_box(layer.forward(input, args.tokens));
            }
            started.elapsed().as_secs_f64()
        })
    };
    let mut figures = Figures::default();
    for _ in 0..args.rounds {
        let ceiling_count = args.forwards * 4;
        let seconds = tokio::task::block_in_place(|| ceiling.run(ceiling_count));
        figures
            .ceiling_gflops
            .push(ceiling.flops() * ceiling_count as f64 / seconds / 1e9);

        figures
            .inprocess_tokens_per_s
            .push(tokens / time_layer(f32_layer));

        if let Some(torch) = torch.as_deref_mut() {
            let seconds = tokio::task::block_in_place(|| torch.run(args.forwards))?;
            figures.torch_tokens_per_s.push(tokens / seconds);
        }

        let started = Instant::now();
        for _ in 0..args.forwards {
            client.forward_f32("", 0, input, hidden).await?;
        }
        figures
            .cluster_sequential_tokens_per_s
            .push(tokens / started.elapsed().as_secs_f64());

        let started = Instant::now();
        let streams = (0..args.in_flight).map(|_| {
            let mut client = client.clone();
            async move {
                for _ in 0..args.forwards {
                    client.forward_f32("", 0, input, hidden).await?;
                }
                Ok::<_, moemesh_client::ClientError>(())
            }
        });
        futures::future::try_join_all(streams).await?;
        figures
            .cluster_tokens_per_s
            .push(tokens * args.in_flight as f64 / started.elapsed().as_secs_f64());

        figures
            .bf16_tokens_per_s
            .push(tokens / time_layer(bf16_layer));

        // Decode-sized forwards alternate between the two paths step by step.
        for step in 0..args.decode_steps {
            let decode_input = &decode_inputs[step % decode_inputs.len()];
            let started = Instant::now();
            tokio::task::block_in_place(|| {
                std::hint::black_box(f32_layer.forward(decode_input, args.decode_tokens))
            });
            figures
                .decode_inprocess_us
                .push(started.elapsed().as_secs_f64() * 1e6);
            let started = Instant::now();
            let (_, compute) = client
                .forward_f32_timed("", 0, decode_input, hidden)
                .await?;
            let latency = started.elapsed();
            figures.decode_cluster_us.push(latency.as_secs_f64() * 1e6);
            figures
                .decode_dispatch_us
                .push(latency.saturating_sub(compute).as_secs_f64() * 1e6);
        }
        progress.inc(1);
        progress.set_message(format!(
            "in process {:.0} tokens/s, cluster {:.0} tokens/s",
            figures.inprocess_tokens_per_s.0.last().unwrap_or(&0.0),
            figures.cluster_tokens_per_s.0.last().unwrap_or(&0.0)
        ));
    }
    progress.finish_and_clear();
    Ok((figures, cluster_error))
}

/// How long the nodes rest after the run before their memory is read:
/// idle nodes hand the buffers of past batches back to the OS.
const REST_BEFORE_MEMORY: Duration = Duration::from_secs(1);

async fn node_memory(cluster: &LocalCluster) -> anyhow::Result<Vec<NodeMemory>> {
    tokio::time::sleep(REST_BEFORE_MEMORY).await;
    let mut nodes = Vec::new();
    for (pid, url) in cluster.processes("expert") {
        let mut client = ExpertServiceClient::connect(url.clone())
            .await
            .with_context(|| format!("cannot reach the expert node at {url}"))?;
        let info = client.info(InfoRequest {}).await?.into_inner();
        let resident = pid.and_then(resident_bytes);
        nodes.push(NodeMemory {
            rss_bytes: resident.map(|(rss, _)| rss),
            peak_rss_bytes: resident.map(|(_, peak)| peak),
            weight_bytes: info.weight_bytes,
        });
    }
    Ok(nodes)
}

/// What the report needs besides the figures.
struct RunContext<'a> {
    args: &'a BenchArgs,
    threads: usize,
    threads_per_node: usize,
    torch_version: Option<String>,
    torch_skipped: Option<String>,
    torch_error: Option<f64>,
    cluster_error: f64,
    bf16_error: f64,
    memory: Vec<NodeMemory>,
    /// Tokens routed to each expert in the full batch.
    expert_loads: Vec<usize>,
    inprocess_flops: f64,
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

/// The derived figures: medians and the ratios the goals are stated in.
struct Summary {
    ceiling_gflops: f64,
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
        Self {
            ceiling_gflops: median(&figures.ceiling_gflops),
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
            decode_dispatch_p99_us: quantile(&figures.decode_dispatch_us, 0.99),
        }
    }
}

fn to_json(context: &RunContext<'_>, figures: &Figures) -> serde_json::Value {
    let summary = Summary::new(context, figures);
    let range = |samples: &Samples| samples.range().map(|(low, high)| json!([low, high]));
    let worst = context.worst_node();
    json!({
        "threads": context.threads,
        "threads_per_expert_node": context.threads_per_node,
        "tokens_per_expert": context.expert_loads,
        "rounds": context.args.rounds,
        "tokens": context.args.tokens,
        "decode_tokens": context.args.decode_tokens,
        "ceiling_gflops": summary.ceiling_gflops,
        "inprocess_tokens_per_s": summary.inprocess_tokens_per_s,
        "inprocess_gflops": summary.inprocess_gflops,
        "inprocess_over_ceiling": summary.inprocess_gflops / summary.ceiling_gflops,
        "torch_tokens_per_s": summary.torch_tokens_per_s,
        "torch_skipped": context.torch_skipped,
        "torch_version": context.torch_version,
        "inprocess_over_torch": summary.torch_tokens_per_s.map(|torch| summary.inprocess_tokens_per_s / torch),
        "cluster_tokens_per_s": summary.cluster_tokens_per_s,
        "cluster_over_inprocess": summary.cluster_tokens_per_s / summary.inprocess_tokens_per_s,
        "cluster_in_flight": context.args.in_flight,
        "cluster_sequential_tokens_per_s": summary.cluster_sequential_tokens_per_s,
        "decode_p50_us_inprocess": summary.decode_p50_us_inprocess,
        "decode_p99_us_inprocess": summary.decode_p99_us_inprocess,
        "decode_p50_us_cluster": summary.decode_p50_us_cluster,
        "decode_p99_us_cluster": summary.decode_p99_us_cluster,
        "decode_dispatch_overhead_p50_us": summary.decode_p50_us_cluster - summary.decode_p50_us_inprocess,
        "decode_dispatch_p50_us": summary.decode_dispatch_p50_us,
        "decode_dispatch_p99_us": summary.decode_dispatch_p99_us,
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
            "inprocess_tokens_per_s": range(&figures.inprocess_tokens_per_s),
            "torch_tokens_per_s": range(&figures.torch_tokens_per_s),
            "cluster_tokens_per_s": range(&figures.cluster_tokens_per_s),
            "cluster_sequential_tokens_per_s": range(&figures.cluster_sequential_tokens_per_s),
            "bf16_tokens_per_s": range(&figures.bf16_tokens_per_s),
        },
    })
}

/// "met" or "missed" against a goal of at least `goal`.
fn verdict(value: f64, goal: f64) -> &'static str {
    if value >= goal { "met" } else { "MISSED" }
}

fn print_table(context: &RunContext<'_>, figures: &Figures) {
    let summary = Summary::new(context, figures);
    let args = context.args;
    let shape = args.shape();
    let range = |samples: &Samples, scale: f64| {
        samples.range().map_or(String::new(), |(low, high)| {
            format!("{:.0}-{:.0}", low * scale, high * scale)
        })
    };
    println!(
        "moemesh bench: Mixtral-shaped layer (hidden {}, intermediate {}, {} experts, top-{}, f32), {} threads, {} rounds (median, range)",
        shape.hidden_size,
        shape.intermediate_size,
        shape.experts,
        shape.top_k,
        context.threads,
        args.rounds
    );
    println!();
    println!(
        "{:<44} {:>12} {:>15}   ratio (goal)",
        "contestant", "median", "range"
    );
    let ceiling = summary.ceiling_gflops;
    println!(
        "{:<44} {:>12} {:>15}",
        format!(
            "ceiling: GEMM {}x{}x{}",
            args.tokens, shape.hidden_size, shape.intermediate_size
        ),
        format!("{ceiling:.1} GFLOP/s"),
        range(&figures.ceiling_gflops, 1.0)
    );
    let over_ceiling = summary.inprocess_gflops / ceiling;
    println!(
        "{:<44} {:>12} {:>15}   {:.2} of ceiling, {:.1} GFLOP/s (>= 0.85: {})",
        format!("experts in process, {} tokens", args.tokens),
        format!("{:.0} tok/s", summary.inprocess_tokens_per_s),
        range(&figures.inprocess_tokens_per_s, 1.0),
        over_ceiling,
        summary.inprocess_gflops,
        verdict(over_ceiling, 0.85)
    );
    match (summary.torch_tokens_per_s, &context.torch_skipped) {
        (Some(torch), _) => {
            let ratio = summary.inprocess_tokens_per_s / torch;
            println!(
                "{:<44} {:>12} {:>15}   in process is {ratio:.2}x PyTorch (>= 1.3: {})",
                "PyTorch MixtralSparseMoeBlock",
                format!("{torch:.0} tok/s"),
                range(&figures.torch_tokens_per_s, 1.0),
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
    let over_inprocess = summary.cluster_tokens_per_s / summary.inprocess_tokens_per_s;
    println!(
        "{:<44} {:>12} {:>15}   {over_inprocess:.2} of in process (>= 0.85: {})",
        format!(
            "cluster, 2 nodes x {} threads, {} in flight",
            context.threads_per_node, args.in_flight
        ),
        format!("{:.0} tok/s", summary.cluster_tokens_per_s),
        range(&figures.cluster_tokens_per_s, 1.0),
        verdict(over_inprocess, 0.85)
    );
    println!(
        "{:<44} {:>12} {:>15}   {:.2} of in process",
        "cluster, one request at a time",
        format!("{:.0} tok/s", summary.cluster_sequential_tokens_per_s),
        range(&figures.cluster_sequential_tokens_per_s, 1.0),
        summary.cluster_sequential_tokens_per_s / summary.inprocess_tokens_per_s
    );
    let overhead = summary.decode_p50_us_cluster - summary.decode_p50_us_inprocess;
    println!(
        "{:<44} {:>12} {:>15}",
        format!("decode {} tokens in process, p50 / p99", args.decode_tokens),
        format!("{:.0} us", summary.decode_p50_us_inprocess),
        format!("p99 {:.0} us", summary.decode_p99_us_inprocess),
    );
    println!(
        "{:<44} {:>12} {:>15}   dispatch overhead p50 {overhead:.0} us (<= 200: {})",
        format!(
            "decode {} tokens through the cluster, p50 / p99",
            args.decode_tokens
        ),
        format!("{:.0} us", summary.decode_p50_us_cluster),
        format!("p99 {:.0} us", summary.decode_p99_us_cluster),
        if overhead <= 200.0 { "met" } else { "MISSED" }
    );
    println!(
        "{:<44} {:>12} {:>15}   latency minus the slowest node's compute (<= 200: {})",
        "decode dispatch alone, p50 / p99",
        format!("{:.0} us", summary.decode_dispatch_p50_us),
        format!("p99 {:.0} us", summary.decode_dispatch_p99_us),
        if summary.decode_dispatch_p50_us <= 200.0 {
            "met"
        } else {
            "MISSED"
        }
    );
    let bf16_ratio = summary.bf16_tokens_per_s / summary.inprocess_tokens_per_s;
    println!(
        "{:<44} {:>12} {:>15}   {bf16_ratio:.2} of f32 (>= 0.9: {})",
        "bf16 weights in process",
        format!("{:.0} tok/s", summary.bf16_tokens_per_s),
        range(&figures.bf16_tokens_per_s, 1.0),
        verdict(bf16_ratio, 0.9)
    );
    for (index, node) in context.memory.iter().enumerate() {
        let mib = |bytes: u64| bytes as f64 / (1 << 20) as f64;
        match (node.rss_bytes, node.peak_rss_bytes) {
            (Some(rss), Some(peak)) => {
                let ratio = rss as f64 / node.weight_bytes.max(1) as f64;
                println!(
                    "{:<44} {:>12} {:>15}   {ratio:.3} of its {:.0} MiB of weights (<= 1.15: {})",
                    format!("expert node {index}: resident memory at rest"),
                    format!("{:.0} MiB", mib(rss)),
                    format!("peak {:.0} MiB", mib(peak)),
                    mib(node.weight_bytes),
                    if ratio <= 1.15 { "met" } else { "MISSED" }
                );
            }
            _ => println!(
                "{:<44} {:>12}   (no /proc on this system)",
                format!("expert node {index}: resident memory"),
                "unknown"
            ),
        }
    }
    println!();
    println!(
        "check (relative L2 vs the in-process f32 layer): cluster {:.1e}, PyTorch {}, bf16 weights {:.1e} (bf16 rounding)",
        context.cluster_error,
        context
            .torch_error
            .map_or("skipped".to_string(), |error| format!("{error:.1e}")),
        context.bf16_error
    );
    println!(
        "tokens per expert in the {}-token batch: {:?}",
        args.tokens, context.expert_loads
    );
    if let Some(version) = &context.torch_version {
        println!("PyTorch: {version}");
    }
}
