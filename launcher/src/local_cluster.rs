//! `moemesh up`: a real local cluster, one process per node on 127.0.0.1.
//!
//! Expert nodes start first on free ports; once each prints its address, a
//! placement file is written with those addresses and the router starts on
//! it. Children exit when their standard input closes, so they never
//! outlive this process, and shutdown is graceful: close stdin, wait, and
//! only kill what has not exited after a grace period.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use moemesh_client::{TlsArgs, TlsConfig};
use moemesh_core::model::checkpoint::Checkpoint;
use moemesh_core::model::config::ModelConfig;
use moemesh_core::model::placement::{NodeEntry, Placement};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};

use crate::expert_spec::format_expert_specs;
use crate::memory_tiers::MemoryTierArgs;
use crate::roles::{READY_LINE_PREFIX, default_model_id, shutdown_signal};

#[derive(clap::Args, Clone)]
pub struct UpArgs {
    /// Hugging Face model directory (config.json and safetensors weights).
    #[arg(long, env = "MOEMESH_MODEL")]
    pub model: PathBuf,
    /// Number of expert node processes; experts are spread over them round-robin.
    #[arg(long, default_value_t = 2)]
    pub expert_nodes: usize,
    /// Replicas of every expert, on distinct nodes (capped at --expert-nodes).
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
    /// Address of the router; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub router_addr: String,
    /// Compute threads per expert node; 0 divides the cores among the nodes.
    #[arg(long, default_value_t = 0)]
    pub threads_per_node: usize,
    /// Model id clients use; defaults to the directory name.
    #[arg(long)]
    pub model_id: Option<String>,
    /// Coordinator processes (a Raft group) the expert nodes register with; 0 runs without.
    #[arg(long, default_value_t = 3)]
    pub coordinators: usize,
    /// Print one line per process started (`router URL`, ...) on stdout.
    #[arg(skip = true)]
    pub announce: bool,
    /// Memory each expert node offers for weights; None: the machine's.
    #[arg(skip)]
    pub node_memory_bytes: Option<u64>,
    /// Every expert node's device and memory budgets.
    #[command(flatten)]
    pub tiers: MemoryTierArgs,
}

/// One child process and the pipe whose closing tells it to exit.
struct NodeProcess {
    role: &'static str,
    url: String,
    child: Child,
    /// Dropped to ask the child to shut down.
    stdin: Option<ChildStdin>,
}

/// One process of a local cluster as callers see it.
#[derive(Debug, Clone)]
pub struct ProcessInfo {
    /// None once the process has exited.
    pub pid: Option<u32>,
    /// The URL it serves at.
    pub url: String,
}

/// A running local cluster.
pub struct LocalCluster {
    pub router_url: String,
    /// How the cluster's connections are secured; local clients use it too.
    pub tls: TlsConfig,
    /// The coordinators' URLs, by id starting at 1.
    pub coordinator_urls: Vec<String>,
    pub model_id: String,
    pub config: ModelConfig,
    pub placement: Placement,
    /// Holds the placement file the router reads and the coordinators' data.
    _workdir: tempfile::TempDir,
    processes: Vec<NodeProcess>,
}

/// How long a node may take to load its weights and start serving.
const START_TIMEOUT: Duration = Duration::from_secs(600);
/// How long nodes get to finish in-flight work after being asked to stop.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Starts `moemesh <role> <args>` with this process's TLS flags and waits
/// until it serves.
async fn spawn_node(
    role: &'static str,
    args: &[String],
    tls: &TlsArgs,
) -> anyhow::Result<NodeProcess> {
    let executable = std::env::current_exe().context("cannot find the moemesh executable")?;
    let mut command = Command::new(executable);
    command
        .args(tls.to_args())
        .arg(role)
        .args(args)
        .arg("--exit-with-parent");
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    if std::env::var_os("RUST_LOG").is_none() {
        command.env("RUST_LOG", "warn");
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot start the {role} process"))?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut lines = BufReader::new(stdout).lines();
    let ready = async {
        while let Some(line) = lines.next_line().await? {
            if let Some(url) = line.strip_prefix(READY_LINE_PREFIX) {
                return Ok::<_, std::io::Error>(Some(url.to_string()));
            }
        }
        Ok(None)
    };
    let url = match tokio::time::timeout(START_TIMEOUT, ready).await {
        Ok(Ok(Some(url))) => url,
        Ok(Ok(None)) | Ok(Err(_)) => {
            let status = child.wait().await?;
            bail!("the {role} process exited before serving ({status}); its errors are above");
        }
        Err(_) => bail!("the {role} process did not start serving within {START_TIMEOUT:?}"),
    };
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let stdin = child.stdin.take();
    Ok(NodeProcess {
        role,
        url,
        child,
        stdin,
    })
}

/// Starts `count` coordinators on free local ports as one Raft group;
/// prints and returns their URLs.
async fn start_coordinators(
    count: usize,
    data_dir: &std::path::Path,
    processes: &mut Vec<NodeProcess>,
    announce: bool,
    tls: &TlsArgs,
) -> anyhow::Result<Vec<String>> {
    let scheme = tls.config()?.scheme();
    // Peers must know each other's addresses before any starts: reserve ports.
    let mut urls = Vec::with_capacity(count);
    for _ in 0..count {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").context("no free local port")?;
        urls.push(format!("{scheme}://{}", probe.local_addr()?));
    }
    let peers = urls
        .iter()
        .enumerate()
        .map(|(index, url)| format!("{}={url}", index + 1))
        .collect::<Vec<_>>()
        .join(",");
    for (index, url) in urls.iter().enumerate() {
        let id = index + 1;
        let listen = url.split("://").nth(1).unwrap_or(url).to_string();
        let args = vec![
            "--id".into(),
            id.to_string(),
            "--peers".into(),
            peers.clone(),
            "--listen".into(),
            listen,
            "--data-dir".into(),
            data_dir
                .join(format!("coordinator-{id}"))
                .to_string_lossy()
                .into_owned(),
        ];
        let process = spawn_node("coordinator", &args, tls).await?;
        if announce {
            println!("coordinator {}", process.url);
        }
        processes.push(process);
    }
    Ok(urls)
}

/// What every expert node of a local cluster is started with.
struct NodeOptions<'a> {
    model: &'a str,
    model_id: &'a str,
    threads: usize,
    /// Empty for a cluster without coordinators.
    coordinator_urls: &'a [String],
}

/// Starts one expert node process per node of `provisional`, holding the
/// experts placed on it; returns the nodes with their real addresses.
async fn start_expert_nodes(
    args: &UpArgs,
    provisional: &Placement,
    options: &NodeOptions<'_>,
    processes: &mut Vec<NodeProcess>,
    tls: &TlsArgs,
) -> anyhow::Result<Vec<NodeEntry>> {
    let mut nodes = Vec::new();
    for entry in provisional.nodes() {
        let mut node_args = vec![
            "--model".into(),
            options.model.to_string(),
            "--model-id".into(),
            options.model_id.to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--threads".into(),
            options.threads.to_string(),
        ];
        if let Some(bytes) = args.node_memory_bytes {
            node_args.extend(["--memory-bytes".into(), bytes.to_string()]);
        }
        node_args.extend(args.tiers.to_args());
        for spec in format_expert_specs(&provisional.experts_of(&entry.id)) {
            node_args.extend(["--experts".into(), spec]);
        }
        if !options.coordinator_urls.is_empty() {
            // Every coordinator, so heartbeats survive the loss of any one.
            node_args.extend([
                "--coordinator".into(),
                options.coordinator_urls.join(","),
                "--node-id".into(),
                entry.id.clone(),
            ]);
        }
        let process = spawn_node("expert", &node_args, tls).await?;
        if args.announce {
            println!("expert {} {}", entry.id, process.url);
        }
        nodes.push(NodeEntry {
            id: entry.id.clone(),
            address: process.url.clone(),
        });
        processes.push(process);
    }
    Ok(nodes)
}

impl LocalCluster {
    /// Starts the coordinators, the expert nodes, then the router, each
    /// with the TLS flags of `tls`; prints one line per process.
    pub async fn start(args: &UpArgs, tls: &TlsArgs) -> anyhow::Result<Self> {
        if args.expert_nodes == 0 {
            bail!("--expert-nodes must be at least 1");
        }
        // Refuse an unusable device here, not in every child.
        moemesh_core::compute::device::probe_device(args.tiers.device)?;
        let config = Checkpoint::open(&args.model)?.config().clone();
        let model_id = args
            .model_id
            .clone()
            .unwrap_or_else(|| default_model_id(&args.model));
        let threads = if args.threads_per_node > 0 {
            args.threads_per_node
        } else {
            let cores = std::thread::available_parallelism().map_or(1, |cores| cores.get());
            (cores / args.expert_nodes).max(1)
        };
        // Place by node id first; addresses are known once the nodes serve.
        let provisional: Vec<NodeEntry> = (0..args.expert_nodes)
            .map(|index| NodeEntry {
                id: format!("expert-{index}"),
                address: String::new(),
            })
            .collect();
        let provisional = Placement::spread(&config, provisional, args.replicas)?;
        let model = args.model.to_string_lossy().into_owned();
        let workdir = tempfile::tempdir()?;

        let mut processes = Vec::new();
        let coordinator_urls = start_coordinators(
            args.coordinators,
            workdir.path(),
            &mut processes,
            args.announce,
            tls,
        )
        .await?;
        let node_options = NodeOptions {
            model: &model,
            model_id: &model_id,
            threads,
            coordinator_urls: &coordinator_urls,
        };
        let nodes =
            start_expert_nodes(args, &provisional, &node_options, &mut processes, tls).await?;
        let placement = Placement::spread(&config, nodes, args.replicas)?;
        let placement_path = workdir.path().join("placement.toml");
        std::fs::write(
            &placement_path,
            placement.to_file(&config, Some(model_id.clone())).to_toml(),
        )?;
        let mut router_args = vec![
            "--model".into(),
            model.clone(),
            "--model-id".into(),
            model_id.clone(),
            "--listen".into(),
            args.router_addr.clone(),
        ];
        if coordinator_urls.is_empty() {
            router_args.extend([
                "--placement".into(),
                placement_path.to_string_lossy().into_owned(),
            ]);
        } else {
            // The router follows the coordinators, so placement changes reach it.
            router_args.extend(["--coordinator".into(), coordinator_urls.join(",")]);
        }
        let router = spawn_node("router", &router_args, tls).await?;
        let router_url = router.url.clone();
        if args.announce {
            println!("router {router_url}");
        }
        processes.push(router);
        Ok(Self {
            router_url,
            tls: tls.config()?,
            coordinator_urls,
            model_id,
            config,
            placement,
            _workdir: workdir,
            processes,
        })
    }

    /// Every process in `role` (`expert`, `router`, `coordinator`).
    pub fn processes(&self, role: &str) -> Vec<ProcessInfo> {
        self.processes
            .iter()
            .filter(|process| process.role == role)
            .map(|process| ProcessInfo {
                pid: process.child.id(),
                url: process.url.clone(),
            })
            .collect()
    }

    /// Waits until any process exits on its own, and returns which.
    pub async fn wait_for_exit(&mut self) -> String {
        let waits = self.processes.iter_mut().map(|process| {
            Box::pin(async move {
                let status = process.child.wait().await;
                format!("{} at {} exited: {status:?}", process.role, process.url)
            })
        });
        futures::future::select_all(waits).await.0
    }

    /// Stops the router first, then the expert nodes, each gracefully.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        for process in self.processes.iter_mut().rev() {
            process.stdin.take();
            match tokio::time::timeout(STOP_GRACE, process.child.wait()).await {
                Ok(status) => {
                    let status = status?;
                    if !status.success() {
                        eprintln!("{} at {} exited with {status}", process.role, process.url);
                    }
                }
                Err(_) => {
                    eprintln!(
                        "{} at {} did not stop within {STOP_GRACE:?}; killing it",
                        process.role, process.url
                    );
                    process.child.kill().await?;
                }
            }
        }
        Ok(())
    }
}

pub async fn run_up(args: UpArgs, tls: &TlsArgs) -> anyhow::Result<()> {
    let mut cluster = LocalCluster::start(&args, tls).await?;
    eprintln!(
        "moemesh cluster up: {} expert nodes, model {:?} ({}, MoE layers {:?}); Ctrl-C or SIGTERM stops it",
        args.expert_nodes,
        cluster.model_id,
        cluster.config.family,
        cluster.config.moe_layers()
    );
    eprintln!(
        "try: moectl forward --router {} --layer N --input x.npy --output y.npy",
        cluster.router_url
    );
    if let Some(coordinator) = cluster.coordinator_urls.first() {
        eprintln!("     moectl cluster status --coordinator {coordinator}");
        eprintln!("     moectl placement show --coordinator {coordinator}");
    }
    tokio::select! {
        _ = shutdown_signal(false) => eprintln!("stopping the cluster"),
        exited = cluster.wait_for_exit() => eprintln!("{exited}; stopping the cluster"),
    }
    cluster.shutdown().await
}
