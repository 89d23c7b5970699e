//! Simulated expert nodes for the control-plane bench: each registers with
//! the experts it serves and heartbeats, all through the SDK's
//! [`CoordinatorClient`], one client (and connection) per node. They share
//! one placement stream to learn which replicas were placed on them, and
//! report each ready as a node does once it has loaded it.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use moemesh_client::CoordinatorClient;
use moemesh_proto::LayerExperts;
use moemesh_proto::v1::{
    HeartbeatRequest, NodeInfo, NodeStatus, RegisterNodeRequest, ReplicaState,
    ReportReplicaReadyRequest, placement_update,
};
use tokio::task::JoinSet;

use crate::certs::MemberRole;
use crate::local_cluster::ClusterSecurity;

/// Registrations in flight at once.
const CONCURRENT_REGISTRATIONS: usize = 32;

/// Tries of one ready report.
const REPORT_ATTEMPTS: u32 = 5;

/// What the fleet is.
pub struct FleetSpec {
    pub coordinator_urls: Vec<String>,
    pub model: String,
    pub checkpoint: String,
    /// Per node, the experts it serves from the start.
    pub serving: Vec<Vec<LayerExperts>>,
    pub heartbeat_every: Duration,
}

/// The running fleet; its tasks stop when it is dropped.
pub struct Fleet {
    clients: Vec<CoordinatorClient>,
    heartbeats: Arc<AtomicU64>,
    /// (epoch, when the leader's answer came) of every replica reported ready.
    ready_marks: Arc<Mutex<Vec<(u64, Instant)>>>,
    tasks: JoinSet<()>,
}

/// Node `index`'s id.
pub fn node_id(index: usize) -> String {
    format!("sim-{index:04}")
}

/// `addresses` starting at the `index`-th (mod its length): members spread
/// over the coordinators as a load balancer in front of them would.
pub fn rotated(addresses: &[String], index: usize) -> Vec<String> {
    let start = index % addresses.len();
    addresses[start..]
        .iter()
        .chain(&addresses[..start])
        .cloned()
        .collect()
}

impl Fleet {
    /// Registers every node (printing progress on stderr), each starting
    /// its heartbeats once registered, then starts the ready reports.
    pub async fn start(security: &ClusterSecurity, spec: FleetSpec) -> anyhow::Result<Self> {
        let nodes = spec.serving.len();
        let clients = (0..nodes)
            .map(|index| {
                let tls = security.member_tls(MemberRole::Expert, &node_id(index))?;
                anyhow::Ok(CoordinatorClient::new(
                    rotated(&spec.coordinator_urls, index),
                    tls,
                )?)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let spec = Arc::new(spec);
        let mut fleet = Self {
            clients,
            heartbeats: Arc::default(),
            ready_marks: Arc::default(),
            tasks: JoinSet::new(),
        };
        let registrations = futures::stream::iter(fleet.clients.clone().into_iter().enumerate())
            .map(|(index, client)| {
                let spec = Arc::clone(&spec);
                async move {
                    register(client.clone(), index, &spec).await?;
                    anyhow::Ok((index, client))
                }
            })
            .buffer_unordered(CONCURRENT_REGISTRATIONS);
        futures::pin_mut!(registrations);
        let mut registered = 0;
        while let Some(result) = registrations.next().await {
            // A node heartbeats from its registration on, as a real one does.
            let (index, client) = result?;
            fleet.tasks.spawn(heartbeat_loop(
                client,
                index,
                spec.heartbeat_every,
                Arc::clone(&fleet.heartbeats),
            ));
            registered += 1;
            if registered % 100 == 0 || registered == nodes {
                eprintln!("  {registered}/{nodes} expert nodes registered");
            }
        }
        fleet.tasks.spawn(report_ready_replicas(
            fleet.clients.clone(),
            spec.model.clone(),
            Arc::clone(&fleet.ready_marks),
        ));
        Ok(fleet)
    }

    /// Heartbeats answered so far.
    pub fn heartbeats(&self) -> u64 {
        self.heartbeats.load(Ordering::Relaxed)
    }

    /// (epoch, when the answer came) of every ready report so far.
    pub fn ready_marks(&self) -> Vec<(u64, Instant)> {
        self.ready_marks.lock().expect("never poisoned").clone()
    }
}

async fn register(
    mut client: CoordinatorClient,
    index: usize,
    spec: &FleetSpec,
) -> anyhow::Result<()> {
    let id = node_id(index);
    let request = RegisterNodeRequest {
        node: Some(NodeInfo {
            id: id.clone(),
            // Nothing dials it: no router runs in this bench.
            address: format!("http://127.0.0.1:1/{id}"),
            group: format!("rack-{}", index % 16),
            device: "cpu".into(),
            memory_bytes: 1 << 40,
            status: NodeStatus::Ready.into(),
            buffer_bytes: 0,
            weight_format: "f32".into(),
        }),
        request_id: format!("register-{id}"),
        model: spec.model.clone(),
        checkpoint: spec.checkpoint.clone(),
        serving: spec.serving[index].clone(),
    };
    client
        .register_node(request)
        .await
        .with_context(|| format!("registering {id}"))?;
    Ok(())
}

async fn heartbeat_loop(
    mut client: CoordinatorClient,
    index: usize,
    every: Duration,
    answered: Arc<AtomicU64>,
) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let node = node_id(index);
    loop {
        ticks.tick().await;
        let request = HeartbeatRequest {
            node: node.clone(),
            ..HeartbeatRequest::default()
        };
        match client.heartbeat(request).await {
            Ok(_) => {
                answered.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => tracing::warn!(%node, %error, "heartbeat failed"),
        }
    }
}

/// Follows the placement and reports every loading replica on a fleet
/// node ready, through that node's client.
async fn report_ready_replicas(
    clients: Vec<CoordinatorClient>,
    model: String,
    marks: Arc<Mutex<Vec<(u64, Instant)>>>,
) {
    // The stream never goes back a revision, so each update's experts are
    // as the placement has them now; no view is needed.
    let mut updates = clients[0].watch_placement_updates(&model, None);
    let mut reported = HashSet::new();
    while let Some(update) = updates.next().await {
        let placements = match &update.update {
            Some(placement_update::Update::Delta(delta)) => &delta.experts,
            Some(placement_update::Update::Snapshot(snapshot)) => &snapshot.experts,
            None => continue,
        };
        for placement in placements {
            for replica in &placement.replicas {
                let loading = replica.state == ReplicaState::Loading as i32;
                let key = (placement.layer, placement.expert, replica.node.clone());
                let Some(index) = node_index(&replica.node) else {
                    continue;
                };
                if !loading {
                    // Ready or draining: a later loading replica there is a new one.
                    reported.remove(&key);
                    continue;
                }
                if !reported.insert(key) {
                    continue;
                }
                let request = ReportReplicaReadyRequest {
                    node: replica.node.clone(),
                    model: model.clone(),
                    layer: placement.layer,
                    expert: placement.expert,
                };
                let mut client = clients[index].clone();
                let marks = Arc::clone(&marks);
                tokio::spawn(async move {
                    // A node retries until the coordinators hear it.
                    for attempt in 1..=REPORT_ATTEMPTS {
                        match client.report_replica_ready(request.clone()).await {
                            Ok(answer) => {
                                let mark = (answer.epoch, Instant::now());
                                marks.lock().expect("never poisoned").push(mark);
                                return;
                            }
                            Err(error) => {
                                tracing::warn!(%error, attempt, "ready report failed");
                                tokio::time::sleep(Duration::from_millis(200)).await;
                            }
                        }
                    }
                });
            }
        }
    }
}

/// The fleet index of node `id`, if it is one of the fleet's.
fn node_index(id: &str) -> Option<usize> {
    id.strip_prefix("sim-")?.parse().ok()
}
