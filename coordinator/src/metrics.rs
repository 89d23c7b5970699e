//! What a coordinator tells Prometheus: the placement epoch and the
//! expert nodes and replicas by state, as this coordinator applied them;
//! its place in the Raft group (leader or not, term, commit and applied
//! index); and what it did: replica moves, rebalance runs, heartbeats.
//!
//! Gauges of the replicated state are set by every coordinator from the
//! state it applied, so a scrape of any member is right; counters count
//! what the coordinator that did the work saw. Labels take bounded values
//! only (node and replica states, outcomes); per-expert load goes to the
//! load window (`LoadStats`, `moectl top`) instead.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use raft::{Raft, StateRole, Storage};

use crate::state::{ClusterState, NodeStatus, ReplicaState};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

/// How a replica move or replication ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoveOutcome {
    /// The new replica serves (and the old one, for a move, is gone).
    Done,
    /// Refused, not loaded in time, or cut short while its caller waited.
    Failed,
    /// Cut short earlier and finished by the leader's monitor: the drained
    /// replica was removed or, as the expert's only copy, put back.
    Abandoned,
}

impl MoveOutcome {
    fn label(self) -> &'static str {
        match self {
            Self::Done => "done",
            Self::Failed => "failed",
            Self::Abandoned => "abandoned",
        }
    }
}

/// How a (non-dry) rebalance run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebalanceRun {
    /// Every move of its plan was done, at least one.
    Moved,
    /// The plan moved nothing, and nothing failed.
    NothingToDo,
    /// The run failed, or a layer's plan or one of its moves did.
    Failed,
}

impl RebalanceRun {
    fn label(self) -> &'static str {
        match self {
            Self::Moved => "moved",
            Self::NothingToDo => "nothing_to_do",
            Self::Failed => "failed",
        }
    }
}

const NODE_STATES: [NodeStatus; 4] = [
    NodeStatus::Joining,
    NodeStatus::Ready,
    NodeStatus::Draining,
    NodeStatus::Dead,
];

fn node_state_label(status: NodeStatus) -> &'static str {
    match status {
        NodeStatus::Joining => "joining",
        NodeStatus::Ready => "ready",
        NodeStatus::Draining => "draining",
        NodeStatus::Dead => "dead",
    }
}

const REPLICA_STATES: [ReplicaState; 3] = [
    ReplicaState::Loading,
    ReplicaState::Ready,
    ReplicaState::Draining,
];

fn replica_state_label(state: ReplicaState) -> &'static str {
    match state {
        ReplicaState::Loading => "loading",
        ReplicaState::Ready => "ready",
        ReplicaState::Draining => "draining",
    }
}

/// A coordinator's metric families. Cheap to clone: clones share the values.
#[derive(Clone, Debug, Default)]
pub struct CoordinatorMetrics {
    placement_epoch: Gauge,
    nodes: Family<StateLabels, Gauge>,
    replicas: Family<StateLabels, Gauge>,
    is_leader: Gauge,
    term: Gauge,
    commit_index: Gauge,
    applied_index: Gauge,
    moves: Family<OutcomeLabels, Counter>,
    rebalances: Family<OutcomeLabels, Counter>,
    heartbeats: Counter,
    reported_tokens: Counter,
    placement_watchers: Gauge,
    placement_updates: Family<KindLabels, Counter>,
    placement_update_bytes: Counter,
}

impl CoordinatorMetrics {
    /// Registers every family into `registry` (a process's, prefixed
    /// `moemesh_`). [`Default`] gives metrics that count but are exported
    /// nowhere (tests, embedding).
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "placement_epoch",
            "The placement epoch of the state this coordinator applied",
            metrics.placement_epoch.clone(),
        );
        registry.register(
            "coordinator_nodes",
            "Expert nodes by status, in the state this coordinator applied",
            metrics.nodes.clone(),
        );
        registry.register(
            "coordinator_replicas",
            "Expert replicas by state, in the state this coordinator applied",
            metrics.replicas.clone(),
        );
        registry.register(
            "coordinator_is_leader",
            "1 while this coordinator leads the Raft group, else 0",
            metrics.is_leader.clone(),
        );
        registry.register(
            "coordinator_term",
            "The Raft term this coordinator is in",
            metrics.term.clone(),
        );
        registry.register(
            "coordinator_commit_index",
            "The highest Raft log index this coordinator knows committed",
            metrics.commit_index.clone(),
        );
        registry.register(
            "coordinator_applied_index",
            "The highest Raft log index this coordinator applied",
            metrics.applied_index.clone(),
        );
        registry.register(
            "coordinator_moves",
            "Replica moves and replications this coordinator carried out, by outcome \
             (a rebalance counts each replica it adds or removes)",
            metrics.moves.clone(),
        );
        registry.register(
            "coordinator_rebalances",
            "Rebalance runs (not dry runs) this coordinator carried out, by outcome",
            metrics.rebalances.clone(),
        );
        registry.register(
            "coordinator_heartbeats",
            "Heartbeats this coordinator received from expert nodes (followers hand theirs \
             to the leader, which counts them too)",
            metrics.heartbeats.clone(),
        );
        registry.register(
            "coordinator_reported_tokens",
            "Tokens the routers' load reports added to this coordinator's load window \
             (the leader's covers every router; per-expert counts are in LoadStats)",
            metrics.reported_tokens.clone(),
        );
        registry.register(
            "coordinator_placement_watchers",
            "Placement streams (routers, expert nodes, tools) this coordinator serves now",
            metrics.placement_watchers.clone(),
        );
        registry.register(
            "coordinator_placement_updates",
            "Placement updates this coordinator sent its watchers, by kind: snapshot \
             (a new watcher, or one further behind than the history reaches) or delta",
            metrics.placement_updates.clone(),
        );
        registry.register(
            "coordinator_placement_update_bytes",
            "Bytes of the placement updates this coordinator sent (messages with gRPC \
             and HTTP/2 framing)",
            metrics.placement_update_bytes.clone(),
        );
        metrics
    }

    /// Records the placement epoch and the nodes and replicas by state of
    /// an applied state. Every state is set, so one emptied reads 0.
    pub(crate) fn observe_state(&self, state: &ClusterState) {
        self.placement_epoch.set(gauge_value(state.epoch));
        for status in NODE_STATES {
            let count = state.nodes.values().filter(|node| node.status == status);
            let labels = StateLabels {
                state: node_state_label(status),
            };
            self.nodes.get_or_create(&labels).set(count.count() as i64);
        }
        for replica_state in REPLICA_STATES {
            let count = state
                .replicas
                .values()
                .flatten()
                .filter(|replica| replica.state == replica_state);
            let labels = StateLabels {
                state: replica_state_label(replica_state),
            };
            self.replicas
                .get_or_create(&labels)
                .set(count.count() as i64);
        }
    }

    /// Records this coordinator's place in the Raft group, after a turn of
    /// its Ready loop.
    pub(crate) fn observe_raft<S: Storage>(&self, raft: &Raft<S>, applied_index: u64) {
        self.is_leader
            .set(i64::from(raft.state == StateRole::Leader));
        self.term.set(gauge_value(raft.term));
        self.commit_index.set(gauge_value(raft.raft_log.committed));
        self.applied_index.set(gauge_value(applied_index));
    }

    /// Counts a placement stream opened (`open`) or closed.
    pub(crate) fn count_placement_watcher(&self, open: bool) {
        self.placement_watchers.inc_by(if open { 1 } else { -1 });
    }

    /// Counts a placement update sent, whole or a delta, of `bytes` on the wire.
    pub(crate) fn count_placement_update(&self, snapshot: bool, bytes: u64) {
        let kind = if snapshot { "snapshot" } else { "delta" };
        self.placement_updates
            .get_or_create(&KindLabels { kind })
            .inc();
        self.placement_update_bytes.inc_by(bytes);
    }

    /// Counts a replica move or replication that ended.
    pub(crate) fn count_move(&self, outcome: MoveOutcome) {
        let labels = OutcomeLabels {
            outcome: outcome.label(),
        };
        self.moves.get_or_create(&labels).inc();
    }

    /// Counts a rebalance run that ended.
    pub(crate) fn count_rebalance(&self, run: RebalanceRun) {
        let labels = OutcomeLabels {
            outcome: run.label(),
        };
        self.rebalances.get_or_create(&labels).inc();
    }

    /// Counts a heartbeat received.
    pub(crate) fn count_heartbeat(&self) {
        self.heartbeats.inc();
    }

    /// Counts tokens a router's load report added to the load window.
    pub(crate) fn count_reported_tokens(&self, tokens: u64) {
        self.reported_tokens.inc_by(tokens);
    }
}

/// Prometheus gauges are signed; raft indexes and epochs never come near
/// `i64::MAX`, but saturate rather than wrap if they did.
fn gauge_value(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::text::encode;

    use super::*;
    use crate::state::NodeRecord;

    fn node(id: &str, status: NodeStatus) -> NodeRecord {
        NodeRecord {
            id: id.into(),
            address: format!("http://{id}:1"),
            group: String::new(),
            device: "cpu".into(),
            memory_bytes: 1 << 30,
            buffer_bytes: 0,
            weight_format: String::new(),
            status,
        }
    }

    #[test]
    fn every_node_state_is_exposed_and_follows_the_state() {
        let mut registry = Registry::with_prefix("moemesh");
        let metrics = CoordinatorMetrics::register(&mut registry);
        let mut state = ClusterState::default();
        state.epoch = 7;
        for (id, status) in [("a", NodeStatus::Ready), ("b", NodeStatus::Ready)] {
            state.nodes.insert(id.into(), node(id, status));
        }
        metrics.observe_state(&state);
        state.nodes.insert("b".into(), node("b", NodeStatus::Dead));
        metrics.observe_state(&state);
        metrics.count_move(MoveOutcome::Abandoned);
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        for line in [
            "moemesh_placement_epoch 7",
            "moemesh_coordinator_nodes{state=\"ready\"} 1",
            "moemesh_coordinator_nodes{state=\"dead\"} 1",
            "moemesh_coordinator_nodes{state=\"joining\"} 0",
            "moemesh_coordinator_nodes{state=\"draining\"} 0",
            "moemesh_coordinator_replicas{state=\"loading\"} 0",
            "moemesh_coordinator_moves_total{outcome=\"abandoned\"} 1",
        ] {
            assert!(text.lines().any(|found| found == line), "{line} in\n{text}");
        }
    }
}
