//! Test helpers for whole moemesh clusters.
//!
//! [`ClusterSandbox`] starts expert nodes and a router in this process,
//! each a real gRPC server on `127.0.0.1:0`, and stops them on
//! [`ClusterSandbox::shutdown`]. [`CoordinatorSandbox`] does the same for a
//! group of coordinators, and [`ManagedCluster`] a whole cluster whose
//! placement the coordinators own. [`Fixture`] opens the golden checkpoints
//! under `tests/fixtures`, made by `make_fixtures.py` with transformers.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use moemesh_client::{Client, ClientError, CoordinatorClient};
use moemesh_coordinator::node::RaftNodeConfig;
use moemesh_coordinator::server::{Coordinator, CoordinatorConfig};
use moemesh_core::compute::WeightFormat;
use moemesh_core::model::checkpoint::Checkpoint;
use moemesh_core::model::placement::{LayerExpert, NodeEntry, Placement, PlacementFile};
use moemesh_expert_node::registration::Registration;
use moemesh_expert_node::{ExpertNode, ExpertNodeConfig};
use moemesh_proto::identity::{Member, Role};
use moemesh_proto::tls::TlsConfig;
use moemesh_router_node::{PlacementSource, Router, RouterConfig};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

pub mod exposition;
pub mod routing;
mod security;
pub use security::{SandboxSecurity, TEST_CLUSTER_SECRET, TestAuthority};

/// Returns the directory of a committed fixture, for example `mixtral`.
pub fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// Every golden fixture: (directory name, what it covers).
pub const FIXTURES: [&str; 18] = [
    "mixtral",
    "mixtral_bf16_sharded",
    "qwen2_moe",
    "qwen3_moe_f16",
    "deepseek_v3",
    "olmoe",
    "glm4_moe",
    "deepseek_v2",
    "deepseek_v2_lite",
    "deepseek_v3_fp8",
    "phimoe",
    "granitemoe",
    "granitemoeshared",
    "dbrx",
    "gpt_oss_mxfp4",
    "gpt_oss_bf16",
    "llama4_text",
    "longcat_flash",
];

/// A golden case: a checkpoint and, per MoE layer, transformers' input and output.
pub struct Fixture {
    pub dir: PathBuf,
    pub checkpoint: Checkpoint,
    /// Layer to (input, expected output), both `[tokens, hidden]`.
    pub cases: HashMap<usize, (Vec<f32>, Vec<f32>)>,
}

impl Fixture {
    /// Opens fixture `name`.
    pub fn open(name: &str) -> Self {
        let dir = fixture_dir(name);
        let checkpoint =
            Checkpoint::open(&dir).unwrap_or_else(|error| panic!("fixture {name}: {error}"));
        let bytes = std::fs::read(dir.join("expected.safetensors"))
            .expect("fixture has expected.safetensors");
        let expected =
            safetensors::SafeTensors::deserialize(&bytes).expect("expected.safetensors parses");
        let read = |tensor: &str| -> Vec<f32> {
            let view = expected
                .tensor(tensor)
                .unwrap_or_else(|_| panic!("{name}: {tensor} missing"));
            assert_eq!(view.dtype(), safetensors::Dtype::F32);
            view.data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        };
        let mut cases = HashMap::new();
        for layer in checkpoint.config().moe_layers() {
            cases.insert(
                layer,
                (
                    read(&format!("layer{layer}.input")),
                    read(&format!("layer{layer}.output")),
                ),
            );
        }
        Self {
            dir,
            checkpoint,
            cases,
        }
    }

    /// Returns the hidden size.
    pub fn hidden_size(&self) -> usize {
        self.checkpoint.config().hidden_size
    }
}

/// Returns ‖got − want‖ / ‖want‖ in f64.
pub fn relative_l2(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "lengths differ");
    let diff: f64 = got
        .iter()
        .zip(want)
        .map(|(g, w)| (*g as f64 - *w as f64).powi(2))
        .sum();
    let norm: f64 = want.iter().map(|w| (*w as f64).powi(2)).sum();
    (diff / norm).sqrt()
}

/// An in-process cluster: expert nodes and one router on 127.0.0.1.
pub struct ClusterSandbox {
    pub router_url: String,
    pub placement: Placement,
    /// How the cluster's clients secure their connections.
    pub tls: TlsConfig,
    /// How every member of the cluster is secured.
    pub security: SandboxSecurity,
    shutdown_tx: watch::Sender<bool>,
    servers: JoinSet<Result<(), String>>,
}

/// Binds a port on 127.0.0.1 and returns its URL (`https` with TLS).
async fn bind(security: &SandboxSecurity) -> (TcpListener, String) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let url = format!(
        "{}://{}",
        security.scheme(),
        listener.local_addr().expect("bound address")
    );
    (listener, url)
}

/// The client member sandboxes' clients call as.
fn sandbox_client(security: &SandboxSecurity) -> TlsConfig {
    security.for_role(Role::Client, "sandbox-client")
}

/// The operator sandboxes' admin clients call as.
fn sandbox_operator(security: &SandboxSecurity) -> TlsConfig {
    security.for_role(Role::Operator, "sandbox-operator")
}

/// The router sandboxes run.
const SANDBOX_ROUTER: &str = "router-0";

impl ClusterSandbox {
    /// Starts `nodes` expert nodes holding the placement that `place`
    /// builds from the node list, and a router over them.
    pub async fn start(
        model_dir: &Path,
        nodes: usize,
        place: impl FnOnce(Vec<NodeEntry>) -> PlacementFile,
    ) -> Self {
        Self::start_secured(model_dir, nodes, place, SandboxSecurity::Open).await
    }

    /// [`ClusterSandbox::start`] with every member secured by `security`.
    pub async fn start_secured(
        model_dir: &Path,
        nodes: usize,
        place: impl FnOnce(Vec<NodeEntry>) -> PlacementFile,
        security: SandboxSecurity,
    ) -> Self {
        let config = Checkpoint::open(model_dir)
            .expect("model opens")
            .config()
            .clone();
        let (listeners, entries) = bind_expert_nodes(nodes, &security).await;
        let placement_file = place(entries.clone());
        let placement = Placement::from_file(&placement_file, &config).expect("placement is valid");
        let (shutdown_tx, _) = watch::channel(false);
        let mut servers = JoinSet::new();
        for (listener, entry) in listeners.into_iter().zip(&entries) {
            let tls = security.for_role(Role::Expert, &entry.id);
            let experts = placement.experts_of(&entry.id);
            let shutdown = wait_for_shutdown(shutdown_tx.subscribe());
            spawn_node(&mut servers, model_dir, experts, tls, listener, shutdown).await;
        }
        let router_tls = security.for_role(Role::Router, SANDBOX_ROUTER);
        let shutdown = wait_for_shutdown(shutdown_tx.subscribe());
        let router_url = spawn_file_router(
            &mut servers,
            model_dir,
            placement_file,
            router_tls,
            shutdown,
        )
        .await;
        Self {
            router_url,
            placement,
            tls: sandbox_client(&security),
            security,
            shutdown_tx,
            servers,
        }
    }

    /// Starts a cluster with every expert spread round-robin over `nodes`
    /// nodes, each `replicas` times.
    pub async fn spread(model_dir: &Path, nodes: usize, replicas: usize) -> Self {
        let config = Checkpoint::open(model_dir)
            .expect("model opens")
            .config()
            .clone();
        Self::start(model_dir, nodes, |entries| {
            Placement::spread(&config, entries, replicas)
                .expect("spread placement")
                .to_file(&config, None)
        })
        .await
    }

    /// Connects a client to the router, retrying while it loads its gates.
    pub async fn client(&self) -> Client {
        for _ in 0..200 {
            if let Ok(client) = Client::connect_with_tls(self.router_url.clone(), &self.tls).await {
                return client;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        panic!("router at {} never accepted a connection", self.router_url);
    }

    /// Stops every server and checks that each exited cleanly.
    pub async fn shutdown(mut self) {
        self.shutdown_tx.send_replace(true);
        while let Some(result) = self.servers.join_next().await {
            result
                .expect("server task panicked")
                .expect("server exited with an error");
        }
    }
}

/// Starts an expert node holding `experts` on `listener`, served among
/// `servers` until `shutdown`.
async fn spawn_node(
    servers: &mut JoinSet<Result<(), String>>,
    model_dir: &Path,
    experts: Vec<LayerExpert>,
    tls: TlsConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let node_config = ExpertNodeConfig {
        model_dir: model_dir.to_path_buf(),
        model_id: "test-model".into(),
        experts,
        threads: 1,
        queue_capacity: 64,
        weight_format: WeightFormat::F32,
        device: Default::default(),
        memory_budget: None,
        device_memory_budget: None,
        tls,
        registration: None,
        metrics: Default::default(),
    };
    let node = ExpertNode::start(node_config, listener)
        .await
        .expect("expert node loads");
    servers.spawn(async move {
        node.serve(shutdown)
            .await
            .map_err(|error| error.to_string())
    });
}

/// Starts a router over `placement` on a fresh port, served among
/// `servers` until `shutdown`; returns its URL.
async fn spawn_file_router(
    servers: &mut JoinSet<Result<(), String>>,
    model_dir: &Path,
    placement: PlacementFile,
    tls: TlsConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> String {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let router_url = format!(
        "{}://{}",
        tls.scheme(),
        listener.local_addr().expect("bound address")
    );
    let router_config = RouterConfig {
        model_dir: model_dir.to_path_buf(),
        model_id: "test-model".into(),
        placement: PlacementSource::File(placement),
        group: String::new(),
        max_in_flight: 0,
        tls,
        metrics: Default::default(),
    };
    servers.spawn(async move {
        moemesh_router_node::run(router_config, listener, shutdown)
            .await
            .map_err(|error| error.to_string())
    });
    router_url
}

/// Binds `count` expert node listeners and names them `expert-0`, `expert-1`, ...
async fn bind_expert_nodes(
    count: usize,
    security: &SandboxSecurity,
) -> (Vec<TcpListener>, Vec<NodeEntry>) {
    let mut listeners = Vec::new();
    let mut entries = Vec::new();
    for index in 0..count {
        let (listener, address) = bind(security).await;
        listeners.push(listener);
        entries.push(NodeEntry {
            id: format!("expert-{index}"),
            address,
        });
    }
    (listeners, entries)
}

async fn wait_for_shutdown(mut shutdown_rx: watch::Receiver<bool>) {
    // An error means the sandbox was dropped: shut down as well.
    let _ = shutdown_rx.wait_for(|stop| *stop).await;
}

/// Builds a placement that spreads experts one per node round-robin and
/// adds a second replica, on the next node, to every even-numbered expert.
pub fn partly_replicated(model_dir: &Path) -> impl FnOnce(Vec<NodeEntry>) -> PlacementFile {
    let config = Checkpoint::open(model_dir)
        .expect("model opens")
        .config()
        .clone();
    move |nodes| {
        let node_count = nodes.len();
        let mut file = Placement::spread(&config, nodes.clone(), 1)
            .expect("spread")
            .to_file(&config, None);
        let next_node = |owner: &str| {
            let index = nodes
                .iter()
                .position(|node| node.id == owner)
                .expect("known node");
            nodes[(index + 1) % node_count].id.clone()
        };
        for layer in &mut file.layers {
            for (expert, replicas) in layer.experts.iter_mut().enumerate() {
                if expert % 2 == 0 && node_count > 1 {
                    let extra = next_node(&replicas[0]);
                    replicas.push(extra);
                }
            }
            if let Some(owner) = layer.shared.first().cloned()
                && node_count > 1
            {
                layer.shared.push(next_node(&owner));
            }
        }
        file
    }
}

/// Completes when a sandbox stops a server.
type Shutdown = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// A server task and the switch that stops it.
struct RunningServer {
    stop_tx: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), String>>,
}

impl RunningServer {
    /// Spawns the server `serve` returns, handing it a shutdown future that
    /// completes when [`RunningServer::stop`] is called.
    fn spawn<F, E>(serve: impl FnOnce(Shutdown) -> F) -> Self
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: ToString,
    {
        let (stop_tx, stop_rx) = watch::channel(false);
        let server = serve(Box::pin(wait_for_shutdown(stop_rx)));
        let task = tokio::spawn(async move { server.await.map_err(|error| error.to_string()) });
        Self { stop_tx, task }
    }

    /// Asks the server to stop and returns how it ended.
    async fn stop(self) -> Result<(), String> {
        self.stop_tx.send_replace(true);
        self.task.await.expect("server task")
    }
}

/// A group of coordinators in this process, each a gRPC server on 127.0.0.1.
pub struct CoordinatorSandbox {
    /// Coordinator URLs by id.
    pub urls: BTreeMap<u64, String>,
    /// How the sandbox's admin clients (an operator) secure their connections.
    pub tls: TlsConfig,
    /// How every coordinator is secured.
    pub security: SandboxSecurity,
    running: BTreeMap<u64, RunningServer>,
    _data: tempfile::TempDir,
}

impl CoordinatorSandbox {
    /// Starts `size` coordinators with short ticks that never declare a
    /// node dead (tests of membership use [`CoordinatorSandbox::with_timing`]).
    pub async fn start(size: u64) -> Self {
        Self::with_timing(size, Duration::from_secs(3600), Duration::from_millis(300)).await
    }

    /// Starts `size` coordinators that declare silent nodes dead after
    /// `dead_after` and let drained replicas linger for `drain_grace`.
    pub async fn with_timing(size: u64, dead_after: Duration, drain_grace: Duration) -> Self {
        Self::with_options(size, dead_after, drain_grace, None, SandboxSecurity::Open).await
    }

    /// [`CoordinatorSandbox::start`] with every coordinator secured by `security`.
    pub async fn start_secured(size: u64, security: SandboxSecurity) -> Self {
        Self::with_options(
            size,
            Duration::from_secs(3600),
            Duration::from_millis(300),
            None,
            security,
        )
        .await
    }

    /// Starts `size` coordinators that require `admin_token` on operators' calls.
    pub async fn with_admin_token(size: u64, admin_token: &str) -> Self {
        Self::with_options(
            size,
            Duration::from_secs(3600),
            Duration::from_millis(300),
            Some(admin_token.to_string()),
            SandboxSecurity::Open,
        )
        .await
    }

    /// Starts `size` coordinators with the given timing, token and security.
    pub async fn with_options(
        size: u64,
        dead_after: Duration,
        drain_grace: Duration,
        admin_token: Option<String>,
        security: SandboxSecurity,
    ) -> Self {
        let data = tempfile::tempdir().expect("temporary directory");
        let mut listeners = BTreeMap::new();
        let mut urls = BTreeMap::new();
        for id in 1..=size {
            let (listener, url) = bind(&security).await;
            listeners.insert(id, listener);
            urls.insert(id, url);
        }
        let mut running = BTreeMap::new();
        for (id, listener) in listeners {
            let mut raft = RaftNodeConfig::new(
                id,
                Vec::new(),
                data.path().join(format!("coordinator-{id}")),
            );
            raft.tick_interval = Duration::from_millis(25);
            let mut config = CoordinatorConfig::new(raft, urls.clone());
            config.dead_after = dead_after;
            config.drain_grace = drain_grace;
            config.admin_token = admin_token.clone();
            config.tls = security.for_member(&Member::coordinator(id));
            let coordinator = Coordinator::start(config).expect("coordinator starts");
            let server = RunningServer::spawn(|shutdown| coordinator.serve(listener, shutdown));
            running.insert(id, server);
        }
        Self {
            urls,
            tls: sandbox_operator(&security),
            security,
            running,
            _data: data,
        }
    }

    /// Waits until coordinator `via` reports a running leader, and returns its id.
    pub async fn leader(&self, via: u64) -> u64 {
        self.leader_with_token(via, "").await
    }

    /// Like [`CoordinatorSandbox::leader`], for coordinators that require `token`.
    pub async fn leader_with_token(&self, via: u64, token: &str) -> u64 {
        let started = std::time::Instant::now();
        loop {
            if let Ok(admin) = self.admin(via).await
                && let Ok(status) = admin.with_token(token).cluster_status().await
                && self.running.contains_key(&status.leader_id)
            {
                return status.leader_id;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "no leader elected"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A client of coordinator `id` alone.
    pub async fn admin(&self, id: u64) -> Result<CoordinatorClient, ClientError> {
        CoordinatorClient::connect([self.urls[&id].clone()], self.tls.clone()).await
    }

    /// Stops one coordinator, as if its process had ended.
    pub async fn stop(&mut self, id: u64) {
        let running = self.running.remove(&id).expect("a running coordinator");
        running.stop().await.expect("coordinator exits cleanly");
    }

    /// Stops every coordinator.
    pub async fn shutdown(mut self) {
        for id in self.running.keys().copied().collect::<Vec<_>>() {
            self.stop(id).await;
        }
    }
}

/// An expert node of a [`ManagedCluster`] and what keeps it alive.
struct ManagedNode {
    id: String,
    /// Serves the node; its heartbeats and placement following end with it.
    server: RunningServer,
}

/// A whole cluster run the way production runs it: coordinators own the
/// placement, expert nodes register, heartbeat and follow it, and the
/// router follows it too. Everything in this process on 127.0.0.1.
pub struct ManagedCluster {
    pub coordinators: CoordinatorSandbox,
    pub router_url: String,
    nodes: Vec<ManagedNode>,
    router: RunningServer,
}

impl ManagedCluster {
    /// Starts three coordinators (nodes are dead after `dead_after` of
    /// silence), `nodes` expert nodes holding every expert `replicas`
    /// times round-robin, and a router. With `replicas` 0 the nodes start
    /// empty and the model is loaded through the coordinators, which place
    /// every expert twice.
    pub async fn start(
        model_dir: &Path,
        nodes: usize,
        replicas: usize,
        dead_after: Duration,
    ) -> Self {
        Self::start_secured(
            model_dir,
            nodes,
            replicas,
            dead_after,
            SandboxSecurity::Open,
        )
        .await
    }

    /// [`ManagedCluster::start`] with every member secured by `security`.
    pub async fn start_secured(
        model_dir: &Path,
        nodes: usize,
        replicas: usize,
        dead_after: Duration,
        security: SandboxSecurity,
    ) -> Self {
        let drain_grace = Duration::from_millis(300);
        let coordinators =
            CoordinatorSandbox::with_options(3, dead_after, drain_grace, None, security.clone())
                .await;
        coordinators.leader(1).await;
        let coordinator_urls: Vec<String> = coordinators.urls.values().cloned().collect();
        let config = Checkpoint::open(model_dir)
            .expect("model opens")
            .config()
            .clone();
        let (listeners, entries) = bind_expert_nodes(nodes, &security).await;
        let placement =
            Placement::spread(&config, entries.clone(), replicas).expect("spread placement");
        let mut managed = Vec::new();
        for (listener, entry) in listeners.into_iter().zip(&entries) {
            let registration = Registration {
                coordinators: coordinator_urls.clone(),
                node_id: entry.id.clone(),
                address: entry.address.clone(),
                group: "rack-1".into(),
                device: "cpu".into(),
                memory_bytes: 1 << 34,
                buffer_bytes: 0,
                checkpoint: model_dir.to_string_lossy().into_owned(),
                heartbeat_interval: Duration::from_millis(200),
                patience: Duration::from_secs(60),
            };
            let node_config = ExpertNodeConfig {
                model_dir: model_dir.to_path_buf(),
                model_id: "test-model".into(),
                experts: if replicas == 0 {
                    Vec::new()
                } else {
                    placement.experts_of(&entry.id)
                },
                threads: 1,
                queue_capacity: 64,
                weight_format: WeightFormat::F32,
                device: Default::default(),
                memory_budget: None,
                device_memory_budget: None,
                tls: security.for_role(Role::Expert, &entry.id),
                registration: Some(registration),
                metrics: Default::default(),
            };
            let node = ExpertNode::start(node_config, listener)
                .await
                .expect("expert node loads and registers");
            managed.push(ManagedNode {
                id: entry.id.clone(),
                server: RunningServer::spawn(|shutdown| node.serve(shutdown)),
            });
        }
        if replicas == 0 {
            let mut admin =
                CoordinatorClient::connect(coordinator_urls.clone(), sandbox_operator(&security))
                    .await
                    .expect("coordinator answers");
            admin
                .load_model("test-model", &model_dir.to_string_lossy(), 2, "test-load")
                .await
                .expect("model loads through the coordinators");
        }
        let (listener, router_url) = bind(&security).await;
        let router_config = RouterConfig {
            model_dir: model_dir.to_path_buf(),
            model_id: "test-model".into(),
            placement: PlacementSource::Coordinators(coordinator_urls),
            group: String::new(),
            max_in_flight: 0,
            tls: security.for_role(Role::Router, SANDBOX_ROUTER),
            metrics: Default::default(),
        };
        let router = Router::load(router_config).await.expect("router loads");
        Self {
            coordinators,
            router_url,
            nodes: managed,
            router: RunningServer::spawn(|shutdown| router.serve(listener, shutdown)),
        }
    }

    /// Connects a client to the router.
    pub async fn client(&self) -> Client {
        let tls = sandbox_client(&self.coordinators.security);
        Client::connect_with_tls(self.router_url.clone(), &tls)
            .await
            .expect("router accepts connections")
    }

    /// Connects an admin client to coordinator `id`.
    pub async fn admin(&self, id: u64) -> CoordinatorClient {
        self.coordinators
            .admin(id)
            .await
            .expect("coordinator accepts connections")
    }

    /// Returns the expert node ids.
    pub fn node_ids(&self) -> Vec<String> {
        self.nodes.iter().map(|node| node.id.clone()).collect()
    }

    /// Stops an expert node abruptly: it stops serving and heartbeating.
    pub async fn kill_node(&mut self, id: &str) {
        let position = self
            .nodes
            .iter()
            .position(|node| node.id == id)
            .expect("a running node");
        let node = self.nodes.remove(position);
        let _ = node.server.stop().await;
    }

    /// Stops everything.
    pub async fn shutdown(self) {
        let _ = self.router.stop().await;
        for node in self.nodes {
            let _ = node.server.stop().await;
        }
        self.coordinators.shutdown().await;
    }
}

/// Clients that keep sending the same request without pause until stopped,
/// checking every answer against the expected output.
pub struct SteadyLoad {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    served: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<Vec<String>>>,
}

impl SteadyLoad {
    /// Starts one task per client, each forwarding `input` through layer
    /// `layer`; an answer further than `tolerance` (relative L2) from
    /// `expected`, or an error, is recorded as a failure.
    pub fn start(
        clients: Vec<Client>,
        layer: u32,
        input: Vec<f32>,
        expected: Vec<f32>,
        hidden: usize,
        tolerance: f64,
    ) -> Self {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (input, expected) = (std::sync::Arc::new(input), std::sync::Arc::new(expected));
        let tasks = clients
            .into_iter()
            .map(|mut client| {
                let (stop, served) = (stop.clone(), served.clone());
                let (input, expected) = (input.clone(), expected.clone());
                tokio::spawn(async move {
                    let mut failures = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        match client.forward_f32("", layer, &input, hidden).await {
                            Ok(output) => {
                                let error = relative_l2(&output, &expected);
                                if error >= tolerance {
                                    failures.push(format!("relative L2 error {error:e}"));
                                }
                                served.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(error) => failures.push(error.to_string()),
                        }
                    }
                    failures
                })
            })
            .collect();
        Self {
            stop,
            served,
            tasks,
        }
    }

    /// Requests answered correctly or not, so far.
    pub fn served(&self) -> usize {
        self.served.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until `more` requests past now have been answered (a minute at most).
    pub async fn wait_for(&self, more: usize) {
        let target = self.served() + more;
        let started = std::time::Instant::now();
        while self.served() < target {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "serving stalled at {} requests",
                self.served()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the clients and returns every failure they saw.
    pub async fn stop(self) -> Vec<String> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut failures = Vec::new();
        for task in self.tasks {
            failures.extend(task.await.expect("load task"));
        }
        failures
    }
}

/// How one expert node of [`ClusterSandbox::start_serving`] answers.
pub enum SandboxNode {
    /// A real expert node holding these experts, whatever the router's
    /// placement says (a node restarted empty holds none).
    Holding(Vec<LayerExpert>),
    /// Other routes on the node's address, such as a fake `ExpertService`
    /// that hangs or fails.
    Serving(tonic::service::Routes),
}

impl ClusterSandbox {
    /// Starts one expert node per entry of `nodes` (named `expert-0`,
    /// `expert-1`, ...) and a router whose placement `place` builds from
    /// the node list, all over plaintext.
    pub async fn start_serving(
        model_dir: &Path,
        nodes: Vec<SandboxNode>,
        place: impl FnOnce(Vec<NodeEntry>) -> PlacementFile,
    ) -> Self {
        let security = SandboxSecurity::Open;
        let config = Checkpoint::open(model_dir)
            .expect("model opens")
            .config()
            .clone();
        let (listeners, entries) = bind_expert_nodes(nodes.len(), &security).await;
        let placement_file = place(entries.clone());
        let placement = Placement::from_file(&placement_file, &config).expect("placement is valid");
        let (shutdown_tx, _) = watch::channel(false);
        let mut servers = JoinSet::new();
        for (listener, node) in listeners.into_iter().zip(nodes) {
            let shutdown = wait_for_shutdown(shutdown_tx.subscribe());
            let experts = match node {
                SandboxNode::Holding(experts) => experts,
                SandboxNode::Serving(routes) => {
                    let server = tonic::transport::Server::builder()
                        .add_routes(routes)
                        .serve_with_incoming_shutdown(
                            moemesh_proto::incoming_without_delay(listener),
                            shutdown,
                        );
                    servers.spawn(async move { server.await.map_err(|error| error.to_string()) });
                    continue;
                }
            };
            let tls = TlsConfig::plaintext();
            spawn_node(&mut servers, model_dir, experts, tls, listener, shutdown).await;
        }
        let shutdown = wait_for_shutdown(shutdown_tx.subscribe());
        let router_url = spawn_file_router(
            &mut servers,
            model_dir,
            placement_file,
            TlsConfig::plaintext(),
            shutdown,
        )
        .await;
        Self {
            router_url,
            placement,
            tls: TlsConfig::plaintext(),
            security,
            shutdown_tx,
            servers,
        }
    }
}
