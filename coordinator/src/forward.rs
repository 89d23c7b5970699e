//! Handing calls to the leader. Only the leader acts on heartbeats and
//! unreachable reports, keeps the load window the rebalancer plans with,
//! and carries out rebalances, so a follower passes those calls on.
//! Forwarded operators' calls carry this coordinator's admin token.

use std::collections::BTreeMap;

use moemesh_proto::AdminServiceClient;
use moemesh_proto::tls::{MemberChannel, TlsConfig};
use tonic::{Request, Status};

use crate::CoordinatorResult;
use crate::auth::OperatorAuth;
use crate::node::RaftHandle;
use crate::transport::{PEER_TIMEOUT, peer_endpoint};

/// The other coordinators' admin services, as seen from this one.
#[derive(Clone)]
pub struct LeaderForwarding {
    own_id: u64,
    /// Knows who leads.
    raft: RaftHandle,
    /// Every coordinator's URL, this one included.
    peers: BTreeMap<u64, String>,
    tls: TlsConfig,
    /// Lazily connected admin clients of the other coordinators, whose
    /// calls time out after [`PEER_TIMEOUT`].
    peer_admin: BTreeMap<u64, AdminServiceClient<MemberChannel>>,
    /// Lends the admin token to forwarded operators' calls.
    auth: OperatorAuth,
}

impl LeaderForwarding {
    /// Prepares a lazily connected admin client for every coordinator in
    /// `peers` but `own_id`; nothing connects until a call is forwarded.
    pub fn new(
        own_id: u64,
        peers: &BTreeMap<u64, String>,
        tls: &TlsConfig,
        raft: RaftHandle,
        auth: OperatorAuth,
    ) -> CoordinatorResult<Self> {
        let mut peer_admin = BTreeMap::new();
        for (&peer, address) in peers.iter().filter(|(peer, _)| **peer != own_id) {
            let endpoint = peer_endpoint(tls, peer, address)?.timeout(PEER_TIMEOUT);
            let channel = tls.channel(endpoint.connect_lazy());
            peer_admin.insert(peer, AdminServiceClient::new(channel));
        }
        Ok(Self {
            own_id,
            raft,
            peers: peers.clone(),
            tls: tls.clone(),
            peer_admin,
            auth,
        })
    }

    /// A client of the leader when it is another coordinator; None when
    /// this coordinator leads or no leader is known.
    pub async fn leader_if_not_self(
        &self,
    ) -> Result<Option<AdminServiceClient<MemberChannel>>, Status> {
        let status = self.raft.status().await?;
        Ok(status
            .leader_id
            .filter(|&leader| leader != self.own_id)
            .and_then(|leader| self.peer_admin.get(&leader).cloned()))
    }

    /// Like [`Self::leader_if_not_self`], but freshly connected and without
    /// the peer timeout, for calls that take longer (a rebalance carrying
    /// out its moves).
    pub async fn leader_if_not_self_untimed(
        &self,
    ) -> Result<Option<AdminServiceClient<MemberChannel>>, Status> {
        let status = self.raft.status().await?;
        let Some(leader) = status.leader_id.filter(|&leader| leader != self.own_id) else {
            return Ok(None);
        };
        let Some(address) = self.peers.get(&leader) else {
            return Ok(None);
        };
        let channel = self
            .tls
            .endpoint(address.clone())
            .map_err(|error| Status::internal(format!("leader {leader} address: {error}")))?
            .connect()
            .await
            .map_err(|error| Status::unavailable(format!("leader {leader}: {error}")))?;
        Ok(Some(AdminServiceClient::new(self.tls.channel(channel))))
    }

    /// `message` as an operator's request to another coordinator, with
    /// this coordinator's admin token.
    pub fn to_peer<T>(&self, message: T) -> Request<T> {
        self.auth.request_to_peer(message)
    }
}
