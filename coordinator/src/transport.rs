//! The ways raft messages reach other coordinators: [`GrpcTransport`] over
//! the network, and [`SimNetwork`], an in-process network for tests and
//! local groups that can drop, delay and partition messages.
//!
//! Both implement [`RaftTransport`], the trait the Raft node sends through
//! (defined beside it in [`crate::node`]). Raft tolerates lost, delayed and
//! reordered messages, so sending is fire and forget.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use moemesh_proto::tls::MemberChannel;
use moemesh_proto::tls::TlsConfig;
use moemesh_proto::v1::RaftBatch;
use moemesh_proto::{CoordinatorPeerServiceClient, MAX_MESSAGE_BYTES};
use protobuf::Message as _;
use raft::prelude::Message;
use rand::Rng;
use tokio::sync::mpsc;
use tonic::transport::Endpoint;

use crate::node::{RaftHandle, RaftTransport};
use crate::{CoordinatorError, CoordinatorResult};

/// Raft messages queued per peer before new ones are dropped (raft resends).
const PEER_QUEUE: usize = 4096;
/// How long one call to another coordinator may take before that
/// coordinator counts as unreachable.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(2);

/// Sends raft messages to peers over gRPC, one queue and task per peer.
pub struct GrpcTransport {
    /// Per peer, the queue its [`peer_sender_task`] drains.
    queues: BTreeMap<u64, mpsc::Sender<Message>>,
}

impl GrpcTransport {
    /// Starts a sender task for every coordinator in `peers` but `own_id`.
    /// Failed sends are reported through the handle in `node` once the Raft
    /// node, which needs this transport to start, has set it.
    pub fn start(
        own_id: u64,
        peers: &BTreeMap<u64, String>,
        tls: &TlsConfig,
        node: Arc<OnceLock<RaftHandle>>,
    ) -> CoordinatorResult<Self> {
        let mut queues = BTreeMap::new();
        for (&peer, address) in peers.iter().filter(|(id, _)| **id != own_id) {
            let endpoint = peer_endpoint(tls, peer, address)?
                .tcp_nodelay(true)
                .connect_timeout(PEER_TIMEOUT)
                .timeout(PEER_TIMEOUT);
            let client = CoordinatorPeerServiceClient::new(tls.channel(endpoint.connect_lazy()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES);
            let (message_tx, message_rx) = mpsc::channel(PEER_QUEUE);
            tokio::spawn(peer_sender_task(
                peer,
                client,
                message_rx,
                Arc::clone(&node),
            ));
            queues.insert(peer, message_tx);
        }
        Ok(Self { queues })
    }
}

/// Coordinator `peer`'s URL as an endpoint secured by `tls`; a URL that
/// is no endpoint stops the coordinator from starting.
pub fn peer_endpoint(tls: &TlsConfig, peer: u64, address: &str) -> CoordinatorResult<Endpoint> {
    tls.endpoint(address.to_string()).map_err(|error| {
        CoordinatorError::Rejected(format!("coordinator {peer} address {address:?}: {error}"))
    })
}

/// Sends one peer's messages in batches, in order; reports it unreachable on failure.
async fn peer_sender_task(
    peer: u64,
    mut client: CoordinatorPeerServiceClient<MemberChannel>,
    mut message_rx: mpsc::Receiver<Message>,
    node: Arc<OnceLock<RaftHandle>>,
) {
    while let Some(first) = message_rx.recv().await {
        let mut messages = vec![first.write_to_bytes().expect("raft messages encode").into()];
        while let Ok(message) = message_rx.try_recv() {
            messages.push(
                message
                    .write_to_bytes()
                    .expect("raft messages encode")
                    .into(),
            );
        }
        if let Err(status) = client.raft(RaftBatch { messages }).await {
            tracing::debug!(peer, code = ?status.code(), "coordinator unreachable");
            if let Some(handle) = node.get() {
                handle.report_unreachable(peer);
            }
        }
    }
}

impl RaftTransport for GrpcTransport {
    fn send(&self, messages: Vec<Message>) {
        for message in messages {
            if let Some(queue) = self.queues.get(&message.to) {
                // A full queue means the peer is slow or gone: raft resends.
                let _ = queue.try_send(message);
            }
        }
    }
}

/// Fault settings of a [`SimNetwork`].
#[derive(Debug, Clone, Default)]
struct SimFaults {
    /// Coordinators split into sides; messages cross no side boundary.
    sides: Option<Vec<HashSet<u64>>>,
    /// Probability that any message is lost.
    drop_rate: f64,
    /// Extra latency of every message, up to this much, uniformly.
    max_delay: Duration,
}

#[derive(Default)]
struct SimState {
    members: HashMap<u64, RaftHandle>,
    faults: SimFaults,
}

/// An in-process network of coordinators with injectable faults.
#[derive(Clone, Default)]
pub struct SimNetwork {
    state: Arc<Mutex<SimState>>,
}

impl SimNetwork {
    /// Connects a coordinator (or reconnects a restarted one).
    pub fn attach(&self, id: u64, handle: RaftHandle) {
        self.state
            .lock()
            .expect("sim network")
            .members
            .insert(id, handle);
    }

    /// Disconnects a coordinator, as if it had crashed.
    pub fn detach(&self, id: u64) {
        self.state.lock().expect("sim network").members.remove(&id);
    }

    /// Splits the network: messages only flow within each side.
    pub fn partition(&self, sides: Vec<Vec<u64>>) {
        self.state.lock().expect("sim network").faults.sides = Some(
            sides
                .into_iter()
                .map(|side| side.into_iter().collect())
                .collect(),
        );
    }

    /// Removes any partition.
    pub fn heal(&self) {
        self.state.lock().expect("sim network").faults.sides = None;
    }

    /// Loses each message with probability `drop_rate` and delays each by up to `max_delay`.
    pub fn set_faults(&self, drop_rate: f64, max_delay: Duration) {
        let mut state = self.state.lock().expect("sim network");
        state.faults.drop_rate = drop_rate;
        state.faults.max_delay = max_delay;
    }

    /// Returns the transport one coordinator sends through.
    pub fn transport(&self) -> Arc<dyn RaftTransport> {
        Arc::new(self.clone())
    }
}

impl RaftTransport for SimNetwork {
    fn send(&self, messages: Vec<Message>) {
        let state = self.state.lock().expect("sim network");
        let mut rng = rand::rng();
        for message in messages {
            let connected = match &state.faults.sides {
                Some(sides) => sides
                    .iter()
                    .any(|side| side.contains(&message.from) && side.contains(&message.to)),
                None => true,
            };
            if !connected || rng.random_bool(state.faults.drop_rate.clamp(0.0, 1.0)) {
                continue;
            }
            let Some(handle) = state.members.get(&message.to).cloned() else {
                continue;
            };
            let max_delay = state.faults.max_delay;
            if max_delay.is_zero() {
                handle.step(message);
            } else {
                let delay = max_delay.mul_f64(rng.random_range(0.0..1.0));
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    handle.step(message);
                });
            }
        }
    }
}
