//! Forged raft messages stepped straight into the coordinators of a
//! three-member group: messages raft-rs would panic on, messages for
//! another member or from a stranger, configuration changes and snapshots
//! whose state does not decode. Every coordinator must refuse them, stay
//! up with its term, voters and state unchanged, and keep committing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moemesh_coordinator::CoordinatorError;
use moemesh_coordinator::node::{RaftHandle, RaftNode, RaftNodeConfig, RaftStatus};
use moemesh_coordinator::state::{
    ClusterState, Command, NodeRecord, NodeStatus, Outcome, Proposal,
};
use moemesh_coordinator::transport::SimNetwork;
use protobuf::Message as _;
use raft::prelude::{ConfChange, ConfChangeType, Entry, EntryType, Message, MessageType, Snapshot};

/// Long enough for elections on a slow, noisy machine; only an upper bound.
const PATIENCE: Duration = Duration::from_secs(60);

struct Group {
    _dirs: tempfile::TempDir,
    handles: BTreeMap<u64, RaftHandle>,
}

impl Group {
    fn start() -> Self {
        let dirs = tempfile::tempdir().unwrap();
        let network = SimNetwork::default();
        let voters = vec![1, 2, 3];
        let mut handles = BTreeMap::new();
        for &id in &voters {
            let data_dir = dirs.path().join(format!("coordinator-{id}"));
            let mut config = RaftNodeConfig::new(id, voters.clone(), data_dir);
            config.tick_interval = Duration::from_millis(20);
            config.request_timeout = Duration::from_secs(3);
            let handle = RaftNode::spawn(config, network.transport()).unwrap();
            network.attach(id, handle.clone());
            handles.insert(id, handle);
        }
        Self {
            _dirs: dirs,
            handles,
        }
    }

    /// Every coordinator's status; panics naming the one that stopped.
    async fn statuses(&self, after: &str) -> BTreeMap<u64, RaftStatus> {
        let mut statuses = BTreeMap::new();
        for (&id, handle) in &self.handles {
            let status = handle
                .status()
                .await
                .unwrap_or_else(|error| panic!("coordinator {id} stopped after {after}: {error}"));
            statuses.insert(id, status);
        }
        statuses
    }

    /// Waits until every coordinator names the same leader and has applied
    /// what it committed; returns their statuses.
    async fn settled(&self) -> BTreeMap<u64, RaftStatus> {
        let started = Instant::now();
        loop {
            let statuses = self.statuses("settling").await;
            let leaders: Vec<Option<u64>> = statuses.values().map(|s| s.leader_id).collect();
            let applied = statuses
                .values()
                .all(|status| status.applied_index == status.commit_index);
            if leaders[0].is_some() && leaders.iter().all(|leader| *leader == leaders[0]) && applied
            {
                return statuses;
            }
            assert!(
                started.elapsed() < PATIENCE,
                "no settled leader: {statuses:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn converged(&self) -> Arc<ClusterState> {
        let started = Instant::now();
        loop {
            let states: Vec<Arc<ClusterState>> = self
                .handles
                .values()
                .map(RaftHandle::applied_state)
                .collect();
            if states.windows(2).all(|pair| pair[0] == pair[1]) {
                return Arc::clone(&states[0]);
            }
            assert!(started.elapsed() < PATIENCE, "coordinators never converged");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Proposes through `via`, retrying with the same id until it applies.
    async fn register(&self, via: u64, node: &str) {
        let started = Instant::now();
        loop {
            let proposal = Proposal {
                request_id: format!("register-{node}"),
                command: register(node),
            };
            match self.handles[&via].propose(proposal).await {
                Ok(outcome) => {
                    assert!(matches!(outcome, Outcome::Applied { .. }), "{outcome:?}");
                    return;
                }
                Err(
                    CoordinatorError::NoLeader(_)
                    | CoordinatorError::ProposalTimedOut { .. }
                    | CoordinatorError::LeaderChanged { .. },
                ) if started.elapsed() < PATIENCE => {
                    tokio::time::sleep(Duration::from_millis(30)).await;
                }
                Err(error) => panic!("registering {node} through {via}: {error}"),
            }
        }
    }

    async fn shutdown(self) {
        for handle in self.handles.values() {
            handle.shutdown().await;
        }
    }
}

fn register(id: &str) -> Command {
    Command::RegisterNode {
        node: NodeRecord {
            id: id.into(),
            address: format!("http://{id}:50061"),
            group: "rack-1".into(),
            device: "cpu".into(),
            memory_bytes: 1 << 30,
            buffer_bytes: 0,
            weight_format: String::new(),
            status: NodeStatus::Ready,
        },
    }
}

fn message(kind: MessageType, from: u64, to: u64, term: u64) -> Message {
    let mut message = Message::default();
    message.set_msg_type(kind);
    message.from = from;
    message.to = to;
    message.term = term;
    message
}

fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
    Entry {
        index,
        term,
        data: data.to_vec().into(),
        ..Default::default()
    }
}

/// A snapshot of the three-member group at `index`, holding `data`.
fn snapshot(index: u64, term: u64, data: &[u8]) -> Snapshot {
    let mut snapshot = Snapshot::default();
    snapshot.set_data(data.to_vec().into());
    let metadata = snapshot.mut_metadata();
    metadata.index = index;
    metadata.term = term;
    metadata.mut_conf_state().set_voters(vec![1, 2, 3]);
    snapshot
}

/// Messages that raft-rs would panic on, or that no member of the group
/// sends, aimed at coordinator `to` as if from coordinator `from`.
fn forged_messages(to: u64, from: u64, other: u64, term: u64) -> Vec<(&'static str, Message)> {
    let far_future = term + 1000;
    let mut forged = Vec::new();

    let mut heartbeat = message(MessageType::MsgHeartbeat, from, to, far_future);
    heartbeat.commit = u64::MAX;
    forged.push((
        "a heartbeat from a later term committing everything",
        heartbeat,
    ));

    let mut heartbeat = message(MessageType::MsgHeartbeat, from, to, term);
    heartbeat.commit = 1 << 40;
    forged.push(("a heartbeat committing past the log", heartbeat));

    let mut append = message(MessageType::MsgAppend, from, to, term);
    append.index = 1 << 40;
    append.commit = u64::MAX;
    forged.push(("an append anchored past the log with term 0", append));

    let mut append = message(MessageType::MsgAppend, from, to, term);
    append.index = 1 << 40;
    append.set_entries(vec![entry(1, far_future, b"overwrite")].into());
    forged.push(("an append overwriting committed entries", append));

    forged.push((
        "an empty proposal",
        message(MessageType::MsgPropose, from, to, 0),
    ));
    forged.push((
        "a read index request without its context",
        message(MessageType::MsgReadIndex, from, to, 0),
    ));

    let mut response = message(MessageType::MsgAppendResponse, from, to, term);
    response.index = u64::MAX;
    forged.push(("an append response acknowledging past the log", response));

    let mut read = message(MessageType::MsgReadIndexResp, from, to, 0);
    read.index = u64::MAX;
    read.set_entries(vec![entry(0, 0, b"context")].into());
    forged.push(("a read index response of term 0", read));

    let mut snapshot_message = message(MessageType::MsgSnapshot, from, to, term);
    snapshot_message.set_snapshot(snapshot(1 << 40, 0, b"{}"));
    forged.push(("a snapshot of term 0 past the log", snapshot_message));

    let mut change = ConfChange::default();
    change.set_change_type(ConfChangeType::RemoveNode);
    change.node_id = other;
    let mut change_entry = entry(0, 0, &change.write_to_bytes().unwrap());
    change_entry.set_entry_type(EntryType::EntryConfChange);
    let mut proposal = message(MessageType::MsgPropose, from, to, 0);
    proposal.set_entries(vec![change_entry].into());
    forged.push(("a proposal removing a voter", proposal));

    let mut elsewhere = message(MessageType::MsgHeartbeat, from, other, far_future);
    elsewhere.commit = 0;
    forged.push(("a heartbeat addressed to another coordinator", elsewhere));

    let mut stranger = message(MessageType::MsgHeartbeat, 99, to, far_future);
    stranger.commit = 0;
    forged.push(("a heartbeat from a stranger", stranger));
    forged
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_messages_are_refused_and_every_coordinator_keeps_serving() {
    let group = Group::start();
    let leader = group.settled().await[&1].leader_id.unwrap();
    for node in ["a", "b", "c"] {
        group.register(leader, node).await;
    }
    let before_state = group.converged().await;
    let before = group.settled().await;
    let term = before[&1].term;

    for (&to, handle) in &group.handles {
        let from = if to == leader { to % 3 + 1 } else { leader };
        let other = (1..=3).find(|&id| id != to && id != from).unwrap();
        for (what, forged) in forged_messages(to, from, other, term) {
            handle.step(forged);
            // Give the node time to act on it (and, unguarded, to fall over).
            tokio::time::sleep(Duration::from_millis(50)).await;
            group.statuses(what).await;
        }
    }

    let after = group.settled().await;
    for (id, status) in &after {
        assert!(
            status.term < term + 1000,
            "coordinator {id} took a forged term: {status:?}"
        );
        assert_eq!(status.voters, vec![1, 2, 3], "coordinator {id}'s voters");
    }
    assert_eq!(
        group.converged().await,
        before_state,
        "no forged entry applied"
    );
    for (via, node) in [(1, "after-1"), (2, "after-2"), (3, "after-3")] {
        group.register(via, node).await;
    }
    assert_eq!(group.converged().await.nodes.len(), 6);
    group.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_whose_state_does_not_decode_is_refused() {
    let group = Group::start();
    let leader = group.settled().await[&1].leader_id.unwrap();
    group.register(leader, "a").await;
    let before_state = group.converged().await;
    let before = group.settled().await;
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    let status = &before[&follower];

    let mut forged = message(MessageType::MsgSnapshot, leader, follower, status.term);
    let past_the_log = status.commit_index + 1000;
    forged.set_snapshot(snapshot(past_the_log, status.term, b"not a cluster state"));
    group.handles[&follower].step(forged);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let after = group.statuses("an undecodable snapshot").await;
    assert!(
        after[&follower].commit_index < past_the_log,
        "the follower took the snapshot: {:?}",
        after[&follower]
    );
    assert_eq!(group.converged().await, before_state);
    group.register(follower, "b").await;
    assert_eq!(group.converged().await.nodes.len(), 2);
    group.shutdown().await;
}
