//! What recent commands touched, so that a placement watcher is sent only
//! what changed since the revision it has.
//!
//! The revision of a state is [`ClusterState::applied_commands`]: every
//! coordinator applies the same commands in the same order, so a revision
//! names the same state on each, and a watcher that reconnects to another
//! coordinator can send the one it has. Each coordinator remembers, for the
//! latest commands, which nodes and experts they touched (ids only, not
//! values); a delta is then those nodes and experts as the current state has
//! them. The history is bounded: a watcher further behind than it reaches
//! gets a snapshot instead.

use std::collections::{BTreeSet, VecDeque};

use crate::state::{ClusterState, Command, ExpertKey, Outcome, Proposal};

/// Ids a coordinator's history keeps, nodes and experts together, by
/// default: about 8 MB, and thousands of rebalance moves.
pub const DEFAULT_HISTORY_IDS: usize = 100_000;

/// The nodes and experts a command (or a run of commands) may have changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Touched {
    pub nodes: BTreeSet<String>,
    pub experts: BTreeSet<ExpertKey>,
}

impl Touched {
    fn len(&self) -> usize {
        self.nodes.len() + self.experts.len()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn extend(&mut self, other: &Touched) {
        self.nodes.extend(other.nodes.iter().cloned());
        self.experts.extend(other.experts.iter().cloned());
    }
}

/// The nodes and experts `command` may change when applied to `state`.
/// Models are not part of the placement stream; a node's replicas are
/// those of the experts it holds.
pub fn touched_by(command: &Command, state: &ClusterState) -> Touched {
    let mut touched = Touched::default();
    match command {
        Command::RegisterNode { node } => {
            touched.nodes.insert(node.id.clone());
        }
        Command::SetNodeStatus { node, .. } => {
            touched.nodes.insert(node.clone());
        }
        Command::AddModel { .. } => {}
        Command::AddReplica { key, .. }
        | Command::ReplicaReady { key, .. }
        | Command::DrainReplica { key, .. }
        | Command::RemoveReplica { key, .. }
        | Command::RemoveDrainedReplica { key, .. }
        | Command::RestoreReplica { key, .. } => {
            touched.experts.insert(key.clone());
        }
        Command::AddReplicas { replicas } => {
            touched
                .experts
                .extend(replicas.iter().map(|(key, _)| key.clone()));
        }
        Command::AddServingReplicas { keys, .. } => {
            touched.experts.extend(keys.iter().cloned());
        }
        Command::ReconcileNodeReplicas { node, .. } => {
            touched.experts.extend(
                state
                    .replicas
                    .iter()
                    .filter(|(_, replicas)| replicas.iter().any(|replica| &replica.node == node))
                    .map(|(key, _)| key.clone()),
            );
        }
    }
    touched
}

/// The recent revisions of one coordinator's state and what each touched.
#[derive(Debug)]
pub struct PlacementHistory {
    /// Every revision after this one is in `entries`.
    complete_after: u64,
    /// (revision, what the command that made it touched), oldest first;
    /// commands that touched nothing are left out.
    entries: VecDeque<(u64, Touched)>,
    /// Ids in `entries`.
    ids: usize,
    /// Most ids kept; the oldest entries go first.
    capacity: usize,
}

impl PlacementHistory {
    /// An empty history of a state at `revision`.
    pub fn new(revision: u64, capacity: usize) -> Self {
        Self {
            complete_after: revision,
            entries: VecDeque::new(),
            ids: 0,
            capacity,
        }
    }

    /// Forgets everything: the state was replaced (a snapshot from the
    /// leader) and is now at `revision`.
    pub fn restart_at(&mut self, revision: u64) {
        self.complete_after = revision;
        self.entries.clear();
        self.ids = 0;
    }

    /// Records that the command making `revision` touched `touched`.
    pub fn record(&mut self, revision: u64, touched: Touched) {
        if !touched.is_empty() {
            self.ids += touched.len();
            self.entries.push_back((revision, touched));
        }
        while self.ids > self.capacity
            && let Some((oldest, dropped)) = self.entries.pop_front()
        {
            self.ids -= dropped.len();
            self.complete_after = oldest;
        }
    }

    /// Everything touched after revision `since` up to `until`; None when
    /// the history no longer reaches back to `since`.
    pub fn touched_between(&self, since: u64, until: u64) -> Option<Touched> {
        if since < self.complete_after {
            return None;
        }
        let mut touched = Touched::default();
        let first = self
            .entries
            .partition_point(|(revision, _)| *revision <= since);
        for (_, entry) in self
            .entries
            .range(first..)
            .take_while(|(revision, _)| *revision <= until)
        {
            touched.extend(entry);
        }
        Some(touched)
    }
}

/// Applies `proposal` to `state` and records what it touched: the one way
/// the Raft actor (and tests standing in for it) change the state.
pub fn apply_recorded(
    state: &mut ClusterState,
    history: &mut PlacementHistory,
    proposal: Proposal,
) -> Outcome {
    let before = state.applied_commands;
    let touched = touched_by(&proposal.command, state);
    let outcome = state.apply(proposal);
    if state.applied_commands != before && matches!(outcome, Outcome::Applied { .. }) {
        history.record(state.applied_commands, touched);
    }
    outcome
}
