//! `moemesh expert` and `moemesh router`: one node each.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use moemesh_client::TlsArgs;
use moemesh_coordinator::metrics::CoordinatorMetrics;
use moemesh_coordinator::node::RaftNodeConfig;
use moemesh_coordinator::server::{Coordinator, CoordinatorConfig};
use moemesh_core::compute::WeightFormat;
use moemesh_core::model::checkpoint::Checkpoint;
use moemesh_core::model::placement::{Placement, PlacementFile};
use moemesh_expert_node::metrics::ExpertMetrics;
use moemesh_expert_node::registration::Registration;
use moemesh_expert_node::{ExpertNode, ExpertNodeConfig};
use moemesh_proto::identity::{Member, Role};
use moemesh_proto::tls::TlsConfig;
use moemesh_router_node::metrics::RouterMetrics;
use moemesh_router_node::{PlacementSource, Router, RouterConfig};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

use crate::expert_spec::parse_expert_specs;
use crate::memory_tiers::MemoryTierArgs;
use crate::ops::{OpsArgs, Shutdown};

/// How long an expert node keeps trying to register through elections.
const REGISTRATION_PATIENCE: Duration = Duration::from_secs(60);

/// Printed on stdout, followed by the node's URL, once a node serves.
pub const READY_LINE_PREFIX: &str = "listening on ";

#[derive(clap::Args)]
pub struct ExpertArgs {
    /// Hugging Face model directory (config.json and safetensors weights).
    #[arg(long, env = "MOEMESH_MODEL")]
    model: PathBuf,
    /// Model id clients and routers use; defaults to the directory name.
    #[arg(long, env = "MOEMESH_MODEL_ID")]
    model_id: Option<String>,
    /// Address to serve on; port 0 picks a free port (printed once ready).
    #[arg(long, env = "MOEMESH_LISTEN", default_value = "127.0.0.1:50061")]
    listen: String,
    /// Experts to hold, as LAYER:EXPERTS (repeatable): `1:0-3`, `1:0,5,shared`, `*:*` for all.
    #[arg(
        long = "experts",
        value_name = "LAYER:EXPERTS",
        conflicts_with = "placement"
    )]
    experts: Vec<String>,
    /// Take the experts from a placement file instead (with --node-id).
    #[arg(long, env = "MOEMESH_PLACEMENT", requires = "node_id")]
    placement: Option<PathBuf>,
    /// This node's id in the placement file.
    #[arg(long, env = "MOEMESH_NODE_ID")]
    node_id: Option<String>,
    /// Compute threads; 0 uses every core.
    #[arg(long, env = "MOEMESH_THREADS", default_value_t = 0)]
    threads: usize,
    /// Requests that may wait for compute before new ones get RESOURCE_EXHAUSTED.
    #[arg(long, env = "MOEMESH_QUEUE_CAPACITY", default_value_t = 64)]
    queue_capacity: usize,
    /// How to keep expert weights in memory: f32, or bf16 (half the memory,
    /// widened to f32 inside each GEMM; exact for bf16 checkpoints).
    #[arg(long, env = "MOEMESH_WEIGHTS", default_value = "f32")]
    weights: WeightFormat,
    #[command(flatten)]
    tiers: MemoryTierArgs,
    /// Coordinators to join (comma-separated; any one will do, the others
    /// are fallbacks). The node registers the experts it serves, heartbeats,
    /// and loads or drops experts as the placement changes.
    #[arg(
        long = "coordinator",
        env = "MOEMESH_COORDINATOR",
        value_delimiter = ','
    )]
    coordinators: Vec<String>,
    /// Milliseconds between heartbeats to the coordinators.
    #[arg(long, env = "MOEMESH_HEARTBEAT_MS", default_value_t = 1000)]
    heartbeat_ms: u64,
    /// Topology group (zone, rack or host) reported to the coordinators.
    /// Several comma-separated candidates may be given; the first that is
    /// not empty is used, so a manifest can pass the node's zone and fall
    /// back to its hostname: `--group=$(ZONE),$(NODE_NAME)`.
    #[arg(long, env = "MOEMESH_GROUP", default_value = "default")]
    group: String,
    /// Bytes of memory this node offers to keep expert weights resident
    /// (placement and rebalancing keep within it); defaults to the memory
    /// budget of its device, or the device's memory.
    #[arg(long, env = "MOEMESH_MEMORY_BYTES")]
    memory_bytes: Option<u64>,
    /// URL routers use to reach this node; defaults to the listening address.
    #[arg(long, env = "MOEMESH_ADVERTISE")]
    advertise: Option<String>,
    #[command(flatten)]
    ops: OpsArgs,
    /// Serve without authenticating callers: allows plaintext without a
    /// cluster secret, and plaintext on an address other than loopback.
    /// Only for a network you trust entirely.
    #[arg(long, env = "MOEMESH_INSECURE")]
    insecure: bool,
    /// Exit when standard input closes (used by `moemesh up` for its children).
    #[arg(long, hide = true)]
    exit_with_parent: bool,
}

#[derive(clap::Args)]
pub struct CoordinatorArgs {
    /// This coordinator's id in --peers (ids start at 1).
    #[arg(
        long,
        env = "MOEMESH_COORDINATOR_ID",
        required_unless_present = "ordinal",
        conflicts_with = "ordinal"
    )]
    id: Option<u64>,
    /// This coordinator's ordinal in a StatefulSet (its pod index, from 0);
    /// its id in --peers is the ordinal plus one.
    #[arg(long, env = "MOEMESH_ORDINAL")]
    ordinal: Option<u64>,
    /// Every coordinator of the group as ID=URL, comma-separated, this one included:
    /// `1=http://c1:7000,2=http://c2:7000,3=http://c3:7000`.
    #[arg(long, env = "MOEMESH_PEERS", value_delimiter = ',')]
    peers: Vec<String>,
    /// Address to serve the admin service on (expert nodes, routers,
    /// moectl); also the peer service unless --peer-listen is given.
    #[arg(long, env = "MOEMESH_LISTEN", default_value = "127.0.0.1:7000")]
    listen: String,
    /// Address to serve the peer service on (raft traffic, and calls other
    /// coordinators forward), apart from the admin service, so a network
    /// policy can keep it among coordinators; --peers then lists these
    /// peer URLs.
    #[arg(long, env = "MOEMESH_PEER_LISTEN")]
    peer_listen: Option<String>,
    /// Directory for the Raft log and snapshots; keep it across restarts.
    #[arg(long, env = "MOEMESH_DATA_DIR")]
    data_dir: PathBuf,
    /// Raft tick in milliseconds; elections start after 10 to 20 ticks of silence.
    #[arg(long, env = "MOEMESH_TICK_MS", default_value_t = 100)]
    tick_ms: u64,
    /// Milliseconds without a heartbeat after which an expert node is dead
    /// and its experts are placed elsewhere.
    #[arg(long, env = "MOEMESH_DEAD_AFTER_MS", default_value_t = 5000)]
    dead_after_ms: u64,
    /// Seconds of load statistics the rebalancer plans from.
    #[arg(long, env = "MOEMESH_LOAD_WINDOW_S", default_value_t = 60)]
    load_window_s: u64,
    /// Rebalance every model this often (seconds) on the leader; 0 only
    /// on request (`moectl placement rebalance`).
    #[arg(long, env = "MOEMESH_REBALANCE_INTERVAL_S", default_value_t = 0)]
    rebalance_interval_s: u64,
    /// The least gain in max/mean node load worth moving experts for.
    #[arg(long, env = "MOEMESH_REBALANCE_THRESHOLD", default_value_t = 0.05)]
    rebalance_threshold: f64,
    /// Require this bearer token on operators' calls (status, placement,
    /// model loading, moves, statistics, rebalancing); give it to moectl
    /// with --token or MOEMESH_ADMIN_TOKEN.
    #[arg(long, env = "MOEMESH_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    #[command(flatten)]
    ops: OpsArgs,
    /// Serve without authenticating callers: allows plaintext without a
    /// cluster secret, and plaintext on an address other than loopback.
    /// Only for a network you trust entirely.
    #[arg(long, env = "MOEMESH_INSECURE")]
    insecure: bool,
    /// Exit when standard input closes (used by `moemesh up` for its children).
    #[arg(long, hide = true)]
    exit_with_parent: bool,
}

#[derive(clap::Args)]
pub struct RouterArgs {
    /// Hugging Face model directory; the router reads only the gate weights.
    #[arg(long, env = "MOEMESH_MODEL")]
    model: PathBuf,
    /// Model id clients use; defaults to the placement file's model, then the directory name.
    #[arg(long, env = "MOEMESH_MODEL_ID")]
    model_id: Option<String>,
    /// Placement file: the expert nodes and which experts each holds.
    #[arg(
        long,
        env = "MOEMESH_PLACEMENT",
        required_unless_present = "coordinators",
        conflicts_with = "coordinators"
    )]
    placement: Option<PathBuf>,
    /// Follow the coordinators' placement instead (comma-separated URLs; any one will do).
    #[arg(
        long = "coordinator",
        env = "MOEMESH_COORDINATOR",
        value_delimiter = ','
    )]
    coordinators: Vec<String>,
    /// Address to serve on; port 0 picks a free port (printed once ready).
    #[arg(long, env = "MOEMESH_LISTEN", default_value = "127.0.0.1:50051")]
    listen: String,
    /// Topology group (zone, rack or host) of this router: among equally
    /// busy replicas, those on expert nodes of the same group are
    /// preferred. Comma-separated candidates: the first not empty is used.
    #[arg(long, env = "MOEMESH_GROUP", default_value = "")]
    group: String,
    /// Forwards in progress at once; more get RESOURCE_EXHAUSTED and the
    /// client SDK backs off and retries.
    #[arg(long, env = "MOEMESH_MAX_IN_FLIGHT", default_value_t = 256)]
    max_in_flight: usize,
    /// This router's id, for its certificate check and the logs; defaults
    /// to router-PORT.
    #[arg(long, env = "MOEMESH_ROUTER_ID")]
    router_id: Option<String>,
    #[command(flatten)]
    ops: OpsArgs,
    /// Serve without authenticating callers: allows plaintext without a
    /// cluster secret, and plaintext on an address other than loopback.
    /// Only for a network you trust entirely.
    #[arg(long, env = "MOEMESH_INSECURE")]
    insecure: bool,
    /// Exit when standard input closes (used by `moemesh up` for its children).
    #[arg(long, hide = true)]
    exit_with_parent: bool,
}

pub use moemesh_core::model::default_model_id;

/// Completes on Ctrl-C, SIGTERM, or (with `exit_with_parent`) when stdin closes.
pub async fn shutdown_signal(exit_with_parent: bool) {
    let parent_gone = async {
        if exit_with_parent {
            let mut stdin = tokio::io::stdin();
            let mut buffer = [0u8; 64];
            while matches!(stdin.read(&mut buffer).await, Ok(read) if read > 0) {}
        } else {
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
        _ = parent_gone => {}
    }
}

/// Binds `listen` and returns the URL peers reach it at (`https` with TLS).
/// In plaintext, refuses (unless `insecure`) to serve without a cluster
/// secret, or on an address other than loopback, where anyone on the
/// network could read the secret and every activation.
async fn bind(
    listen: &str,
    tls: &TlsArgs,
    insecure: bool,
) -> anyhow::Result<(TcpListener, String)> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let address = listener.local_addr()?;
    if !tls.is_mutual() && !insecure {
        if tls.cluster_secret.is_none() {
            bail!(
                "refusing to serve in plaintext without a cluster secret: anyone who reaches \
                 {address} could act as any member. Give --cluster-secret (or \
                 MOEMESH_CLUSTER_SECRET; moemesh up makes one), mutual TLS (--tls-cert, \
                 --tls-key, --tls-ca; moemesh certs), or --insecure"
            );
        }
        if !address.ip().is_loopback() {
            bail!(
                "refusing to listen on {address} in plaintext: the cluster secret and \
                 activations would cross the network unencrypted. Use mutual TLS \
                 (--tls-cert, --tls-key, --tls-ca; moemesh certs), or --insecure"
            );
        }
    }
    let scheme = if tls.is_mutual() { "https" } else { "http" };
    Ok((listener, format!("{scheme}://{address}")))
}

/// A router's security: with TLS, its certificate must name a router
/// (whatever its id); in plaintext it claims to be router `router_id`.
fn router_tls(tls: &TlsArgs, router_id: &str) -> anyhow::Result<TlsConfig> {
    let claimed = Member::new(Role::Router, router_id).map_err(anyhow::Error::msg)?;
    let config = tls.config(claimed)?;
    if config.is_mutual() {
        let own = config.own_member().map_err(anyhow::Error::msg)?;
        if own.role() != Role::Router {
            bail!("this process is a router, but its certificate names {own}");
        }
    }
    Ok(config)
}

/// This process's security as `member`: refuses a certificate that names
/// another member.
fn member_tls(tls: &TlsArgs, member: &Member) -> anyhow::Result<TlsConfig> {
    let config = tls.config(member.clone())?;
    config
        .check_own_member(member)
        .map_err(anyhow::Error::msg)?;
    Ok(config)
}

pub async fn run_expert(args: ExpertArgs, tls: &TlsArgs) -> anyhow::Result<()> {
    let tiers = args.tiers.tier_sizes(physical_memory_bytes())?;
    let checkpoint = Checkpoint::open(&args.model)?;
    let config = checkpoint.config().clone();
    let experts = match (&args.placement, &args.node_id) {
        (Some(path), Some(node_id)) => {
            let placement = Placement::from_file(&PlacementFile::read(path)?, &config)?;
            let held = placement.experts_of(node_id);
            if held.is_empty() {
                bail!("node {node_id:?} holds no experts in {}", path.display());
            }
            held
        }
        // Joining coordinators, a node may start empty and take what they place on it.
        _ if args.experts.is_empty() && args.coordinators.is_empty() => bail!(
            "say which experts to hold: --experts LAYER:EXPERTS, --placement FILE --node-id ID, or --coordinator URL to take them from the coordinators"
        ),
        _ => parse_expert_specs(&args.experts, &config)?,
    };
    let model_id = args
        .model_id
        .clone()
        .unwrap_or_else(|| default_model_id(&args.model));
    let mut ops = args.ops.bind().await?;
    let (listener, url) = bind(&args.listen, tls, args.insecure).await?;
    let node_id = args
        .node_id
        .clone()
        .unwrap_or_else(|| format!("expert-{}", url.rsplit(':').next().unwrap_or("0")));
    let tls = member_tls(
        tls,
        &Member::new(Role::Expert, node_id.clone()).map_err(anyhow::Error::msg)?,
    )?;
    let registration = (!args.coordinators.is_empty()).then(|| Registration {
        coordinators: args.coordinators.clone(),
        node_id,
        address: args.advertise.clone().unwrap_or_else(|| url.clone()),
        group: first_non_empty(&args.group)
            .unwrap_or("default")
            .to_string(),
        device: args.tiers.device.to_string(),
        memory_bytes: args.memory_bytes.unwrap_or(tiers.resident_bytes),
        buffer_bytes: tiers.buffer_bytes,
        checkpoint: args
            .model
            .canonicalize()
            .unwrap_or_else(|_| args.model.clone())
            .to_string_lossy()
            .into_owned(),
        heartbeat_interval: Duration::from_millis(args.heartbeat_ms.max(10)),
        patience: REGISTRATION_PATIENCE,
    });
    let node_config = ExpertNodeConfig {
        model_dir: args.model.clone(),
        model_id,
        experts,
        threads: args.threads,
        queue_capacity: args.queue_capacity,
        weight_format: args.weights,
        device: args.tiers.device,
        memory_budget: args.tiers.memory_budget,
        device_memory_budget: args.tiers.device_memory_budget,
        tls,
        registration,
        metrics: ExpertMetrics::register(ops.registry()),
    };
    let node = ExpertNode::start(node_config, listener).await?;
    let shutdown = Shutdown::on(shutdown_signal(args.exit_with_parent));
    ops.serve(&shutdown).set_ready().await;
    println!("{READY_LINE_PREFIX}{url}");
    tracing::info!(%url, "expert node serving");
    node.serve(shutdown.wait()).await?;
    Ok(())
}

/// The first of `candidates` (comma-separated) that is not empty.
fn first_non_empty(candidates: &str) -> Option<&str> {
    candidates
        .split(',')
        .map(str::trim)
        .find(|candidate| !candidate.is_empty())
}

/// Returns the machine's memory, the default budget for expert weights.
fn physical_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|line| line.starts_with("MemTotal:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        })
        .unwrap_or(16 << 30)
}

pub async fn run_coordinator(args: CoordinatorArgs, tls_args: &TlsArgs) -> anyhow::Result<()> {
    let mut peers = BTreeMap::new();
    for peer in &args.peers {
        let (id, url) = peer
            .split_once('=')
            .with_context(|| format!("--peers entry {peer:?}: expected ID=URL"))?;
        let id: u64 = id
            .parse()
            .with_context(|| format!("--peers entry {peer:?}: bad id"))?;
        if id == 0 {
            bail!("--peers entry {peer:?}: coordinator ids start at 1");
        }
        peers.insert(id, url.to_string());
    }
    let id = match (args.id, args.ordinal) {
        (Some(id), _) => id,
        (None, Some(ordinal)) => ordinal.checked_add(1).context("--ordinal is too large")?,
        (None, None) => bail!("give --id or --ordinal"),
    };
    if !peers.contains_key(&id) {
        bail!("--peers must list this coordinator's id {id}");
    }
    let tls = member_tls(tls_args, &Member::coordinator(id))?;
    let mut ops = args.ops.bind().await?;
    let (listener, url) = bind(&args.listen, tls_args, args.insecure).await?;
    let peer_listener = match &args.peer_listen {
        Some(peer_listen) => Some(bind(peer_listen, tls_args, args.insecure).await?.0),
        None => None,
    };
    let mut raft = RaftNodeConfig::new(id, peers.keys().copied().collect(), args.data_dir.clone());
    raft.tick_interval = Duration::from_millis(args.tick_ms.max(1));
    let mut config = CoordinatorConfig::new(raft, peers);
    config.dead_after = Duration::from_millis(args.dead_after_ms);
    config.load_window = Duration::from_secs(args.load_window_s.max(1));
    config.rebalance.threshold = args.rebalance_threshold;
    config.admin_token = args.admin_token.clone().filter(|token| !token.is_empty());
    config.rebalance_interval =
        (args.rebalance_interval_s > 0).then(|| Duration::from_secs(args.rebalance_interval_s));
    config.tls = tls;
    config.metrics = CoordinatorMetrics::register(ops.registry());
    let coordinator = Coordinator::start(config)?;
    let shutdown = Shutdown::on(shutdown_signal(args.exit_with_parent));
    ops.serve(&shutdown).set_ready().await;
    println!("{READY_LINE_PREFIX}{url}");
    tracing::info!(%url, id, "coordinator serving");
    coordinator
        .serve_split(listener, peer_listener, shutdown.wait())
        .await?;
    Ok(())
}

pub async fn run_router(args: RouterArgs, tls: &TlsArgs) -> anyhow::Result<()> {
    let (placement, placement_model) = match &args.placement {
        Some(path) => {
            let file = PlacementFile::read(path)?;
            let model = file.model.clone();
            (PlacementSource::File(file), model)
        }
        None => (
            PlacementSource::Coordinators(args.coordinators.clone()),
            None,
        ),
    };
    let model_id = args
        .model_id
        .clone()
        .or(placement_model)
        .unwrap_or_else(|| default_model_id(&args.model));
    let mut ops = args.ops.bind().await?;
    let (listener, url) = bind(&args.listen, tls, args.insecure).await?;
    let router_id = args
        .router_id
        .clone()
        .unwrap_or_else(|| format!("router-{}", url.rsplit(':').next().unwrap_or("0")));
    let tls = router_tls(tls, &router_id)?;
    let config = RouterConfig {
        model_dir: args.model.clone(),
        model_id,
        placement,
        group: first_non_empty(&args.group).unwrap_or_default().to_string(),
        max_in_flight: args.max_in_flight,
        tls,
        metrics: RouterMetrics::register(ops.registry()),
    };
    let router = Router::load(config).await?;
    let shutdown = Shutdown::on(shutdown_signal(args.exit_with_parent));
    ops.serve(&shutdown).set_ready().await;
    println!("{READY_LINE_PREFIX}{url}");
    tracing::info!(%url, "router serving");
    router.serve(listener, shutdown.wait()).await?;
    Ok(())
}
