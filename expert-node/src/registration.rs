//! Joining a cluster: an expert node tells the coordinators who it is and
//! which experts it serves, heartbeats, and follows the placement they
//! publish, loading the experts given to it and dropping those taken away.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use futures::StreamExt;
use moemesh_client::CoordinatorClient;
use moemesh_core::compute::WeightFormat;
use moemesh_proto::v1::{
    HeartbeatRequest, NodeInfo, PlacementSnapshot, RegisterNodeRequest, ReportReplicaReadyRequest,
};
use moemesh_proto::{NodeStatus, ReplicaState};

use crate::ExpertNodeService;

/// How this node describes itself to the coordinators.
#[derive(Debug, Clone)]
pub struct Registration {
    /// Coordinator URLs; any one of them will do, the others are fallbacks.
    pub coordinators: Vec<String>,
    pub node_id: String,
    /// The URL routers reach this node at.
    pub address: String,
    /// Topology group (host or rack).
    pub group: String,
    /// The device its experts compute on: `cpu` or `cuda:N`.
    pub device: String,
    /// Bytes of expert weights it keeps resident on that device.
    pub memory_bytes: u64,
    /// Bytes of the next tier (pinned host memory for a GPU, the page
    /// cache for the CPU) where experts beyond `memory_bytes` wait; 0: none.
    pub buffer_bytes: u64,
    /// The checkpoint directory, as the coordinators see it.
    pub checkpoint: String,
    /// Time between heartbeats.
    pub heartbeat_interval: Duration,
    /// How long to keep trying to register (through elections) before
    /// giving up.
    pub patience: Duration,
}

/// Registers the node (computing in `weight_format`) and the experts it
/// serves, retrying (with the same request id, so it applies once) through
/// elections until `registration.patience` runs out; returns the epoch
/// that holds it.
pub async fn register(
    service: &ExpertNodeService,
    registration: &Registration,
    weight_format: WeightFormat,
    coordinators: &mut CoordinatorClient,
) -> Result<u64, String> {
    let request = RegisterNodeRequest {
        node: Some(NodeInfo {
            id: registration.node_id.clone(),
            address: registration.address.clone(),
            group: registration.group.clone(),
            device: registration.device.clone(),
            memory_bytes: registration.memory_bytes,
            buffer_bytes: registration.buffer_bytes,
            weight_format: weight_format.to_string(),
            status: NodeStatus::Unspecified.into(),
        }),
        request_id: format!("register-{}-{:016x}", registration.node_id, process_nonce()),
        model: service.model_id().to_string(),
        checkpoint: registration.checkpoint.clone(),
        serving: service.serving(),
    };
    let started = Instant::now();
    let mut backoff = Duration::from_millis(50);
    loop {
        match coordinators.register_node(request.clone()).await {
            Ok(epoch) => return Ok(epoch),
            Err(error) if started.elapsed() >= registration.patience => {
                return Err(error.to_string());
            }
            Err(error) => {
                tracing::debug!(%error, "registration not yet accepted; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Per process, so that a restarted node registers afresh.
fn process_nonce() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::process::id())
}

/// Sends a heartbeat every interval, forever; a coordinator that does not
/// answer within the interval is left for the next.
pub async fn heartbeat_task(
    registration: Registration,
    service: ExpertNodeService,
    coordinators: CoordinatorClient,
) {
    let mut coordinators = coordinators.with_call_timeout(registration.heartbeat_interval);
    let mut interval = tokio::time::interval(registration.heartbeat_interval);
    loop {
        interval.tick().await;
        let work = service.work_counters();
        let (client_experts, client_tokens) = service.client_load();
        let request = HeartbeatRequest {
            node: registration.node_id.clone(),
            queue_depth: work.queue_depth,
            busy_micros: work.busy_micros,
            pairs: work.pairs,
            buffer_hits: work.buffer_hits,
            buffer_misses: work.buffer_misses,
            bytes_paged_in: work.bytes_paged_in,
            host_fallbacks: work.host_fallbacks,
            model: service.model_id().to_string(),
            client_experts,
            client_tokens,
        };
        if let Err(error) = coordinators.heartbeat(request).await {
            tracing::debug!(%error, "heartbeat not delivered");
        }
    }
}

/// Follows the placement forever: loads experts newly placed here and
/// reports them ready, and drops experts whose replica here was removed.
/// Snapshots older than `registered_epoch` (from a lagging coordinator)
/// are ignored, so that they never undo the node's own registration.
pub async fn follow_placement_task(
    service: ExpertNodeService,
    node_id: String,
    mut coordinators: CoordinatorClient,
    registered_epoch: u64,
) {
    let mut placements = coordinators.watch_placement(service.model_id(), registered_epoch);
    while let Some(snapshot) = placements.next().await {
        apply_snapshot(&service, &mut coordinators, &node_id, snapshot).await;
    }
}

async fn apply_snapshot(
    service: &ExpertNodeService,
    coordinators: &mut CoordinatorClient,
    node_id: &str,
    snapshot: PlacementSnapshot,
) {
    let mut placed_here: BTreeMap<(usize, u32), ReplicaState> = BTreeMap::new();
    for expert in &snapshot.experts {
        if let Some(replica) = expert
            .replicas
            .iter()
            .find(|replica| replica.node == node_id)
        {
            placed_here.insert((expert.layer as usize, expert.expert), replica.state());
        }
    }
    let held: BTreeSet<(usize, u32)> = service
        .serving()
        .iter()
        .flat_map(|layer| {
            layer
                .experts
                .iter()
                .map(move |&expert| (layer.layer as usize, expert))
        })
        .collect();
    for (&(layer, expert), &state) in &placed_here {
        if !held.contains(&(layer, expert))
            && let Err(error) = service.add_expert(layer, expert).await
        {
            tracing::warn!(layer, expert, %error, "cannot load a placed expert");
            continue;
        }
        if state == ReplicaState::Loading {
            let report = ReportReplicaReadyRequest {
                node: node_id.to_string(),
                model: service.model_id().to_string(),
                layer: layer as u32,
                expert,
            };
            if let Err(error) = coordinators.report_replica_ready(report).await {
                tracing::warn!(layer, expert, %error, "cannot report a loaded expert");
            }
        }
    }
    for &(layer, expert) in held.difference(&placed_here.keys().copied().collect()) {
        if let Err(error) = service.remove_expert(layer, expert).await {
            tracing::warn!(layer, expert, %error, "cannot drop an expert");
        }
    }
    service.metrics().set_placement_epoch(snapshot.epoch);
}
