//! The `CoordinatorPeerService` coordinators call on each other: raft
//! messages in (sent by [`crate::transport::GrpcTransport`]) and each
//! coordinator's view of the group, which [`coordinator_statuses`] gathers
//! for `moectl cluster status`.
//!
//! Raft messages are accepted only from coordinators, and only those a
//! coordinator sends as itself (`from` is its own raft id): a member of
//! another role, or a coordinator speaking for another, could otherwise
//! vote, append to the log or take over leadership.

use std::collections::BTreeMap;
use std::time::Duration;

use moemesh_proto::CoordinatorPeerServiceClient;
use moemesh_proto::tls::{Caller, TlsConfig};
use moemesh_proto::v1::{CoordinatorStatus, PeerStatusRequest, RaftAck, RaftBatch};
use protobuf::Message as _;
use raft::prelude::Message;
use tonic::{Request, Response, Status};

use crate::node::{RaftHandle, RaftStatus};

/// How long asking another coordinator for its status may take before it
/// is shown as unreachable.
const STATUS_TIMEOUT: Duration = Duration::from_millis(500);

/// Serves `CoordinatorPeerService` for one coordinator.
#[derive(Clone)]
pub struct PeerService {
    raft: RaftHandle,
    /// This coordinator's URL, as its peers know it.
    own_address: String,
    /// Says who each caller is.
    tls: TlsConfig,
}

impl PeerService {
    pub fn new(raft: RaftHandle, own_address: String, tls: TlsConfig) -> Self {
        Self {
            raft,
            own_address,
            tls,
        }
    }
}

/// Refuses a raft message unless `caller` is the coordinator it says it
/// comes from.
fn permit_raft_message(caller: &Caller, message: &Message) -> Result<(), Status> {
    caller.permit("Raft", |member| match member.coordinator_raft_id() {
        Some(id) if id == message.from => Ok(()),
        Some(id) => Err(format!(
            "coordinator {id} sent a raft message from {}",
            message.from
        )),
        None => Err(format!("{member} is not a coordinator")),
    })
}

#[tonic::async_trait]
impl moemesh_proto::CoordinatorPeerService for PeerService {
    async fn raft(&self, request: Request<RaftBatch>) -> Result<Response<RaftAck>, Status> {
        let caller = self.tls.caller(&request);
        caller.permit_roles("Raft", &[moemesh_proto::identity::Role::Coordinator])?;
        // Decode and check the whole batch before stepping any of it.
        let messages = request
            .into_inner()
            .messages
            .iter()
            .map(|bytes| {
                let message = Message::parse_from_bytes(bytes).map_err(|error| {
                    Status::invalid_argument(format!("undecodable raft message: {error}"))
                })?;
                permit_raft_message(&caller, &message)?;
                Ok(message)
            })
            .collect::<Result<Vec<_>, Status>>()?;
        for message in messages {
            self.raft.step(message);
        }
        Ok(Response::new(RaftAck {}))
    }

    async fn peer_status(
        &self,
        request: Request<PeerStatusRequest>,
    ) -> Result<Response<CoordinatorStatus>, Status> {
        self.tls.caller(&request).permit_members("PeerStatus")?;
        let status = self.raft.status().await?;
        Ok(Response::new(status_to_proto(&status, &self.own_address)))
    }
}

fn status_to_proto(status: &RaftStatus, address: &str) -> CoordinatorStatus {
    CoordinatorStatus {
        id: status.id,
        address: address.to_string(),
        role: status.role.to_string(),
        term: status.term,
        leader_id: status.leader_id.unwrap_or(0),
        commit_index: status.commit_index,
        applied_index: status.applied_index,
    }
}

fn unreachable_status(id: u64, address: &str) -> CoordinatorStatus {
    CoordinatorStatus {
        id,
        address: address.to_string(),
        role: "unreachable".into(),
        ..Default::default()
    }
}

/// Every coordinator's view of the group, asked of each in parallel; one
/// that does not answer in time shows as unreachable.
pub async fn coordinator_statuses(
    own_id: u64,
    raft: &RaftHandle,
    peers: &BTreeMap<u64, String>,
    tls: &TlsConfig,
) -> Vec<CoordinatorStatus> {
    let calls = peers.iter().map(|(&id, address)| async move {
        if id == own_id {
            return match raft.status().await {
                Ok(status) => status_to_proto(&status, address),
                Err(_) => unreachable_status(id, address),
            };
        }
        let Ok(endpoint) = tls.endpoint(address.clone()) else {
            return unreachable_status(id, address);
        };
        let endpoint = endpoint
            .connect_timeout(STATUS_TIMEOUT)
            .timeout(STATUS_TIMEOUT);
        let Ok(channel) = endpoint.connect().await else {
            return unreachable_status(id, address);
        };
        match CoordinatorPeerServiceClient::new(tls.channel(channel))
            .peer_status(PeerStatusRequest {})
            .await
        {
            Ok(response) => response.into_inner(),
            Err(_) => unreachable_status(id, address),
        }
    });
    futures::future::join_all(calls).await
}
