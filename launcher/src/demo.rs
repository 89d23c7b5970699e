//! `moemesh demo`: a local multi-process cluster, a workload and a report.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use moemesh_client::{Client, CoordinatorClient, TlsArgs};
use moemesh_core::compute::CpuBackend;
use moemesh_core::layer::MoeLayer;
use moemesh_core::model::checkpoint::Checkpoint;
use moemesh_proto::ExpertServiceClient;
use moemesh_proto::NodeStatus;
use moemesh_proto::v1::InfoRequest;
use rand::SeedableRng;

use crate::local_cluster::{LocalCluster, UpArgs};
use crate::stats::{percentile, random_hidden, relative_l2};
use crate::synthetic::{SyntheticShape, write_mixtral};

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Model directory to serve; by default a synthetic Mixtral-shaped checkpoint is written to a temporary directory.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Number of expert node processes.
    #[arg(long, default_value_t = 2)]
    expert_nodes: usize,
    /// Replicas of every expert.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// Forward requests to send, spread over the MoE layers.
    #[arg(long, default_value_t = 192)]
    requests: usize,
    /// Tokens per request.
    #[arg(long, default_value_t = 128)]
    tokens: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Compute threads per expert node; 0 divides the cores among the nodes.
    #[arg(long, default_value_t = 0)]
    threads_per_node: usize,
    /// Coordinator processes the expert nodes register with; 0 runs without.
    #[arg(long, default_value_t = 3)]
    coordinators: usize,
    /// Compare the cluster's output with the layer computed in this process
    /// (on by default for the synthetic model; loads one layer's experts here).
    #[arg(long)]
    verify: Option<bool>,
}

pub async fn run_demo(args: DemoArgs, tls: &TlsArgs) -> anyhow::Result<()> {
    if args.requests == 0 || args.tokens == 0 || args.concurrency == 0 {
        anyhow::bail!("--requests, --tokens and --concurrency must be at least 1");
    }
    let synthetic_dir;
    let model = match &args.model {
        Some(model) => model.clone(),
        None => {
            synthetic_dir = tempfile::Builder::new()
                .prefix("moemesh-demo-model-")
                .tempdir()?;
            let shape = SyntheticShape::DEMO;
            eprintln!(
                "writing a synthetic Mixtral-shaped checkpoint (hidden {}, intermediate {}, {} experts, top-{}, {} layers) to {}",
                shape.hidden_size,
                shape.intermediate_size,
                shape.experts,
                shape.top_k,
                shape.layers,
                synthetic_dir.path().display()
            );
            write_mixtral(synthetic_dir.path(), shape, 7)?;
            synthetic_dir.path().to_path_buf()
        }
    };
    let verify = args.verify.unwrap_or(args.model.is_none());
    let up = UpArgs {
        model: model.clone(),
        expert_nodes: args.expert_nodes,
        replicas: args.replicas,
        router_addr: "127.0.0.1:0".into(),
        threads_per_node: args.threads_per_node,
        model_id: Some("demo".into()),
        coordinators: args.coordinators,
        announce: true,
        node_memory_bytes: None,
        tiers: Default::default(),
    };
    let cluster = LocalCluster::start(&up, tls).await?;
    let result = drive(&cluster, &args, &model, verify).await;
    eprintln!("stopping the cluster");
    cluster.shutdown().await?;
    result?;
    eprintln!("cluster stopped cleanly");
    Ok(())
}

async fn drive(
    cluster: &LocalCluster,
    args: &DemoArgs,
    model: &std::path::Path,
    verify: bool,
) -> anyhow::Result<()> {
    let config = &cluster.config;
    let hidden = config.hidden_size;
    let layers = config.moe_layers();
    let client = Client::connect_with_tls(cluster.router_url.clone(), &cluster.tls).await?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);

    if verify {
        let checkpoint = Checkpoint::open(model)?;
        let backend = CpuBackend::new(1)?;
        let layer = layers[0];
        let in_process = MoeLayer::load(&checkpoint, layer, &backend)?;
        let input = random_hidden(&mut rng, args.tokens, hidden);
        let want = in_process.forward(&input, args.tokens)?;
        let got = client
            .clone()
            .forward_f32("", layer as u32, &input, hidden)
            .await?;
        let error = relative_l2(&got, &want);
        println!(
            "check: layer {layer} through the cluster vs in process, relative L2 error {error:.2e}"
        );
        anyhow::ensure!(
            error < 1e-5,
            "the cluster's output differs from the in-process layer"
        );
    }

    let progress = ProgressBar::new(args.requests as u64);
    progress.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} requests  {msg}  [{elapsed_precise}]")
            .expect("valid template"),
    );
    let inputs: Vec<Arc<Vec<f32>>> = (0..args.requests.min(16))
        .map(|_| Arc::new(random_hidden(&mut rng, args.tokens, hidden)))
        .collect();
    let semaphore = Arc::new(tokio::sync::Semaphore::new(args.concurrency));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut latencies = Vec::with_capacity(args.requests);
    let record = |latency: Duration, latencies: &mut Vec<Duration>| {
        latencies.push(latency);
        progress.inc(1);
        let seconds = started.elapsed().as_secs_f64();
        progress.set_message(format!(
            "{:.0} tokens/s",
            latencies.len() as f64 * args.tokens as f64 / seconds
        ));
    };
    for request in 0..args.requests {
        let permit = Arc::clone(&semaphore).acquire_owned().await?;
        let mut client = client.clone();
        let input = Arc::clone(&inputs[request % inputs.len()]);
        let layer = layers[request % layers.len()] as u32;
        tasks.spawn(async move {
            let sent = Instant::now();
            let result = client.forward_f32("", layer, &input, hidden).await;
            drop(permit);
            result.map(|_| sent.elapsed())
        });
        while let Some(done) = tasks.try_join_next() {
            record(done??, &mut latencies);
        }
    }
    while let Some(done) = tasks.join_next().await {
        record(done??, &mut latencies);
    }
    let elapsed = started.elapsed();
    progress.finish_and_clear();
    report(cluster, args, elapsed, latencies).await
}

/// One line of what the coordinators say: leader, epoch, ready nodes.
async fn print_coordinators_view(cluster: &LocalCluster) -> anyhow::Result<()> {
    let status = CoordinatorClient::new(cluster.coordinator_urls.clone(), cluster.tls.clone())?
        .cluster_status()
        .await?;
    let ready = status
        .nodes
        .iter()
        .filter(|node| node.status() == NodeStatus::Ready)
        .count();
    println!(
        "coordinators: {} (leader {}, term {}), placement epoch {}, expert nodes ready {ready}/{}",
        status.coordinators.len(),
        status.leader_id,
        status.term,
        status.epoch,
        status.nodes.len()
    );
    Ok(())
}

async fn report(
    cluster: &LocalCluster,
    args: &DemoArgs,
    elapsed: Duration,
    mut latencies: Vec<Duration>,
) -> anyhow::Result<()> {
    latencies.sort();
    let tokens = args.requests * args.tokens;
    println!(
        "served {} requests of {} tokens ({} tokens) in {:.2} s over {} expert nodes, {} in flight",
        args.requests,
        args.tokens,
        tokens,
        elapsed.as_secs_f64(),
        args.expert_nodes,
        args.concurrency
    );
    println!(
        "throughput: {:.0} tokens/s",
        tokens as f64 / elapsed.as_secs_f64()
    );
    let ms = |duration: Duration| duration.as_secs_f64() * 1e3;
    println!(
        "latency per request: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        ms(percentile(&latencies, 0.5)),
        ms(percentile(&latencies, 0.9)),
        ms(percentile(&latencies, 0.99)),
        ms(*latencies.last().expect("at least one request"))
    );

    let mut per_expert: BTreeMap<(u32, u32), u64> = BTreeMap::new();
    println!("tokens per node:");
    for node in cluster.placement.nodes() {
        let channel = cluster
            .tls
            .connect(node.address.clone())
            .await
            .with_context(|| format!("cannot reach expert node {}", node.id))?;
        let mut client = ExpertServiceClient::new(channel);
        let info = client.info(InfoRequest {}).await?.into_inner();
        let node_tokens: u64 = info.load.iter().map(|load| load.tokens).sum();
        println!(
            "  {:<10} {:>9} token-expert pairs   {} experts, {} MiB of weights, {}",
            node.id,
            node_tokens,
            info.load.len(),
            info.weight_bytes >> 20,
            info.backend
        );
        for load in info.load {
            *per_expert.entry((load.layer, load.expert)).or_default() += load.tokens;
        }
    }
    if !cluster.coordinator_urls.is_empty() {
        print_coordinators_view(cluster).await?;
    }
    println!("tokens per expert (all requests, including the check):");
    let experts = cluster.config.experts_per_layer();
    let mut header = String::from("  layer");
    for expert in 0..experts {
        header.push_str(&format!(
            " {:>7}",
            if Some(expert as u32) == cluster.config.shared_expert_id() {
                "shared".to_string()
            } else {
                format!("e{expert}")
            }
        ));
    }
    println!("{header}");
    for layer in cluster.config.moe_layers() {
        let mut line = format!("  {layer:>5}");
        for expert in 0..experts as u32 {
            line.push_str(&format!(
                " {:>7}",
                per_expert
                    .get(&(layer as u32, expert))
                    .copied()
                    .unwrap_or(0)
            ));
        }
        println!("{line}");
    }
    Ok(())
}
