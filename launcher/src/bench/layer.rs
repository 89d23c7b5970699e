//! `moemesh bench`: moemesh's speed beside the machine's own limit and
//! beside PyTorch, measured in one run on one machine.
//!
//! Every contestant computes the same Mixtral-shaped MoE layer (hidden
//! 1024, intermediate 2816, 8 experts, top-2, f32) on the same input with
//! the same number of threads. The run is split into rounds, and each round
//! runs every contestant once in turn, so that drift in the machine's speed
//! (other tenants, clocks, heat) falls on all of them alike; the report
//! gives each figure's median over the rounds and its range.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::bail;
use indicatif::{ProgressBar, ProgressStyle};
use moemesh_client::npy::{Matrix, read_matrix, write_matrix};
use moemesh_client::{Client, DEFAULT_DEADLINE, TlsArgs};
use moemesh_proto::tls::MemberChannel;
use moemesh_router_node::{DirectClient, ModelSource, PlacementSource};
use rand::SeedableRng;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use super::bandwidth::{BUFFER_BYTES, ReadBandwidth, decode_bytes};
use super::contestants::{Ceiling, InProcessLayers, TorchContestant};
use super::figures::{Figures, NodeMemory};
use super::report::{RunContext, print_report};
use super::round::Round;
use super::{expert_node_info, resident_bytes};
use crate::local_cluster::{LocalCluster, UpArgs};
use crate::stats::{random_hidden, relative_l2};
use crate::synthetic::{SyntheticShape, write_mixtral};

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
    pub(super) rounds: usize,
    /// Forwards per contestant per round at the full batch size.
    #[arg(long, default_value_t = 3)]
    pub(super) forwards: usize,
    /// Tokens per forward for the throughput contestants.
    #[arg(long, default_value_t = 512)]
    pub(super) tokens: usize,
    /// Tokens per forward for the decode latencies.
    #[arg(long, default_value_t = 8)]
    pub(super) decode_tokens: usize,
    /// Requests in flight at once for the cluster's throughput (a serving
    /// cluster overlaps one request's transfers with another's compute);
    /// the one-at-a-time figure is reported beside it.
    #[arg(long, default_value_t = 2)]
    pub(super) in_flight: usize,
    /// Decode-sized forwards per round, in process and through the cluster each.
    #[arg(long, default_value_t = 40)]
    pub(super) decode_steps: usize,
    /// Python interpreter with torch and transformers for the PyTorch contestant.
    #[arg(long, default_value = "python3")]
    python: String,
    /// Skips the PyTorch contestant.
    #[arg(long)]
    no_torch: bool,
    /// Prints one JSON object on stdout instead of the table.
    #[arg(long)]
    pub(super) json: bool,
    /// A tiny layer instead, to check that the bench itself runs.
    #[arg(long, hide = true)]
    small: bool,
}

impl BenchArgs {
    pub(super) fn shape(&self) -> SyntheticShape {
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

    fn validate(&self) -> anyhow::Result<()> {
        if self.rounds == 0
            || self.forwards == 0
            || self.tokens == 0
            || self.decode_tokens == 0
            || self.in_flight == 0
        {
            bail!(
                "--rounds, --forwards, --tokens, --decode-tokens and --in-flight must be at least 1"
            );
        }
        Ok(())
    }

    /// Compute threads for every contestant: --threads, or every core.
    fn compute_threads(&self) -> usize {
        if self.threads == 0 {
            std::thread::available_parallelism().map_or(1, |cores| cores.get())
        } else {
            self.threads
        }
    }

    /// Compute threads of each of the two expert nodes.
    fn threads_per_node(&self, threads: usize) -> usize {
        if self.node_threads == 0 {
            (threads / 2).max(1)
        } else {
            self.node_threads
        }
    }
}

pub async fn run_bench(args: BenchArgs, tls: &TlsArgs) -> anyhow::Result<()> {
    args.validate()?;
    let threads = args.compute_threads();
    let workdir = tempfile::Builder::new()
        .prefix("moemesh-bench-")
        .tempdir()?;
    let shape = args.shape();
    let model = write_model(workdir.path(), shape)?;
    let hidden = shape.hidden_size;
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let input = random_hidden(&mut rng, args.tokens, hidden);
    let decode_inputs: Vec<Vec<f32>> = (0..16)
        .map(|_| random_hidden(&mut rng, args.decode_tokens, hidden))
        .collect();

    eprintln!("loading the in-process layers ({threads} threads)");
    let in_process = InProcessLayers::load(&model, threads, &input, args.tokens, shape.experts)?;
    let mut ceiling = Ceiling::new(threads, args.tokens, shape)?;
    let bandwidth_bytes = if args.small { 16 << 20 } else { BUFFER_BYTES };
    let bandwidth = ReadBandwidth::new(threads, bandwidth_bytes)?;
    let (mut torch, torch_error) = start_torch(
        &args,
        workdir.path(),
        &model,
        &input,
        &in_process.reference,
        threads,
    )?;

    let threads_per_node = args.threads_per_node(threads);
    let cluster = start_cluster(&args, tls, model.clone(), threads_per_node).await?;
    let result = measure(
        &args,
        &cluster,
        &model,
        &mut ceiling,
        &bandwidth,
        &in_process,
        torch.as_mut().ok(),
        &input,
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
        bf16_error: in_process.bf16_error,
        memory: memory?,
        expert_loads: in_process.expert_loads,
        inprocess_flops: layer_flops(shape, args.tokens),
    };
    print_report(&context, &figures)
}

/// Writes the synthetic layer every contestant computes; returns its folder.
fn write_model(workdir: &Path, shape: SyntheticShape) -> anyhow::Result<PathBuf> {
    let model = workdir.join("model");
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
    Ok(model)
}

/// Starts the PyTorch contestant on `input` unless --no-torch; returns it
/// (or why it is skipped) and its output's relative L2 error against
/// `reference`.
fn start_torch(
    args: &BenchArgs,
    workdir: &Path,
    model: &Path,
    input: &[f32],
    reference: &[f32],
    threads: usize,
) -> anyhow::Result<(Result<TorchContestant, String>, Option<f64>)> {
    let input_path = workdir.join("input.npy");
    let torch_output_path = workdir.join("torch_output.npy");
    write_matrix(
        &input_path,
        &Matrix {
            rows: args.tokens,
            columns: args.shape().hidden_size,
            values: input.to_vec(),
        },
    )?;
    let torch = if args.no_torch {
        Err("--no-torch".to_string())
    } else {
        eprintln!("starting the PyTorch contestant ({})", args.python);
        tokio::task::block_in_place(|| {
            TorchContestant::start(
                &args.python,
                workdir,
                model,
                &input_path,
                &torch_output_path,
                threads,
            )
        })
    };
    let torch_error = match &torch {
        Ok(_) => Some(relative_l2(
            &read_matrix(&torch_output_path)?.values,
            reference,
        )),
        Err(reason) => {
            eprintln!("skipping PyTorch: {reason}");
            None
        }
    };
    Ok((torch, torch_error))
}

/// A router and two expert nodes on `model`, without coordinators.
async fn start_cluster(
    args: &BenchArgs,
    tls: &TlsArgs,
    model: PathBuf,
    threads_per_node: usize,
) -> anyhow::Result<LocalCluster> {
    eprintln!("starting a router and two expert nodes ({threads_per_node} threads each)");
    LocalCluster::start(
        &UpArgs {
            model,
            expert_nodes: 2,
            replicas: 1,
            router_addr: "127.0.0.1:0".into(),
            threads_per_node,
            model_id: Some("bench".into()),
            coordinators: 0,
            announce: !args.json,
            node_memory_bytes: None,
            tiers: Default::default(),
        },
        tls,
    )
    .await
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

/// Runs every round; returns the figures and the cluster's relative L2
/// error against the in-process f32 layer.
#[allow(clippy::too_many_arguments)]
async fn measure(
    args: &BenchArgs,
    cluster: &LocalCluster,
    model: &Path,
    ceiling: &mut Ceiling,
    bandwidth: &ReadBandwidth,
    in_process: &InProcessLayers,
    torch: Option<&mut TorchContestant>,
    input: &[f32],
    decode_inputs: &[Vec<f32>],
) -> anyhow::Result<(Figures, f64)> {
    let hidden = args.shape().hidden_size;
    let mut client = Client::connect_with_tls(cluster.router_url.clone(), &cluster.tls).await?;
    let cluster_output = client.forward_f32("", 0, input, hidden).await?;
    let cluster_error = relative_l2(&cluster_output, &in_process.reference);
    let one_hop = one_hop_client(cluster, model).await?;
    let one_hop_output = one_hop.forward_f32(0, input, DEFAULT_DEADLINE).await?;
    if one_hop_output != cluster_output {
        bail!("the one-hop client's output differs from the router's");
    }
    // Warm every path once: allocations, connections, page faults.
    for decode_input in decode_inputs {
        client.forward_f32("", 0, decode_input, hidden).await?;
        one_hop
            .forward_f32(0, decode_input, DEFAULT_DEADLINE)
            .await?;
        in_process
            .f32_layer
            .forward(decode_input, args.decode_tokens)?;
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
    let shape = args.shape();
    let expert_bytes = (3 * shape.hidden_size * shape.intermediate_size * size_of::<f32>()) as u64;
    let decode_bytes: Vec<u64> = decode_inputs
        .iter()
        .map(|decode_input| {
            decode_bytes(
                &in_process.f32_layer,
                decode_input,
                args.decode_tokens,
                expert_bytes,
            )
        })
        .collect();
    let mut round = Round {
        args,
        hidden,
        client,
        one_hop,
        ceiling,
        bandwidth,
        in_process,
        torch,
        input,
        decode_inputs,
        decode_bytes: &decode_bytes,
        round_trip: round_trip_client(cluster).await?,
    };
    let mut figures = Figures::default();
    for _ in 0..args.rounds {
        round.run(&mut figures).await?;
        progress.inc(1);
        progress.set_message(format!(
            "in process {:.0} tokens/s, cluster {:.0} tokens/s",
            figures.inprocess_tokens_per_s.last().unwrap_or(0.0),
            figures.cluster_tokens_per_s.last().unwrap_or(0.0)
        ));
    }
    progress.finish_and_clear();
    Ok((figures, cluster_error))
}

/// A health client of the router on a channel set up as `Client`'s (the
/// data path's windows and frames, no Nagle delay, the member's credentials).
async fn round_trip_client(cluster: &LocalCluster) -> anyhow::Result<HealthClient<MemberChannel>> {
    let endpoint = cluster.tls.endpoint(cluster.router_url.clone())?;
    let channel = moemesh_proto::data_path_channel(endpoint).await?;
    let mut client = HealthClient::new(cluster.tls.channel(channel));
    // Warm the connection and the handler once.
    client.check(HealthCheckRequest::default()).await?;
    Ok(client)
}

/// A one-hop client of the cluster: the router's placement file, the
/// model's gates, and an application's credentials.
async fn one_hop_client(cluster: &LocalCluster, model: &Path) -> anyhow::Result<DirectClient> {
    let placement = cluster
        .placement
        .to_file(&cluster.config, Some(cluster.model_id.clone()));
    Ok(DirectClient::start(
        PlacementSource::File(placement),
        &cluster.model_id,
        ModelSource::Checkpoint(model.to_path_buf()),
        cluster.application_tls.clone(),
    )
    .await?)
}

/// How long the nodes rest after the run before their memory is read:
/// idle nodes hand the buffers of past batches back to the OS.
const REST_BEFORE_MEMORY: Duration = Duration::from_secs(1);

async fn node_memory(cluster: &LocalCluster) -> anyhow::Result<Vec<NodeMemory>> {
    tokio::time::sleep(REST_BEFORE_MEMORY).await;
    let nodes = expert_node_info(cluster).await?;
    Ok(nodes
        .into_iter()
        .map(|(pid, info)| {
            let resident = pid.and_then(resident_bytes);
            NodeMemory {
                rss_bytes: resident.map(|(rss, _)| rss),
                peak_rss_bytes: resident.map(|(_, peak)| peak),
                weight_bytes: info.weight_bytes,
            }
        })
        .collect())
}
