//! The Raft node actor: the one owner of a coordinator's raft-rs `RawNode`,
//! its store and the state machine.
//!
//! Everything reaches it through one bounded mailbox: raft messages from
//! peers, proposals and reads from the admin API, and the tick. Each turn
//! runs the Ready loop in raft-rs's documented order: send messages, apply
//! a snapshot, apply committed entries, persist entries and hard state,
//! send the messages that needed them persisted, advance, and the same for
//! the LightReady.
//!
//! Every coordinator applies every entry, so a proposal is answered by the
//! coordinator that received it, leader or not, once it sees the entry
//! applied; raft-rs forwards followers' proposals to the leader.
//!
//! Messages from peers pass `node/guard.rs` first: one that no member of
//! the group sends (raft-rs would panic on some, and a snapshot whose state
//! does not decode would stop the node) is refused with a warning naming
//! its sender, and the node carries on.
//!
//! The actor sends through a [`RaftTransport`], which the transports in
//! [`crate::transport`] implement. The rest of the coordinator talks to it
//! through the cloneable [`RaftHandle`] (`node/handle.rs`).

mod config;
mod guard;
mod handle;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use protobuf::Message as _;
use raft::prelude::{ConfChange, ConfChangeV2, Entry, EntryType, Message};
use raft::{Config, RawNode, ReadOnlyOption, StateRole};
use tokio::sync::{mpsc, oneshot, watch};

use crate::history::{self, PlacementHistory};
use crate::state::{ClusterState, Outcome, Proposal};
use crate::storage::RaftStore;
use crate::{CoordinatorError, CoordinatorResult};

pub use config::RaftNodeConfig;
pub use handle::{RaftHandle, fresh_request_id};

/// Carries raft messages to their destinations. Raft tolerates lost,
/// delayed and reordered messages, so sending is fire and forget.
pub trait RaftTransport: Send + Sync + 'static {
    /// Sends each message to `message.to`; never blocks.
    fn send(&self, messages: Vec<Message>);
}

/// Where a proposal's outcome is sent.
type ProposalReply = oneshot::Sender<CoordinatorResult<Outcome>>;
/// Where a linearizable read's state is sent.
type ReadReply = oneshot::Sender<CoordinatorResult<Arc<ClusterState>>>;

/// A coordinator's view of the group, for `moectl cluster status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaftStatus {
    pub id: u64,
    /// The leader this node knows of, if any.
    pub leader_id: Option<u64>,
    pub term: u64,
    pub role: &'static str,
    pub commit_index: u64,
    pub applied_index: u64,
    pub voters: Vec<u64>,
}

enum RaftCommand {
    /// A message from another coordinator.
    Step(Message),
    Propose {
        proposal: Proposal,
        reply_tx: ProposalReply,
    },
    /// A linearizable read of the state machine.
    Read { reply_tx: ReadReply },
    Status {
        reply_tx: oneshot::Sender<RaftStatus>,
    },
    /// The transport could not reach this peer.
    Unreachable(u64),
    /// Stops the actor; `done_tx` fires once its store is closed.
    Shutdown { done_tx: oneshot::Sender<()> },
}

/// The actor; see the module docs.
pub struct RaftNode {
    config: RaftNodeConfig,
    raw_node: RawNode<RaftStore>,
    state: ClusterState,
    applied_index: u64,
    applied_term: u64,
    transport: Arc<dyn RaftTransport>,
    /// Waiters of in-flight proposals, by request id.
    pending_proposals: HashMap<String, Vec<(Instant, ProposalReply)>>,
    /// Reads awaiting their read index, by context.
    pending_reads: HashMap<Vec<u8>, (Instant, ReadReply)>,
    /// Reads whose index is known, awaiting that index being applied.
    reads_awaiting_apply: Vec<(u64, Instant, ReadReply)>,
    next_read_context: u64,
    /// Publishes the state after each applied batch; the handle reads it.
    applied_tx: watch::Sender<Arc<ClusterState>>,
    /// What recent commands touched, for placement watchers; shared with
    /// the handle, written only here.
    history: Arc<Mutex<PlacementHistory>>,
    /// The leader as of the last soft state; `None` during elections.
    current_leader: Option<u64>,
    /// The last leader known, kept through elections as a hint for errors.
    last_leader: Option<u64>,
}

/// Forwards raft-rs's slog records to `tracing`.
struct TracingDrain;

impl slog::Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(
        &self,
        record: &slog::Record<'_>,
        _values: &slog::OwnedKVList,
    ) -> Result<(), slog::Never> {
        match record.level() {
            slog::Level::Critical | slog::Level::Error => {
                tracing::error!(target: "raft", "{}", record.msg())
            }
            slog::Level::Warning => tracing::warn!(target: "raft", "{}", record.msg()),
            slog::Level::Info => tracing::debug!(target: "raft", "{}", record.msg()),
            _ => tracing::trace!(target: "raft", "{}", record.msg()),
        }
        Ok(())
    }
}

/// The context of this coordinator's `number`-th read: unique in the
/// group, since the leader keeps one pending read per context and drops a
/// second with the same bytes, which a follower counting from 1 like
/// every other coordinator would send.
fn read_context(coordinator: u64, number: u64) -> Vec<u8> {
    [coordinator.to_be_bytes(), number.to_be_bytes()].concat()
}

/// Decodes a snapshot's state machine; the error says what does not fit.
fn decode_state(data: &[u8]) -> Result<ClusterState, String> {
    serde_json::from_slice(data)
        .map_err(|error| format!("its cluster state does not decode ({error})"))
}

fn undecodable_conf_change(index: u64, error: protobuf::ProtobufError) -> CoordinatorError {
    CoordinatorError::Storage(format!(
        "committed log entry {index} is a configuration change that does not decode ({error})"
    ))
}

impl RaftNode {
    /// Opens the store, restores the state machine from its snapshot and
    /// starts the actor. Committed entries after the snapshot are applied
    /// again as raft replays them.
    pub fn spawn(
        config: RaftNodeConfig,
        transport: Arc<dyn RaftTransport>,
    ) -> CoordinatorResult<RaftHandle> {
        let store = RaftStore::open(&config.data_dir, &config.voters)?;
        let (state, applied_index, applied_term) = match store.latest_snapshot()? {
            Some(snapshot) => {
                let metadata = snapshot.get_metadata();
                let state = decode_state(&snapshot.data).map_err(|error| {
                    store.damaged(format_args!(
                        "the snapshot at index {}: {error}",
                        metadata.index
                    ))
                })?;
                (state, metadata.index, metadata.term)
            }
            None => (ClusterState::default(), 0, 0),
        };
        let raft_config = Config {
            id: config.id,
            election_tick: config.election_ticks,
            heartbeat_tick: config.heartbeat_ticks,
            applied: applied_index,
            check_quorum: true,
            pre_vote: true,
            read_only_option: ReadOnlyOption::Safe,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            ..Config::default()
        };
        raft_config.validate()?;
        config.metrics.observe_state(&state);
        let logger = slog::Logger::root(TracingDrain, slog::o!("coordinator" => config.id));
        let raw_node = RawNode::new(&raft_config, store, &logger)?;
        let (command_tx, command_rx) = mpsc::channel(4096);
        let (applied_tx, applied_rx) = watch::channel(Arc::new(state.clone()));
        let history = Arc::new(Mutex::new(PlacementHistory::new(
            state.applied_commands,
            config.history_ids,
        )));
        let node = Self {
            config,
            raw_node,
            state,
            applied_index,
            applied_term,
            transport,
            pending_proposals: HashMap::new(),
            pending_reads: HashMap::new(),
            reads_awaiting_apply: Vec::new(),
            next_read_context: 0,
            applied_tx,
            history: Arc::clone(&history),
            current_leader: None,
            last_leader: None,
        };
        tokio::spawn(node.run(command_rx));
        Ok(RaftHandle::new(command_tx, applied_rx, history))
    }

    async fn run(mut self, mut command_rx: mpsc::Receiver<RaftCommand>) {
        let mut shutdown_done_tx = None;
        let mut ticker = tokio::time::interval(self.config.tick_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                command = command_rx.recv() => {
                    let Some(command) = command else { break };
                    let mut next = Some(command);
                    // Take whatever else is queued before the next Ready.
                    while let Some(command) = next.take().or_else(|| command_rx.try_recv().ok()) {
                        if let RaftCommand::Shutdown { done_tx } = command {
                            shutdown_done_tx = Some(done_tx);
                            break;
                        }
                        self.handle(command);
                    }
                    if shutdown_done_tx.is_some() {
                        break;
                    }
                }
                _ = ticker.tick() => {
                    self.raw_node.tick();
                    self.expire_requests();
                }
            }
            if let Err(error) = self.on_ready() {
                // The store failed: stop rather than risk acknowledging
                // something that is not durable.
                tracing::error!(coordinator = self.config.id, %error, "raft node stopping");
                break;
            }
        }
        self.fail_all_pending(|| CoordinatorError::ShuttingDown);
        // Close the store before saying we are done, so that it can be reopened.
        drop(self);
        if let Some(done_tx) = shutdown_done_tx {
            let _ = done_tx.send(());
        }
    }

    fn leader(&self) -> Option<u64> {
        let leader = self.raw_node.raft.leader_id;
        (leader != raft::INVALID_ID).then_some(leader)
    }

    fn handle(&mut self, command: RaftCommand) {
        match command {
            RaftCommand::Step(message) => {
                if let Some(reason) = guard::refusal(&self.raw_node.raft, &message) {
                    tracing::warn!(
                        coordinator = self.config.id,
                        from = message.from,
                        kind = ?message.get_msg_type(),
                        %reason,
                        "refused a raft message"
                    );
                    return;
                }
                if let Err(error) = self.raw_node.step(message) {
                    tracing::debug!(coordinator = self.config.id, %error, "dropped a raft message");
                }
            }
            RaftCommand::Propose { proposal, reply_tx } => {
                if self.leader().is_none() {
                    let _ = reply_tx.send(Err(CoordinatorError::NoLeader(self.last_leader)));
                    return;
                }
                let data = serde_json::to_vec(&proposal).expect("proposals always encode");
                match self.raw_node.propose(Vec::new(), data) {
                    Ok(()) => {
                        let deadline = Instant::now() + self.config.request_timeout;
                        self.pending_proposals
                            .entry(proposal.request_id)
                            .or_default()
                            .push((deadline, reply_tx));
                    }
                    Err(raft::Error::ProposalDropped) => {
                        let _ = reply_tx.send(Err(CoordinatorError::NoLeader(self.last_leader)));
                    }
                    Err(error) => {
                        let _ = reply_tx.send(Err(error.into()));
                    }
                }
            }
            RaftCommand::Read { reply_tx } => {
                if self.leader().is_none() {
                    let _ = reply_tx.send(Err(CoordinatorError::NoLeader(self.last_leader)));
                    return;
                }
                self.next_read_context += 1;
                let context = read_context(self.config.id, self.next_read_context);
                self.raw_node.read_index(context.clone());
                self.pending_reads.insert(
                    context,
                    (Instant::now() + self.config.request_timeout, reply_tx),
                );
            }
            RaftCommand::Status { reply_tx } => {
                let _ = reply_tx.send(self.status());
            }
            RaftCommand::Unreachable(peer) => self.raw_node.report_unreachable(peer),
            RaftCommand::Shutdown { done_tx } => {
                debug_assert!(false, "shutdown is handled by the loop");
                let _ = done_tx.send(());
            }
        }
    }

    fn status(&self) -> RaftStatus {
        let raft = &self.raw_node.raft;
        RaftStatus {
            id: self.config.id,
            leader_id: self.leader(),
            term: raft.term,
            role: match raft.state {
                StateRole::Leader => "leader",
                StateRole::Follower => "follower",
                StateRole::Candidate => "candidate",
                StateRole::PreCandidate => "pre-candidate",
            },
            commit_index: raft.raft_log.committed,
            applied_index: self.applied_index,
            voters: raft.prs().conf().voters().ids().iter().collect(),
        }
    }

    fn expire_requests(&mut self) {
        let now = Instant::now();
        let timeout_ms = self.config.request_timeout.as_millis() as u64;
        for (request_id, waiters) in self.pending_proposals.iter_mut() {
            for (_, reply_tx) in waiters.extract_if(.., |(deadline, _)| *deadline <= now) {
                let _ = reply_tx.send(Err(CoordinatorError::ProposalTimedOut {
                    request_id: request_id.clone(),
                    timeout_ms,
                }));
            }
        }
        self.pending_proposals
            .retain(|_, waiters| !waiters.is_empty());
        let expired: Vec<Vec<u8>> = self
            .pending_reads
            .iter()
            .filter(|(_, (deadline, _))| *deadline <= now)
            .map(|(context, _)| context.clone())
            .collect();
        for context in expired {
            if let Some((_, reply_tx)) = self.pending_reads.remove(&context) {
                let _ = reply_tx.send(Err(CoordinatorError::ReadTimedOut(timeout_ms)));
            }
        }
        for (_, _, reply_tx) in self
            .reads_awaiting_apply
            .extract_if(.., |(_, deadline, _)| *deadline <= now)
        {
            let _ = reply_tx.send(Err(CoordinatorError::ReadTimedOut(timeout_ms)));
        }
    }

    fn fail_pending_on_leader_change(&mut self) {
        for (request_id, waiters) in self.pending_proposals.drain() {
            for (_, reply_tx) in waiters {
                let _ = reply_tx.send(Err(CoordinatorError::LeaderChanged {
                    request_id: request_id.clone(),
                }));
            }
        }
        for (_, (_, reply_tx)) in self.pending_reads.drain() {
            let _ = reply_tx.send(Err(CoordinatorError::NoLeader(self.current_leader)));
        }
    }

    fn fail_all_pending(&mut self, error: impl Fn() -> CoordinatorError) {
        for (_, waiters) in self.pending_proposals.drain() {
            for (_, reply_tx) in waiters {
                let _ = reply_tx.send(Err(error()));
            }
        }
        for (_, (_, reply_tx)) in self.pending_reads.drain() {
            let _ = reply_tx.send(Err(error()));
        }
        for (_, _, reply_tx) in self.reads_awaiting_apply.drain(..) {
            let _ = reply_tx.send(Err(error()));
        }
    }

    /// One turn of the Ready loop, in raft-rs's documented order.
    fn on_ready(&mut self) -> CoordinatorResult<()> {
        if !self.raw_node.has_ready() {
            return Ok(());
        }
        let mut ready = self.raw_node.ready();
        if let Some(soft_state) = ready.ss() {
            let leader = (soft_state.leader_id != raft::INVALID_ID).then_some(soft_state.leader_id);
            if leader != self.current_leader {
                // Proposals forwarded to the old leader may be lost with it:
                // answer now rather than at the deadline. Retrying with the
                // same request id is safe whatever happened to them.
                self.fail_pending_on_leader_change();
                self.current_leader = leader;
            }
            if leader.is_some() && leader != self.last_leader {
                tracing::info!(
                    coordinator = self.config.id,
                    leader = soft_state.leader_id,
                    term = self.raw_node.raft.term,
                    "leader elected"
                );
                self.last_leader = leader;
            }
        }
        self.transport.send(ready.take_messages());
        if !ready.snapshot().is_empty() {
            let snapshot = ready.snapshot().clone();
            // The guard refused snapshots whose state does not decode.
            let state = decode_state(&snapshot.data).map_err(|error| {
                CoordinatorError::Storage(format!(
                    "the snapshot at index {} from the leader: {error}",
                    snapshot.get_metadata().index
                ))
            })?;
            self.raw_node.store().persist(Some(&snapshot), &[], None)?;
            self.state = state;
            self.history
                .lock()
                .expect("the history lock is never poisoned")
                .restart_at(self.state.applied_commands);
            self.applied_tx.send_replace(Arc::new(self.state.clone()));
            self.config.metrics.observe_state(&self.state);
            self.applied_index = snapshot.get_metadata().index;
            self.applied_term = snapshot.get_metadata().term;
        }
        let read_states = ready.take_read_states();
        self.apply_committed(ready.take_committed_entries())?;
        if !ready.entries().is_empty() || ready.hs().is_some() {
            self.raw_node
                .store()
                .persist(None, ready.entries(), ready.hs())?;
        }
        self.transport.send(ready.take_persisted_messages());
        for read_state in read_states {
            if let Some((deadline, reply_tx)) = self.pending_reads.remove(&read_state.request_ctx) {
                self.reads_awaiting_apply
                    .push((read_state.index, deadline, reply_tx));
            }
        }
        let mut light_ready = self.raw_node.advance(ready);
        if let Some(commit) = light_ready.commit_index() {
            self.raw_node.store().persist_commit(commit)?;
        }
        self.transport.send(light_ready.take_messages());
        self.apply_committed(light_ready.take_committed_entries())?;
        self.raw_node.advance_apply();
        self.answer_reads();
        self.maybe_compact()?;
        let raft = &self.raw_node.raft;
        self.config.metrics.observe_raft(raft, self.applied_index);
        Ok(())
    }

    fn apply_committed(&mut self, entries: Vec<Entry>) -> CoordinatorResult<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut answers = Vec::new();
        let history = Arc::clone(&self.history);
        let mut history = history.lock().expect("the history lock is never poisoned");
        for entry in entries {
            self.applied_index = entry.index;
            self.applied_term = entry.term;
            if entry.data.is_empty() {
                // A new leader's empty entry.
                continue;
            }
            match entry.get_entry_type() {
                EntryType::EntryNormal => {
                    let proposal: Proposal = match serde_json::from_slice(&entry.data) {
                        Ok(proposal) => proposal,
                        Err(error) => {
                            tracing::error!(index = entry.index, %error, "skipping an undecodable log entry");
                            continue;
                        }
                    };
                    let request_id = proposal.request_id.clone();
                    let outcome = history::apply_recorded(&mut self.state, &mut history, proposal);
                    for (_, reply_tx) in self
                        .pending_proposals
                        .remove(&request_id)
                        .unwrap_or_default()
                    {
                        answers.push((reply_tx, outcome.clone()));
                    }
                }
                EntryType::EntryConfChange => {
                    let change = ConfChange::parse_from_bytes(&entry.data)
                        .map_err(|error| undecodable_conf_change(entry.index, error))?;
                    let conf_state = self.raw_node.apply_conf_change(&change)?;
                    self.raw_node.store().persist_conf_state(&conf_state)?;
                }
                EntryType::EntryConfChangeV2 => {
                    let change = ConfChangeV2::parse_from_bytes(&entry.data)
                        .map_err(|error| undecodable_conf_change(entry.index, error))?;
                    let conf_state = self.raw_node.apply_conf_change(&change)?;
                    self.raw_node.store().persist_conf_state(&conf_state)?;
                }
            }
        }
        drop(history);
        // Publish before answering: whoever learns that a proposal applied
        // must also see it in `applied_state`.
        self.applied_tx.send_replace(Arc::new(self.state.clone()));
        self.config.metrics.observe_state(&self.state);
        for (reply_tx, outcome) in answers {
            let _ = reply_tx.send(Ok(outcome));
        }
        Ok(())
    }

    fn answer_reads(&mut self) {
        if self.reads_awaiting_apply.is_empty() {
            return;
        }
        let applied = self.applied_index;
        let state = self.applied_tx.borrow().clone();
        for (_, _, reply_tx) in self
            .reads_awaiting_apply
            .extract_if(.., |(index, _, _)| *index <= applied)
        {
            let _ = reply_tx.send(Ok(Arc::clone(&state)));
        }
    }

    fn maybe_compact(&mut self) -> CoordinatorResult<()> {
        let store = self.raw_node.store();
        let compacted_to = store.latest_snapshot_index();
        if self.applied_index < compacted_to + self.config.compact_after_entries {
            return Ok(());
        }
        let data = serde_json::to_vec(&self.state).expect("cluster state always encodes");
        store.compact(self.applied_index, self.applied_term, data)?;
        tracing::debug!(
            coordinator = self.config.id,
            index = self.applied_index,
            "log compacted"
        );
        Ok(())
    }
}
