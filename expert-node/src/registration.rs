//! Joining a cluster: an expert node tells the coordinators who it is and
//! which experts it serves, heartbeats, and follows the placement they
//! publish, loading the experts given to it and dropping those taken away.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use moemesh_proto::AdminServiceClient;
use moemesh_proto::v1::{
    HeartbeatRequest, NodeInfo, PlacementSnapshot, RegisterNodeRequest, ReportReplicaReadyRequest,
    WatchPlacementRequest,
};
use tonic::transport::Channel;

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
    /// Bytes available for expert weights.
    pub memory_bytes: u64,
    /// The checkpoint directory, as the coordinators see it.
    pub checkpoint: String,
    /// Time between heartbeats.
    pub heartbeat_interval: Duration,
}

/// Connects to the first coordinator that answers, starting at `*next`.
async fn connect_any(
    coordinators: &[String],
    next: &mut usize,
) -> Result<AdminServiceClient<Channel>, String> {
    let mut last_error = String::from("no coordinator given");
    for _ in 0..coordinators.len() {
        let address = &coordinators[*next % coordinators.len()];
        match moemesh_proto::tls::connect(address.clone())
            .await
            .map(AdminServiceClient::new)
        {
            Ok(client) => return Ok(client),
            Err(error) => last_error = format!("cannot reach coordinator {address}: {error}"),
        }
        *next += 1;
    }
    Err(last_error)
}

/// Registers the node and the experts it serves, retrying (with the same
/// request id, so it applies once) through elections until `patience` runs out.
pub async fn register(
    service: &ExpertNodeService,
    registration: &Registration,
    patience: Duration,
) -> Result<u64, String> {
    let request = RegisterNodeRequest {
        node: Some(NodeInfo {
            id: registration.node_id.clone(),
            address: registration.address.clone(),
            group: registration.group.clone(),
            device: "cpu".into(),
            memory_bytes: registration.memory_bytes,
            status: String::new(),
        }),
        request_id: format!("register-{}-{:016x}", registration.node_id, process_nonce()),
        model: service.model_id().to_string(),
        checkpoint: registration.checkpoint.clone(),
        serving: service.serving(),
    };
    let started = Instant::now();
    let mut backoff = Duration::from_millis(50);
    let mut next = 0;
    loop {
        let attempt = async {
            let mut client = connect_any(&registration.coordinators, &mut next).await?;
            client
                .register_node(request.clone())
                .await
                .map_err(|status| status.message().to_string())
        };
        match attempt.await {
            Ok(response) => return Ok(response.into_inner().epoch),
            Err(error) if started.elapsed() >= patience => return Err(error),
            Err(error) => {
                tracing::debug!(%error, "registration not yet accepted; retrying");
                next += 1;
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

/// Sends a heartbeat every interval, forever, moving to another coordinator
/// when one stops answering.
pub async fn heartbeat_task(registration: Registration, service: ExpertNodeService) {
    let mut next = 0;
    let mut client = None;
    let mut interval = tokio::time::interval(registration.heartbeat_interval);
    loop {
        interval.tick().await;
        if client.is_none() {
            client = connect_any(&registration.coordinators, &mut next)
                .await
                .ok();
        }
        let Some(connected) = client.as_mut() else {
            continue;
        };
        let (queue_depth, busy_micros, pairs) = service.work_counters();
        let request = HeartbeatRequest {
            node: registration.node_id.clone(),
            queue_depth,
            busy_micros,
            pairs,
        };
        if tokio::time::timeout(
            registration.heartbeat_interval,
            connected.heartbeat(request),
        )
        .await
        .map_or(true, |reply| reply.is_err())
        {
            tracing::debug!("heartbeat failed; trying another coordinator");
            client = None;
            next += 1;
        }
    }
}

/// Follows the placement forever: loads experts newly placed here and
/// reports them ready, and drops experts whose replica here was removed.
/// Snapshots older than `registered_epoch` (from a lagging coordinator)
/// are ignored, so that they never undo the node's own registration.
pub async fn follow_placement_task(
    service: ExpertNodeService,
    registration: Registration,
    registered_epoch: u64,
) {
    let mut next = 0;
    loop {
        let followed = async {
            let mut client = connect_any(&registration.coordinators, &mut next).await?;
            let request = WatchPlacementRequest {
                model: service.model_id().to_string(),
            };
            let mut stream = client
                .watch_placement(request)
                .await
                .map_err(|status| status.message().to_string())?
                .into_inner();
            while let Some(snapshot) = stream
                .message()
                .await
                .map_err(|status| status.message().to_string())?
            {
                if snapshot.epoch < registered_epoch {
                    continue;
                }
                apply_snapshot(&service, &mut client, &registration.node_id, snapshot).await;
            }
            Ok::<(), String>(())
        };
        if let Err(error) = followed.await {
            tracing::debug!(%error, "placement stream ended; reconnecting");
        }
        next += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn apply_snapshot(
    service: &ExpertNodeService,
    client: &mut AdminServiceClient<Channel>,
    node_id: &str,
    snapshot: PlacementSnapshot,
) {
    let mut placed_here: BTreeMap<(usize, u32), String> = BTreeMap::new();
    for expert in &snapshot.experts {
        if let Some(replica) = expert
            .replicas
            .iter()
            .find(|replica| replica.node == node_id)
        {
            placed_here.insert(
                (expert.layer as usize, expert.expert),
                replica.state.clone(),
            );
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
    for (&(layer, expert), state) in &placed_here {
        if !held.contains(&(layer, expert))
            && let Err(error) = service.add_expert(layer, expert).await
        {
            tracing::warn!(layer, expert, %error, "cannot load a placed expert");
            continue;
        }
        if state == "loading" {
            let report = ReportReplicaReadyRequest {
                node: node_id.to_string(),
                model: service.model_id().to_string(),
                layer: layer as u32,
                expert,
            };
            if let Err(status) = client.report_replica_ready(report).await {
                tracing::warn!(
                    layer,
                    expert,
                    error = status.message(),
                    "cannot report a loaded expert"
                );
            }
        }
    }
    for &(layer, expert) in held.difference(&placed_here.keys().copied().collect()) {
        if let Err(error) = service.remove_expert(layer, expert).await {
            tracing::warn!(layer, expert, %error, "cannot drop an expert");
        }
    }
}
