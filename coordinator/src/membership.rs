//! Liveness and placement changes that take several steps: heartbeats and
//! dead nodes (on the leader), and moving or adding replicas through the
//! protocol that never fails a request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::node::RaftHandle;
use crate::state::{ClusterState, Command, ExpertKey, NodeStatus, ReplicaState};
use crate::{CoordinatorError, CoordinatorResult};

/// How long routers get to leave a drained replica before it is removed.
pub const DRAIN_GRACE: Duration = Duration::from_secs(2);
/// How long a new replica may take to load before a move gives up.
pub const LOAD_TIMEOUT: Duration = Duration::from_secs(120);

/// Picks a live node for a new replica of `key`: one that does not hold it,
/// preferably in a topology group its live replicas do not use, then the
/// one holding the fewest replicas, then the lowest id.
pub fn choose_target(state: &ClusterState, key: &ExpertKey) -> Option<String> {
    let replicas = state
        .replicas
        .get(key)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let used_groups: Vec<&str> = replicas
        .iter()
        .filter_map(|replica| state.nodes.get(&replica.node))
        .filter(|node| node.status == NodeStatus::Ready)
        .map(|node| node.group.as_str())
        .collect();
    let mut load: HashMap<&str, usize> = HashMap::new();
    for replica in state.replicas.values().flatten() {
        *load.entry(replica.node.as_str()).or_default() += 1;
    }
    state
        .nodes
        .values()
        .filter(|node| node.status == NodeStatus::Ready)
        .filter(|node| !replicas.iter().any(|replica| replica.node == node.id))
        .min_by_key(|node| {
            (
                used_groups.contains(&node.group.as_str()),
                load.get(node.id.as_str()).copied().unwrap_or(0),
                node.id.clone(),
            )
        })
        .map(|node| node.id.clone())
}

/// Waits until `node_id`'s replica of `key` is ready (the node loaded it).
pub async fn wait_until_ready(
    raft: &RaftHandle,
    key: &ExpertKey,
    node_id: &str,
    timeout: Duration,
) -> CoordinatorResult<()> {
    let mut applied = raft.watch_applied();
    let deadline = Instant::now() + timeout;
    loop {
        let ready = {
            let state = applied.borrow_and_update();
            state
                .replicas
                .get(key)
                .and_then(|replicas| replicas.iter().find(|replica| replica.node == node_id))
                .map(|replica| replica.state == ReplicaState::Ready)
        };
        match ready {
            Some(true) => return Ok(()),
            None => {
                return Err(CoordinatorError::Rejected(format!(
                    "the replica of {key} on {node_id} disappeared while loading"
                )));
            }
            Some(false) => {}
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(CoordinatorError::Rejected(format!(
                "{node_id} did not load {key} within {timeout:?}"
            )));
        }
        if tokio::time::timeout(remaining, applied.changed())
            .await
            .is_ok_and(|changed| changed.is_err())
        {
            return Err(CoordinatorError::ShuttingDown);
        }
    }
}

/// Adds a replica and waits until it serves.
pub async fn add_replica(
    raft: &RaftHandle,
    request_id: &str,
    key: ExpertKey,
    node_id: &str,
) -> CoordinatorResult<u64> {
    let state = raft.read().await?;
    let existing = state
        .replicas
        .get(&key)
        .and_then(|replicas| replicas.iter().find(|replica| replica.node == node_id))
        .map(|replica| replica.state);
    if existing.is_none() {
        raft.propose_applied(
            format!("{request_id}/add"),
            Command::AddReplica {
                key: key.clone(),
                node: node_id.to_string(),
            },
        )
        .await?;
    }
    wait_until_ready(raft, &key, node_id, LOAD_TIMEOUT).await?;
    Ok(raft.applied_state().epoch)
}

/// Moves a replica from one node to another: add the new one, wait until
/// it serves, publish, drain the old one so routers leave it, give their
/// in-flight requests time to finish, then remove it.
pub async fn move_replica(
    raft: &RaftHandle,
    request_id: &str,
    key: ExpertKey,
    from_node: &str,
    to_node: &str,
    drain_grace: Duration,
) -> CoordinatorResult<u64> {
    if from_node == to_node {
        return Err(CoordinatorError::Rejected(
            "the source and destination nodes are the same".into(),
        ));
    }
    let state = raft.read().await?;
    let holds_source = state
        .replicas
        .get(&key)
        .is_some_and(|replicas| replicas.iter().any(|replica| replica.node == from_node));
    if !holds_source {
        return Err(CoordinatorError::Rejected(format!(
            "{from_node} holds no replica of {key}"
        )));
    }
    add_replica(raft, request_id, key.clone(), to_node).await?;
    let drain = Command::DrainReplica {
        key: key.clone(),
        node: from_node.to_string(),
    };
    raft.propose_applied(format!("{request_id}/drain"), drain)
        .await?;
    tokio::time::sleep(drain_grace).await;
    let remove = Command::RemoveReplica {
        key,
        node: from_node.to_string(),
    };
    raft.propose_applied(format!("{request_id}/remove"), remove)
        .await
}

/// Empties a node: no new replicas go to it, and each of its replicas
/// moves to another node through [`move_replica`]. Returns how many moved.
pub async fn drain_node(
    raft: &RaftHandle,
    node_id: &str,
    drain_grace: Duration,
) -> CoordinatorResult<u32> {
    let state = raft.read().await?;
    if !state.nodes.contains_key(node_id) {
        return Err(CoordinatorError::Rejected(format!(
            "unknown node {node_id:?}"
        )));
    }
    let command = Command::SetNodeStatus {
        node: node_id.to_string(),
        status: NodeStatus::Draining,
    };
    raft.propose_applied(format!("drain/{node_id}/{}", state.epoch), command)
        .await?;
    let mut moved = 0;
    loop {
        let state = raft.read().await?;
        let Some(key) = state
            .replicas
            .iter()
            .find(|(_, replicas)| replicas.iter().any(|replica| replica.node == node_id))
            .map(|(key, _)| key.clone())
        else {
            return Ok(moved);
        };
        let target = choose_target(&state, &key).ok_or_else(|| {
            CoordinatorError::Rejected(format!(
                "no other node can take {key}; {node_id} stays draining"
            ))
        })?;
        let request_id = format!(
            "drain/{node_id}/{}/{}/{}/{}",
            key.model, key.layer, key.expert, state.epoch
        );
        move_replica(raft, &request_id, key, node_id, &target, drain_grace).await?;
        moved += 1;
    }
}

/// Heartbeats and dead-node detection. Heartbeats are soft state: each
/// coordinator records those it receives (followers forward theirs to the
/// leader), and only the leader acts on silence.
pub struct Membership {
    raft: RaftHandle,
    last_heard: Mutex<HashMap<String, Instant>>,
    /// When routers last reported each node unreachable.
    suspected: Mutex<HashMap<String, Instant>>,
    dead_after: Duration,
}

impl Membership {
    pub fn new(raft: RaftHandle, dead_after: Duration) -> Arc<Self> {
        Arc::new(Self {
            raft,
            last_heard: Mutex::new(HashMap::new()),
            suspected: Mutex::new(HashMap::new()),
            dead_after,
        })
    }

    /// Records that a router could not reach `node_id`: if it has also
    /// been silent for half the usual time, it is declared dead then.
    pub fn suspect(&self, node_id: &str) {
        self.suspected
            .lock()
            .expect("suspicions")
            .insert(node_id.to_string(), Instant::now());
    }

    /// Records that `node_id` is alive.
    pub fn heard_from(&self, node_id: &str) {
        self.last_heard
            .lock()
            .expect("heartbeats")
            .insert(node_id.to_string(), Instant::now());
    }

    /// Runs forever: on the leader, marks silent nodes dead and re-places
    /// their replicas; revives dead nodes that speak again.
    pub async fn monitor_task(self: Arc<Self>) {
        let mut was_leader = false;
        let mut interval = tokio::time::interval(self.dead_after / 4);
        loop {
            interval.tick().await;
            let Ok(status) = self.raft.status().await else {
                return;
            };
            let is_leader = status.leader_id == Some(status.id);
            if is_leader && !was_leader {
                // A new leader has heard nobody yet: give every node a full period.
                let now = Instant::now();
                let mut last_heard = self.last_heard.lock().expect("heartbeats");
                for node in self.raft.applied_state().nodes.keys() {
                    last_heard.insert(node.clone(), now);
                }
            }
            was_leader = is_leader;
            if is_leader && let Err(error) = self.check_nodes().await {
                tracing::warn!(%error, "membership check failed; retrying");
            }
        }
    }

    async fn check_nodes(&self) -> CoordinatorResult<()> {
        let state = self.raft.applied_state();
        let now = Instant::now();
        let (silent, revived): (Vec<String>, Vec<String>) = {
            let mut last_heard = self.last_heard.lock().expect("heartbeats");
            // A node this leader has never heard of gets a full period from now.
            for node in state.nodes.keys() {
                last_heard.entry(node.clone()).or_insert(now);
            }
            let suspected = self.suspected.lock().expect("suspicions");
            let heard_recently = |id: &str| {
                // A node a router could not reach gets half the silence.
                let limit = match suspected.get(id) {
                    Some(at) if now.duration_since(*at) < self.dead_after => self.dead_after / 2,
                    _ => self.dead_after,
                };
                last_heard
                    .get(id)
                    .is_some_and(|at| now.duration_since(*at) < limit)
            };
            (
                state
                    .nodes
                    .values()
                    .filter(|n| n.status == NodeStatus::Ready && !heard_recently(&n.id))
                    .map(|n| n.id.clone())
                    .collect(),
                state
                    .nodes
                    .values()
                    .filter(|n| n.status == NodeStatus::Dead && heard_recently(&n.id))
                    .map(|n| n.id.clone())
                    .collect(),
            )
        };
        for node_id in revived {
            tracing::info!(node = %node_id, "expert node is back");
            let command = Command::SetNodeStatus {
                node: node_id.clone(),
                status: NodeStatus::Ready,
            };
            self.raft
                .propose_applied(format!("revive/{node_id}/{}", state.epoch), command)
                .await?;
        }
        for node_id in silent {
            tracing::warn!(node = %node_id, silent_for = ?self.dead_after, "expert node is dead; re-placing its experts");
            let command = Command::SetNodeStatus {
                node: node_id.clone(),
                status: NodeStatus::Dead,
            };
            self.raft
                .propose_applied(format!("dead/{node_id}/{}", state.epoch), command)
                .await?;
        }
        // Also retries replicas that found no new home in an earlier round.
        let state = self.raft.applied_state();
        for dead in state
            .nodes
            .values()
            .filter(|node| node.status == NodeStatus::Dead)
        {
            self.replace_replicas_of(&dead.id).await?;
        }
        Ok(())
    }

    /// Gives every replica of a dead node a new home and forgets the old one.
    async fn replace_replicas_of(&self, dead: &str) -> CoordinatorResult<()> {
        let state = self.raft.applied_state();
        let keys: Vec<ExpertKey> = state
            .replicas
            .iter()
            .filter(|(_, replicas)| replicas.iter().any(|replica| replica.node == dead))
            .map(|(key, _)| key.clone())
            .collect();
        for key in keys {
            let state = self.raft.applied_state();
            let tag = format!(
                "replace/{dead}/{}/{}/{}/{}",
                key.model, key.layer, key.expert, state.epoch
            );
            let Some(target) = choose_target(&state, &key) else {
                tracing::warn!(
                    %key,
                    "no live node can take this expert; retrying when one can"
                );
                continue;
            };
            let add = Command::AddReplica {
                key: key.clone(),
                node: target.clone(),
            };
            self.raft.propose_applied(format!("{tag}/add"), add).await?;
            tracing::info!(%key, from = dead, to = %target, "re-placing an expert of a dead node");
            // The dead node serves nothing; forget its replica now rather than after the load.
            let remove = Command::RemoveReplica {
                key,
                node: dead.to_string(),
            };
            self.raft
                .propose_applied(format!("{tag}/remove"), remove)
                .await?;
        }
        Ok(())
    }
}
