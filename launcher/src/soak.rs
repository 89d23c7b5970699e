//! `moemesh soak`: many clients against a local cluster for a bounded
//! time, watching for errors and for memory that keeps growing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use moemesh_client::Client;
use rand::SeedableRng;

use crate::local_cluster::{LocalCluster, UpArgs};
use crate::stats::{random_hidden, resident_bytes};
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

pub async fn run_soak(args: SoakArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.clients > 0 && args.tokens > 0 && args.duration_s > 0,
        "--clients, --tokens and --duration-s must be positive"
    );
    let dir = tempfile::Builder::new().prefix("moemesh-soak-").tempdir()?;
    let shape = SyntheticShape::DEMO;
    write_mixtral(dir.path(), shape, 31)?;
    let cluster = LocalCluster::start(&UpArgs {
        model: dir.path().to_path_buf(),
        expert_nodes: args.expert_nodes,
        replicas: 2,
        router_addr: "127.0.0.1:0".into(),
        threads_per_node: 0,
        model_id: Some("soak".into()),
        coordinators: 3,
        announce: false,
        node_memory_bytes: None,
    })
    .await?;
    let result = soak(&cluster, &args, shape.hidden_size).await;
    cluster.shutdown().await?;
    result
}

async fn soak(cluster: &LocalCluster, args: &SoakArgs, hidden: usize) -> anyhow::Result<()> {
    let client = Client::connect(cluster.router_url.clone()).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for index in 0..args.clients {
        let mut client = client.clone();
        let (stop, served, errors) = (Arc::clone(&stop), Arc::clone(&served), Arc::clone(&errors));
        let mut rng = rand::rngs::StdRng::seed_from_u64(index as u64);
        let inputs: Vec<Vec<f32>> = (0..4)
            .map(|_| random_hidden(&mut rng, args.tokens, hidden))
            .collect();
        tasks.push(tokio::spawn(async move {
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
        }));
    }
    let processes: Vec<(String, Option<u32>)> = ["coordinator", "expert", "router"]
        .iter()
        .flat_map(|role| {
            cluster
                .processes(role)
                .into_iter()
                .map(move |(pid, url)| (format!("{role} {url}"), pid))
        })
        .collect();
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
            served.load(Ordering::Relaxed),
            errors.load(Ordering::Relaxed),
            last_sample.iter().sum::<u64>() as f64 / (1 << 20) as f64
        );
    }
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let served = served.load(Ordering::Relaxed);
    let errors = errors.load(Ordering::Relaxed);
    println!();
    println!(
        "soak: {} clients for {elapsed:.0} s: {served} requests ({:.0} tokens/s), {errors} errors",
        args.clients,
        served as f64 * args.tokens as f64 / elapsed
    );
    let baseline = first_sample.unwrap_or_else(|| last_sample.clone());
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
    anyhow::ensure!(errors == 0, "{errors} requests failed");
    Ok(())
}
