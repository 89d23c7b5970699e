//! The cloneable handle through which the rest of the coordinator talks
//! to its [`RaftNode`](super::RaftNode) actor, and the request ids that make
//! a retried proposal apply at most once.

use std::sync::{Arc, Mutex};

use raft::prelude::Message;
use tokio::sync::{mpsc, oneshot, watch};

use super::{RaftCommand, RaftStatus};
use crate::history::PlacementHistory;
use crate::state::{ClusterState, Command, Outcome, Proposal};
use crate::{CoordinatorError, CoordinatorResult};

/// The request id a client's call is deduplicated by: the one it chose, or
/// a fresh random one (prefixed with `kind`) when it gave none, in which
/// case a retry of the call is a new request.
pub fn fresh_request_id(given: String, kind: &str) -> String {
    if given.is_empty() {
        format!("{kind}-{:032x}", rand::random::<u128>())
    } else {
        given
    }
}

/// Cloneable handle to a running [`RaftNode`](super::RaftNode).
#[derive(Clone)]
pub struct RaftHandle {
    command_tx: mpsc::Sender<RaftCommand>,
    applied_rx: watch::Receiver<Arc<ClusterState>>,
    history: Arc<Mutex<PlacementHistory>>,
}

impl RaftHandle {
    pub(super) fn new(
        command_tx: mpsc::Sender<RaftCommand>,
        applied_rx: watch::Receiver<Arc<ClusterState>>,
        history: Arc<Mutex<PlacementHistory>>,
    ) -> Self {
        Self {
            command_tx,
            applied_rx,
            history,
        }
    }

    async fn request<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> RaftCommand,
    ) -> CoordinatorResult<T> {
        let (reply_tx, reply_rx) = oneshot::channel();
        self.command_tx
            .send(make(reply_tx))
            .await
            .map_err(|_| CoordinatorError::ShuttingDown)?;
        reply_rx.await.map_err(|_| CoordinatorError::ShuttingDown)
    }

    /// Proposes a command and waits until it is applied; returns its outcome.
    /// Any coordinator accepts proposals. Retrying with the same request id
    /// after an unknown outcome applies the command at most once.
    pub async fn propose(&self, proposal: Proposal) -> CoordinatorResult<Outcome> {
        self.request(|reply_tx| RaftCommand::Propose { proposal, reply_tx })
            .await?
    }

    /// Proposes `command` under `request_id` and waits until it is applied;
    /// returns the epoch afterwards, or the state machine's refusal as
    /// [`CoordinatorError::Rejected`].
    pub async fn propose_applied(
        &self,
        request_id: String,
        command: Command,
    ) -> CoordinatorResult<u64> {
        match self
            .propose(Proposal {
                request_id,
                command,
            })
            .await?
        {
            Outcome::Applied { epoch } => Ok(epoch),
            Outcome::Rejected { reason } => Err(CoordinatorError::Rejected(reason)),
        }
    }

    /// Returns the state machine as of a read index confirmed by a quorum:
    /// it reflects every change acknowledged before the call.
    pub async fn read(&self) -> CoordinatorResult<Arc<ClusterState>> {
        self.request(|reply_tx| RaftCommand::Read { reply_tx })
            .await?
    }

    /// Returns this coordinator's view of the group.
    pub async fn status(&self) -> CoordinatorResult<RaftStatus> {
        self.request(|reply_tx| RaftCommand::Status { reply_tx })
            .await
    }

    /// Returns the state as last applied here (possibly stale; no quorum round).
    pub fn applied_state(&self) -> Arc<ClusterState> {
        self.applied_rx.borrow().clone()
    }

    /// Returns a receiver that sees every newly applied state.
    pub fn watch_applied(&self) -> watch::Receiver<Arc<ClusterState>> {
        self.applied_rx.clone()
    }

    /// What recent commands touched; it always reaches the state
    /// [`watch_applied`](Self::watch_applied) shows, or beyond.
    pub fn placement_history(&self) -> Arc<Mutex<PlacementHistory>> {
        Arc::clone(&self.history)
    }

    /// Delivers a message from a peer; dropped if the mailbox is full (raft retries).
    pub fn step(&self, message: Message) {
        let _ = self.command_tx.try_send(RaftCommand::Step(message));
    }

    /// Tells raft that a peer could not be reached.
    pub fn report_unreachable(&self, peer: u64) {
        let _ = self.command_tx.try_send(RaftCommand::Unreachable(peer));
    }

    /// Stops the actor and waits until its store is closed. In-flight
    /// proposals fail with `ShuttingDown`; committed ones stay committed.
    pub async fn shutdown(&self) {
        let (done_tx, done_rx) = oneshot::channel();
        if self
            .command_tx
            .send(RaftCommand::Shutdown { done_tx })
            .await
            .is_ok()
        {
            let _ = done_rx.await;
        }
    }

    /// Completes when the actor has stopped, on request or because its store failed.
    pub async fn stopped(&self) {
        self.command_tx.closed().await;
    }
}
