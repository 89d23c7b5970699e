//! `moemesh soak`: many clients against a local cluster for a bounded
//! time, watching for errors and for memory that keeps growing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use moemesh_client::{Client, TlsArgs};
use rand::SeedableRng;

use super::resident_bytes;
use crate::local_cluster::{LocalCluster, UpArgs};
use crate::stats::random_hidden;
use crate::synthetic::{SyntheticShape, write_mixtral};

#[derive(clap::Args)]
pub struct SoakArgs {
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 180)]
    duration_s: u64,
    /// Concurrent clients, each with one request in flight.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Tokens per request.
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    /// Expert nodes; every expert is on two of them.
    #[arg(long, default_value_t = 3)]
    expert_nodes: usize,
    /// Seconds between memory samples.
    #[arg(long, default_value_t = 10)]
    sample_s: u64,
}

pub async fn run_soak(args: SoakArgs, tls: &TlsArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.clients > 0 && args.tokens > 0 && args.duration_s > 0,
        "--clients, --tokens and --duration-s must be positive"
    );
    let dir = tempfile::Builder::new().prefix("moemesh-soak-").tempdir()?;
    let shape = SyntheticShape::DEMO;
    write_mixtral(dir.path(), shape, 31)?;
    let cluster = LocalCluster::start(
        &UpArgs {
            model: dir.path().to_path_buf(),
            expert_nodes: args.expert_nodes,
            replicas: 2,
            router_addr: "127.0.0.1:0".into(),
            threads_per_node: 0,
            model_id: Some("soak".into()),
            coordinators: 3,
            announce: false,
            node_memory_bytes: None,
            tiers: Default::default(),
        },
        tls,
    )
    .await?;
    let result = soak(&cluster, &args, shape.hidden_size).await;
    cluster.shutdown().await?;
    result
}

async fn soak(cluster: &LocalCluster, args: &SoakArgs, hidden: usize) -> anyhow::Result<()> {
    let client = Client::connect_with_tls(cluster.router_url.clone(), &cluster.tls).await?;
    let counters = Counters::default();
    let tasks: Vec<_> = (0..args.clients)
        .map(|index| spawn_client(client.clone(), index, args.tokens, hidden, &counters))
        .collect();
    let processes = cluster_processes(cluster);
    let rss_now = || -> Vec<u64> {
        processes
            .iter()
            .map(|(_, pid)| pid.and_then(resident_bytes).map_or(0, |(rss, _)| rss))
            .collect()
    };
    let started = Instant::now();
    let duration = Duration::from_secs(args.duration_s);
    let mut first_sample: Option<Vec<u64>> = None;
    let mut last_sample = rss_now();
    println!(
        "{:>6} {:>12} {:>8} {:>14}",
        "time", "requests", "errors", "total RSS MiB"
    );
    while started.elapsed() < duration {
        tokio::time::sleep(
            Duration::from_secs(args.sample_s).min(duration.saturating_sub(started.elapsed())),
        )
        .await;
        last_sample = rss_now();
        // The first sample, once warm, is the baseline growth is measured from.
        if first_sample.is_none() && started.elapsed() >= Duration::from_secs(args.sample_s) {
            first_sample = Some(last_sample.clone());
        }
        println!(
            "{:>5.0}s {:>12} {:>8} {:>14.1}",
            started.elapsed().as_secs_f64(),
            counters.served.load(Ordering::Relaxed),
            counters.errors.load(Ordering::Relaxed),
            last_sample.iter().sum::<u64>() as f64 / (1 << 20) as f64
        );
    }
    counters.stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let served = counters.served.load(Ordering::Relaxed);
    let errors = counters.errors.load(Ordering::Relaxed);
    println!();
    println!(
        "soak: {} clients for {elapsed:.0} s: {served} requests ({:.0} tokens/s), {errors} errors",
        args.clients,
        served as f64 * args.tokens as f64 / elapsed
    );
    let baseline = first_sample.unwrap_or_else(|| last_sample.clone());
    print_memory_table(&processes, &baseline, &last_sample);
    anyhow::ensure!(errors == 0, "{errors} requests failed");
    Ok(())
}

/// What the clients share with the soak that watches them.
#[derive(Default)]
struct Counters {
    /// Set when the soak is over; each client stops after its request in flight.
    stop: Arc<AtomicBool>,
    /// Requests answered.
    served: Arc<AtomicU64>,
    /// Requests failed.
    errors: Arc<AtomicU64>,
}

/// One client with one request in flight, alternating between layers 0
/// and 1, until `counters.stop` is set.
fn spawn_client(
    mut client: Client,
    index: usize,
    tokens: usize,
    hidden: usize,
    counters: &Counters,
) -> tokio::task::JoinHandle<()> {
    let (stop, served, errors) = (
        Arc::clone(&counters.stop),
        Arc::clone(&counters.served),
        Arc::clone(&counters.errors),
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(index as u64);
    let inputs: Vec<Vec<f32>> = (0..4)
        .map(|_| random_hidden(&mut rng, tokens, hidden))
        .collect();
    tokio::spawn(async move {
        let mut next = 0;
        while !stop.load(Ordering::Relaxed) {
            let layer = (next % 2) as u32;
            match client
                .forward_f32("", layer, &inputs[next % inputs.len()], hidden)
                .await
            {
                Ok(_) => served.fetch_add(1, Ordering::Relaxed),
                Err(error) => {
                    eprintln!("request failed: {error}");
                    errors.fetch_add(1, Ordering::Relaxed)
                }
            };
            next += 1;
        }
    })
}

/// Every process of the cluster, named by role and address, with its pid.
fn cluster_processes(cluster: &LocalCluster) -> Vec<(String, Option<u32>)> {
    ["coordinator", "expert", "router"]
        .iter()
        .flat_map(|role| {
            cluster
                .processes(role)
                .into_iter()
                .map(move |process| (format!("{role} {}", process.url), process.pid))
        })
        .collect()
}

/// Each process's resident memory at the baseline, at the end, and at its peak.
fn print_memory_table(processes: &[(String, Option<u32>)], baseline: &[u64], last_sample: &[u64]) {
    println!(
        "{:<42} {:>12} {:>12} {:>12}",
        "process", "RSS start", "RSS end", "peak"
    );
    for (index, (name, pid)) in processes.iter().enumerate() {
        let peak = pid.and_then(resident_bytes).map_or(0, |(_, peak)| peak);
        let mib = |bytes: u64| format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64);
        println!(
            "{name:<42} {:>12} {:>12} {:>12}",
            mib(baseline[index]),
            mib(last_sample[index]),
            mib(peak)
        );
    }
}
