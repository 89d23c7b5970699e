//! Moves cut short (the caller gone, a proposal timed out, the leader
//! changed) leave replicas draining; the leader's membership monitor
//! finishes them: it removes a drained replica once it has had twice the
//! drain grace, or puts it back to ready when its expert has no other
//! ready replica. Either way the move is counted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moemesh_coordinator::membership::{Membership, move_replica};
use moemesh_coordinator::metrics::CoordinatorMetrics;
use moemesh_coordinator::node::{RaftHandle, RaftNode, RaftNodeConfig};
use moemesh_coordinator::state::{
    ClusterState, Command, ExpertKey, ModelRecord, NodeRecord, NodeStatus, Outcome, Proposal,
    ReplicaState,
};
use moemesh_coordinator::transport::SimNetwork;
use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;

/// Long enough for a slow, noisy machine; only an upper bound.
const PATIENCE: Duration = Duration::from_secs(60);
const DRAIN_GRACE: Duration = Duration::from_millis(200);

async fn single_coordinator(dir: &std::path::Path) -> RaftHandle {
    let network = SimNetwork::default();
    let mut config = RaftNodeConfig::new(1, vec![1], dir.join("coordinator-1"));
    config.tick_interval = Duration::from_millis(10);
    let handle = RaftNode::spawn(config, network.transport()).unwrap();
    network.attach(1, handle.clone());
    let started = Instant::now();
    while handle.status().await.unwrap().leader_id != Some(1) {
        assert!(started.elapsed() < PATIENCE, "no leader");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    handle
}

async fn apply(raft: &RaftHandle, request_id: &str, command: Command) {
    let proposal = Proposal {
        request_id: request_id.into(),
        command,
    };
    let outcome = raft.propose(proposal).await.unwrap();
    assert!(
        matches!(outcome, Outcome::Applied { .. }),
        "{request_id}: {outcome:?}"
    );
}

fn key(expert: u32) -> ExpertKey {
    ExpertKey {
        model: "m".into(),
        layer: 0,
        expert,
    }
}

/// A cluster of nodes a, b and c serving `m`: expert 0 on a and b, expert
/// 1 on a and c, both ready.
async fn serving_cluster(raft: &RaftHandle) {
    for id in ["a", "b", "c"] {
        let node = NodeRecord {
            id: id.into(),
            address: format!("http://{id}:1"),
            group: "rack".into(),
            device: "cpu".into(),
            memory_bytes: 1 << 30,
            buffer_bytes: 0,
            weight_format: "f32".into(),
            status: NodeStatus::Ready,
        };
        apply(raft, id, Command::RegisterNode { node }).await;
    }
    let model = ModelRecord {
        id: "m".into(),
        checkpoint: "/models/m".into(),
        family: "mixtral".into(),
        moe_layers: vec![0],
        experts_per_layer: 2,
    };
    apply(raft, "model", Command::AddModel { model }).await;
    for (expert, node) in [(0, "a"), (0, "b"), (1, "a"), (1, "c")] {
        let add = Command::AddReplica {
            key: key(expert),
            node: node.into(),
        };
        apply(raft, &format!("add-{expert}-{node}"), add).await;
        let ready = Command::ReplicaReady {
            key: key(expert),
            node: node.into(),
        };
        apply(raft, &format!("ready-{expert}-{node}"), ready).await;
    }
}

fn replica_state(state: &ClusterState, expert: u32, node: &str) -> Option<ReplicaState> {
    state
        .replicas
        .get(&key(expert))?
        .iter()
        .find(|r| r.node == node)
        .map(|r| r.state)
}

/// Waits until `registry` shows `line` (a sample, as exposed).
async fn wait_for_sample(registry: &Registry, line: &str) {
    let started = Instant::now();
    loop {
        let mut text = String::new();
        encode(&mut text, registry).unwrap();
        if text.lines().any(|found| found == line) {
            return;
        }
        assert!(started.elapsed() < PATIENCE, "never {line} in:\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `done` holds of the applied state.
async fn wait_for(raft: &RaftHandle, what: &str, done: impl Fn(&ClusterState) -> bool) {
    let started = Instant::now();
    while !done(&raft.applied_state()) {
        assert!(started.elapsed() < PATIENCE, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_left_draining_are_removed_or_put_back_to_ready() {
    let dir = tempfile::tempdir().unwrap();
    let raft = single_coordinator(dir.path()).await;
    serving_cluster(&raft).await;
    // Two moves cut short after their drain: expert 0 still has b ready;
    // expert 1 lost its other replica (on c) since.
    let drain = |expert: u32, node: &str| Command::DrainReplica {
        key: key(expert),
        node: node.into(),
    };
    apply(&raft, "drain-0", drain(0, "a")).await;
    apply(&raft, "drain-1", drain(1, "a")).await;
    let remove = Command::RemoveReplica {
        key: key(1),
        node: "c".into(),
    };
    apply(&raft, "c-gone", remove).await;

    let mut registry = Registry::default();
    let membership = Membership::with_drain_grace(
        raft.clone(),
        Duration::from_secs(3600),
        DRAIN_GRACE,
        CoordinatorMetrics::register(&mut registry),
    );
    let monitor = tokio::spawn(Arc::clone(&membership).monitor_task());
    wait_for(
        &raft,
        "the drained replica of expert 0 is removed",
        |state| replica_state(state, 0, "a").is_none(),
    )
    .await;
    wait_for(&raft, "expert 1's only copy serves again", |state| {
        replica_state(state, 1, "a") == Some(ReplicaState::Ready)
    })
    .await;
    let state = raft.applied_state();
    assert_eq!(replica_state(&state, 0, "b"), Some(ReplicaState::Ready));
    assert_eq!(state.replicas[&key(1)].len(), 1);
    wait_for_sample(
        &registry,
        "coordinator_moves_total{outcome=\"abandoned\"} 2",
    )
    .await;
    monitor.abort();
    raft.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_whose_caller_goes_away_still_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let raft = single_coordinator(dir.path()).await;
    serving_cluster(&raft).await;
    // Move expert 0 from a to c; c "loads" it as soon as it is placed.
    let loader = {
        let raft = raft.clone();
        tokio::spawn(async move {
            wait_for(&raft, "the new replica is placed", |state| {
                replica_state(state, 0, "c") == Some(ReplicaState::Loading)
            })
            .await;
            let ready = Command::ReplicaReady {
                key: key(0),
                node: "c".into(),
            };
            apply(&raft, "c-loaded", ready).await;
        })
    };
    let mut registry = Registry::default();
    let metrics = CoordinatorMetrics::register(&mut registry);
    let mover = {
        let raft = raft.clone();
        tokio::spawn(async move {
            let grace = Duration::from_secs(1);
            move_replica(&raft, &metrics, "move", key(0), "a", "c", grace).await
        })
    };
    wait_for(&raft, "the old replica drains", |state| {
        replica_state(state, 0, "a") == Some(ReplicaState::Draining)
    })
    .await;
    // The operator's call is cancelled during the drain grace.
    mover.abort();
    loader.await.unwrap();
    wait_for(&raft, "the move finishes without its caller", |state| {
        replica_state(state, 0, "a").is_none()
    })
    .await;
    assert_eq!(
        replica_state(&raft.applied_state(), 0, "c"),
        Some(ReplicaState::Ready)
    );
    wait_for_sample(&registry, "coordinator_moves_total{outcome=\"done\"} 1").await;
    raft.shutdown().await;
}
