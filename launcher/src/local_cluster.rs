//! `moemesh up`: a real local cluster, one process per node on 127.0.0.1.
//!
//! Coordinators start first, then expert nodes on free ports; once each
//! prints its address, a placement file is written with those addresses
//! and the router starts. Every process is supervised ([`supervisor`]): an
//! exit is reported on stderr and, unless restarts are off, the process is
//! started again with the same arguments, ports, id and data directory, so
//! killing a node to try failover leaves the rest serving. Children exit
//! when their standard input closes, so they never outlive this process,
//! and shutdown is graceful: close stdin, wait, and only kill what has not
//! exited after a grace period. [`security`] decides how each process
//! proves who it is.

mod security;
mod supervisor;

use std::path::PathBuf;

use anyhow::{Context, bail};
use moemesh_client::{TlsArgs, TlsConfig};
use moemesh_core::model::checkpoint::Checkpoint;
use moemesh_core::model::config::ModelConfig;
use moemesh_core::model::placement::{NodeEntry, Placement};

use crate::certs::MemberRole;
use crate::expert_spec::format_expert_specs;
use crate::memory_tiers::MemoryTierArgs;
use crate::roles::{default_model_id, shutdown_signal};

pub use security::ClusterSecurity;
pub use supervisor::RestartPolicy;
use supervisor::{MemberSpec, SupervisedProcess};

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

/// `moemesh up`: the cluster, and how it is secured and supervised.
#[derive(clap::Args)]
pub struct UpCommandArgs {
    #[command(flatten)]
    pub cluster: UpArgs,
    /// Run with mutual TLS from the cluster CA in DIR (ca.pem, ca.key),
    /// made when missing, as `moemesh certs init` would. Each process gets
    /// its own certificate there, issued when missing: coordinator-N,
    /// expert-N, router-0, and operator (for this process and moectl).
    #[arg(long, value_name = "DIR", env = "MOEMESH_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// When a process exits, report it and keep the rest serving without
    /// restarting it. By default it is restarted with the same arguments
    /// after a backoff (0.5 s, doubling on repeated crashes up to 10 s).
    #[arg(long)]
    pub no_restart: bool,
}

/// One process of a local cluster as callers see it.
#[derive(Debug, Clone)]
pub struct ProcessInfo {
    /// None while the process is not running (exited, or restarting).
    pub pid: Option<u32>,
    /// The URL it serves at.
    pub url: String,
}

/// A running local cluster.
pub struct LocalCluster {
    pub router_url: String,
    /// How this process connects to the cluster: the operator's
    /// certificate with `--tls-dir`, its own TLS flags otherwise.
    pub tls: TlsConfig,
    /// How an application of this process connects: as member
    /// `client/local`, whose calls the expert nodes serve (a one-hop
    /// client's credentials).
    pub application_tls: TlsConfig,
    /// The coordinators' admin URLs, by id starting at 1.
    pub coordinator_urls: Vec<String>,
    pub model_id: String,
    pub config: ModelConfig,
    pub placement: Placement,
    /// Holds the placement file the router reads and the coordinators' data.
    _workdir: tempfile::TempDir,
    /// In start order: coordinators, expert nodes, the router.
    processes: Vec<SupervisedProcess>,
}

/// The client id a local cluster's own process uses for one-hop forwards.
const APPLICATION_ID: &str = "local";

/// The id of a local cluster's one router.
const ROUTER_ID: &str = "router-0";

/// What every process of a local cluster is started with.
struct Launch<'a> {
    security: &'a ClusterSecurity,
    policy: RestartPolicy,
    /// Print one line per process started on stdout.
    announce: bool,
    /// Each member's async runtime threads (`--io-threads`); 0: one per core.
    io_threads: usize,
}

impl Launch<'_> {
    /// Starts `moemesh <subcommand> <args>` as member `id` in `role`.
    async fn start(
        &self,
        role: MemberRole,
        subcommand: &'static str,
        id: String,
        role_args: Vec<String>,
    ) -> anyhow::Result<SupervisedProcess> {
        let security = self.security.member(role, &id)?;
        let mut args = security.args;
        if self.io_threads > 0 {
            args.extend(["--io-threads".into(), self.io_threads.to_string()]);
        }
        args.push(subcommand.to_string());
        args.extend(role_args);
        args.extend(["--metrics-addr".into(), "127.0.0.1:0".into()]);
        let spec = MemberSpec {
            role: subcommand,
            id: id.clone(),
            args,
            env: security.env,
            env_remove: security.env_remove,
        };
        let process = SupervisedProcess::start(spec, self.policy).await?;
        if self.announce
            && let Some(metrics_url) = &process.metrics_url
        {
            println!("metrics {metrics_url} {id}");
        }
        Ok(process)
    }
}

/// A free port on 127.0.0.1, for a process that must know its peers'
/// addresses before they start.
fn reserve_local_address() -> anyhow::Result<String> {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").context("no free local port")?;
    Ok(probe.local_addr()?.to_string())
}

/// Starts `count` coordinators on free local ports as one Raft group, each
/// serving raft on a peer port of its own; returns their admin URLs.
async fn start_coordinators(
    count: usize,
    data_dir: &std::path::Path,
    processes: &mut Vec<SupervisedProcess>,
    launch: &Launch<'_>,
) -> anyhow::Result<Vec<String>> {
    let scheme = launch.security.scheme();
    // Peers must know each other's addresses before any starts: reserve ports.
    let mut admin_addresses = Vec::with_capacity(count);
    let mut peer_addresses = Vec::with_capacity(count);
    for _ in 0..count {
        admin_addresses.push(reserve_local_address()?);
        peer_addresses.push(reserve_local_address()?);
    }
    let peers = peer_addresses
        .iter()
        .enumerate()
        .map(|(index, address)| format!("{}={scheme}://{address}", index + 1))
        .collect::<Vec<_>>()
        .join(",");
    let mut urls = Vec::with_capacity(count);
    for (index, (admin, peer)) in admin_addresses.iter().zip(&peer_addresses).enumerate() {
        let id = index + 1;
        let args = vec![
            "--id".into(),
            id.to_string(),
            "--peers".into(),
            peers.clone(),
            "--listen".into(),
            admin.clone(),
            "--peer-listen".into(),
            peer.clone(),
            "--data-dir".into(),
            data_dir
                .join(format!("coordinator-{id}"))
                .to_string_lossy()
                .into_owned(),
        ];
        let process = launch
            .start(
                MemberRole::Coordinator,
                "coordinator",
                format!("coordinator-{id}"),
                args,
            )
            .await?;
        if launch.announce {
            println!("coordinator {}", process.url);
        }
        urls.push(process.url.clone());
        processes.push(process);
    }
    Ok(urls)
}

/// A coordinator group alone, as processes, for tools that drive the
/// control plane themselves (`moemesh bench-control-plane`).
pub struct CoordinatorGroup {
    /// Admin URLs, by id starting at 1.
    pub urls: Vec<String>,
    /// Credentials of the group's members.
    pub security: ClusterSecurity,
    /// Holds the coordinators' data.
    _workdir: tempfile::TempDir,
    processes: Vec<SupervisedProcess>,
}

impl CoordinatorGroup {
    /// Starts `count` coordinators secured as `tls` says; a process that
    /// exits is reported, not restarted.
    pub async fn start(count: usize, tls: &TlsArgs) -> anyhow::Result<Self> {
        let security = ClusterSecurity::prepare(tls, None)?;
        let launch = Launch {
            security: &security,
            policy: RestartPolicy::Never,
            announce: false,
            // The group alone has the machine.
            io_threads: 0,
        };
        let workdir = tempfile::tempdir()?;
        let mut processes = Vec::new();
        let urls = start_coordinators(count, workdir.path(), &mut processes, &launch).await?;
        Ok(Self {
            urls,
            security,
            _workdir: workdir,
            processes,
        })
    }

    /// Each coordinator's pid, by id starting at 1; None when not running.
    pub fn pids(&self) -> Vec<Option<u32>> {
        self.processes.iter().map(SupervisedProcess::pid).collect()
    }

    /// Stops every coordinator gracefully.
    pub async fn shutdown(mut self) {
        for process in self.processes.iter_mut().rev() {
            process.stop().await;
        }
    }
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
    processes: &mut Vec<SupervisedProcess>,
    launch: &Launch<'_>,
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
            // Names the process in `ps` and, with coordinators, in the cluster.
            "--node-id".into(),
            entry.id.clone(),
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
            node_args.extend(["--coordinator".into(), options.coordinator_urls.join(",")]);
        }
        let process = launch
            .start(MemberRole::Expert, "expert", entry.id.clone(), node_args)
            .await?;
        if launch.announce {
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

/// The compute threads of each expert node: as asked, or the cores shared out.
fn threads_per_node(args: &UpArgs) -> usize {
    if args.threads_per_node > 0 {
        return args.threads_per_node;
    }
    cores_shared_by(args.expert_nodes)
}

/// Each member's async runtime threads: the cores shared out among the
/// processes on the data path (the expert nodes and the router), which
/// all run on this one machine. The coordinators take the same share;
/// they are mostly idle.
fn io_threads_per_member(args: &UpArgs) -> usize {
    cores_shared_by(args.expert_nodes + 1)
}

/// This machine's cores divided among `processes`, at least one each.
fn cores_shared_by(processes: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |cores| cores.get());
    (cores / processes.max(1)).max(1)
}

impl LocalCluster {
    /// Starts the coordinators, the expert nodes, then the router, each
    /// with the TLS flags of `tls`; prints one line per process when
    /// `args.announce`. A process that exits is reported, not restarted,
    /// so that measurements never mix in a restarted process.
    pub async fn start(args: &UpArgs, tls: &TlsArgs) -> anyhow::Result<Self> {
        let security = ClusterSecurity::prepare(tls, None)?;
        Self::start_with(args, &security, RestartPolicy::Never).await
    }

    /// Starts the cluster secured by `security`, supervised by `policy`.
    pub async fn start_with(
        args: &UpArgs,
        security: &ClusterSecurity,
        policy: RestartPolicy,
    ) -> anyhow::Result<Self> {
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
        let launch = Launch {
            security,
            policy,
            announce: args.announce,
            io_threads: io_threads_per_member(args),
        };

        let mut processes = Vec::new();
        let coordinator_urls =
            start_coordinators(args.coordinators, workdir.path(), &mut processes, &launch).await?;
        let node_options = NodeOptions {
            model: &model,
            model_id: &model_id,
            threads: threads_per_node(args),
            coordinator_urls: &coordinator_urls,
        };
        let nodes =
            start_expert_nodes(args, &provisional, &node_options, &mut processes, &launch).await?;
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
            "--router-id".into(),
            ROUTER_ID.into(),
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
        let router = launch
            .start(MemberRole::Router, "router", ROUTER_ID.into(), router_args)
            .await?;
        let router_url = router.url.clone();
        if args.announce {
            println!("router {router_url}");
        }
        processes.push(router);
        Ok(Self {
            router_url,
            tls: security.client_tls()?,
            application_tls: security.application_tls(APPLICATION_ID)?,
            coordinator_urls,
            model_id,
            config,
            placement,
            _workdir: workdir,
            processes,
        })
    }

    /// Every process in `role` (`expert`, `router`, `coordinator`), with
    /// the pid of the process serving now.
    pub fn processes(&self, role: &str) -> Vec<ProcessInfo> {
        self.processes
            .iter()
            .filter(|process| process.role == role)
            .map(|process| ProcessInfo {
                pid: process.pid(),
                url: process.url.clone(),
            })
            .collect()
    }

    /// Stops the router first, then the expert nodes, then the
    /// coordinators, each gracefully.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        for process in self.processes.iter_mut().rev() {
            process.stop().await;
        }
        Ok(())
    }
}

/// Quotes `value` for a POSIX shell when it needs it.
fn shell_quote(value: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-:,=+@%".contains(c);
    if !value.is_empty() && value.chars().all(plain) {
        value.to_string()
    } else {
        format!("'{}'", value.replace('\'', r"'\''"))
    }
}

pub async fn run_up(args: UpCommandArgs, tls: &TlsArgs) -> anyhow::Result<()> {
    let security = ClusterSecurity::prepare(tls, args.tls_dir.as_deref())?;
    let policy = if args.no_restart {
        RestartPolicy::Never
    } else {
        RestartPolicy::Always
    };
    let up = &args.cluster;
    let cluster = LocalCluster::start_with(up, &security, policy).await?;
    // After the URLs: what moectl in another shell needs.
    let mut exports = vec![("MOEMESH_ROUTER".to_string(), cluster.router_url.clone())];
    if !cluster.coordinator_urls.is_empty() {
        exports.push((
            "MOEMESH_COORDINATOR".into(),
            cluster.coordinator_urls.join(","),
        ));
    }
    exports.extend(security.moectl_environment());
    for (name, value) in &exports {
        println!("export {name}={}", shell_quote(value));
    }
    eprintln!(
        "moemesh cluster up: {} expert nodes, model {:?} ({}, MoE layers {:?}); processes that exit are {}; Ctrl-C or SIGTERM stops it",
        up.expert_nodes,
        cluster.model_id,
        cluster.config.family,
        cluster.config.moe_layers(),
        match policy {
            RestartPolicy::Always => "restarted",
            RestartPolicy::Never => "reported, not restarted",
        }
    );
    eprintln!("run the export lines above in another shell, then try:");
    eprintln!("     moectl forward --layer N --input x.npy --output y.npy");
    if !cluster.coordinator_urls.is_empty() {
        eprintln!("     moectl cluster status");
        eprintln!("     moectl placement show");
    }
    shutdown_signal(false).await;
    eprintln!("stopping the cluster");
    cluster.shutdown().await?;
    // A member that would not stop or exited with an error was named above.
    eprintln!("cluster stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cores_are_shared_out_and_nobody_gets_none() {
        let cores = std::thread::available_parallelism().map_or(1, |cores| cores.get());
        assert_eq!(cores_shared_by(1), cores);
        assert_eq!(cores_shared_by(0), cores);
        for processes in 1..=4 * cores {
            let share = cores_shared_by(processes);
            assert!(share >= 1, "{processes} processes");
            assert!(
                share * processes <= cores.max(processes),
                "{processes} processes get {share} cores each of {cores}"
            );
        }
        assert_eq!(cores_shared_by(cores + 1), 1);
    }
}
