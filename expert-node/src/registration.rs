//! Joining a cluster: an expert node tells the coordinators who it is and
//! which experts it serves.

use std::time::{Duration, Instant};

use moemesh_proto::AdminServiceClient;
use moemesh_proto::v1::{NodeInfo, RegisterNodeRequest};

use crate::ExpertNodeService;

/// How this node describes itself to the coordinators.
#[derive(Debug, Clone)]
pub struct Registration {
    /// Any coordinator's URL.
    pub coordinator: String,
    pub node_id: String,
    /// The URL routers reach this node at.
    pub address: String,
    /// Topology group (host or rack).
    pub group: String,
    /// Bytes available for expert weights.
    pub memory_bytes: u64,
    /// The checkpoint directory, as the coordinators see it.
    pub checkpoint: String,
}

/// Registers the node and its experts, retrying (with the same request id,
/// so it applies once) through elections until `patience` runs out.
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
        request_id: format!("register-{}-{:016x}", registration.node_id, rand_suffix()),
        model: service.model_id().to_string(),
        checkpoint: registration.checkpoint.clone(),
        serving: service.serving(),
    };
    let started = Instant::now();
    let mut backoff = Duration::from_millis(50);
    loop {
        let attempt = async {
            let mut client = AdminServiceClient::connect(registration.coordinator.clone())
                .await
                .map_err(|error| {
                    format!(
                        "cannot reach coordinator {}: {error}",
                        registration.coordinator
                    )
                })?;
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
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// A per-process random suffix, so that a restarted node registers afresh.
fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::process::id())
}
