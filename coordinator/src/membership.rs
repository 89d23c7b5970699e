//! Liveness and placement changes that take several steps: heartbeats and
//! dead nodes (on the leader), and moving or adding replicas through the
//! protocol that never fails a request.
//!
//! A move drains the old replica and removes it after a grace period. The
//! end of a move outlives the call that started it, and should a move still
//! be cut short (its coordinator stops, the leader changes, a proposal times
//! out), the leader's monitor finishes it: a replica left draining for
//! twice the grace period is removed, or, when its expert has no other
//! ready replica left, put back to ready.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::metrics::{CoordinatorMetrics, MoveOutcome};
use crate::node::RaftHandle;
use crate::state::{ClusterState, Command, ExpertKey, NodeRecord, NodeStatus, ReplicaState};
use crate::{CoordinatorError, CoordinatorResult};

/// How long routers get to leave a drained replica before it is removed.
pub const DRAIN_GRACE: Duration = Duration::from_secs(2);
/// How long a new replica may take to load before a move gives up.
pub const LOAD_TIMEOUT: Duration = Duration::from_secs(120);

/// Picks a live node for a new replica of `key`: one that does not hold it
/// and computes in the format the expert is served in, preferably in a
/// topology group its live replicas do not use, then the one holding the
/// fewest replicas, then the lowest id. An expert served nowhere live
/// prefers the format it had.
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
    let served_in = state.serving_format(key, "").map(|(format, _)| format);
    let had_format = replicas
        .iter()
        .find_map(|replica| state.nodes.get(&replica.node))
        .map(NodeRecord::compute_format);
    state
        .nodes
        .values()
        .filter(|node| node.status == NodeStatus::Ready)
        .filter(|node| !replicas.iter().any(|replica| replica.node == node.id))
        .filter(|node| {
            served_in
                .as_ref()
                .is_none_or(|format| *format == node.compute_format())
        })
        .min_by_key(|node| {
            (
                had_format
                    .as_ref()
                    .is_some_and(|format| *format != node.compute_format()),
                used_groups.contains(&node.group.as_str()),
                load.get(node.id.as_str()).copied().unwrap_or(0),
                node.id.clone(),
            )
        })
        .map(|node| node.id.clone())
}

/// Whether `key` has a ready replica on a ready node other than `node`.
fn has_other_ready_replica(state: &ClusterState, key: &ExpertKey, node: &str) -> bool {
    state.replicas.get(key).is_some_and(|replicas| {
        replicas.iter().any(|replica| {
            replica.node != node
                && replica.state == ReplicaState::Ready
                && state
                    .nodes
                    .get(&replica.node)
                    .is_some_and(|record| record.status == NodeStatus::Ready)
        })
    })
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
/// in-flight requests time to finish, then remove it. Once the new replica
/// serves, the rest runs to the end even if the caller goes away, and the
/// move is counted in `metrics` when it ends.
pub async fn move_replica(
    raft: &RaftHandle,
    metrics: &CoordinatorMetrics,
    request_id: &str,
    key: ExpertKey,
    from_node: &str,
    to_node: &str,
    drain_grace: Duration,
) -> CoordinatorResult<u64> {
    let added = add_for_move(raft, request_id, &key, from_node, to_node).await;
    if let Err(error) = added {
        metrics.count_move(MoveOutcome::Failed);
        return Err(error);
    }
    let (raft, metrics, request_id, from_node) = (
        raft.clone(),
        metrics.clone(),
        request_id.to_string(),
        from_node.to_string(),
    );
    let rest_of_move = tokio::spawn(async move {
        let removed = drain_and_remove(&raft, &request_id, key, &from_node, drain_grace).await;
        metrics.count_move(match removed {
            Ok(_) => MoveOutcome::Done,
            Err(_) => MoveOutcome::Failed,
        });
        removed
    });
    rest_of_move
        .await
        .map_err(|_| CoordinatorError::ShuttingDown)?
}

/// The first half of a move: checks it, adds the new replica and waits
/// until it serves.
async fn add_for_move(
    raft: &RaftHandle,
    request_id: &str,
    key: &ExpertKey,
    from_node: &str,
    to_node: &str,
) -> CoordinatorResult<u64> {
    if from_node == to_node {
        return Err(CoordinatorError::Rejected(
            "the source and destination nodes are the same".into(),
        ));
    }
    let state = raft.read().await?;
    let holds_source = state
        .replicas
        .get(key)
        .is_some_and(|replicas| replicas.iter().any(|replica| replica.node == from_node));
    if !holds_source {
        return Err(CoordinatorError::Rejected(format!(
            "{from_node} holds no replica of {key}"
        )));
    }
    add_replica(raft, request_id, key.clone(), to_node).await
}

/// The second half of a move: drains the old replica, gives routers the
/// grace to leave it, and removes it.
async fn drain_and_remove(
    raft: &RaftHandle,
    request_id: &str,
    key: ExpertKey,
    from_node: &str,
    drain_grace: Duration,
) -> CoordinatorResult<u64> {
    let drain = Command::DrainReplica {
        key: key.clone(),
        node: from_node.to_string(),
    };
    raft.propose_applied(format!("{request_id}/drain"), drain)
        .await?;
    tokio::time::sleep(drain_grace).await;
    remove_drained(raft, format!("{request_id}/remove"), key, from_node).await
}

/// Removes a drained replica; one already gone (the leader's monitor
/// finished an abandoned move first) counts as removed. Returns the epoch.
pub async fn remove_drained(
    raft: &RaftHandle,
    request_id: String,
    key: ExpertKey,
    node: &str,
) -> CoordinatorResult<u64> {
    let remove = Command::RemoveDrainedReplica {
        key: key.clone(),
        node: node.to_string(),
    };
    match raft.propose_applied(request_id, remove).await {
        Err(CoordinatorError::Rejected(reason)) => {
            let state = raft.applied_state();
            let gone = !state
                .replicas
                .get(&key)
                .is_some_and(|replicas| replicas.iter().any(|replica| replica.node == node));
            if gone {
                Ok(state.epoch)
            } else {
                Err(CoordinatorError::Rejected(reason))
            }
        }
        result => result,
    }
}

/// Empties a node: no new replicas go to it, and each of its replicas
/// moves to another node through [`move_replica`]. Returns how many moved.
pub async fn drain_node(
    raft: &RaftHandle,
    metrics: &CoordinatorMetrics,
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
        move_replica(
            raft,
            metrics,
            &request_id,
            key,
            node_id,
            &target,
            drain_grace,
        )
        .await?;
        moved += 1;
    }
}

/// Heartbeats and dead-node detection. Heartbeats are soft state: each
/// coordinator records those it receives (followers forward theirs to the
/// leader), and only the leader acts on silence.
pub struct Membership {
    raft: RaftHandle,
    /// When each registered node was last heard from.
    last_heard: Mutex<HashMap<String, Instant>>,
    /// When routers last reported each registered node unreachable.
    suspected: Mutex<HashMap<String, Instant>>,
    dead_after: Duration,
    /// How long a move's drained replica stays before it is removed.
    drain_grace: Duration,
    /// When this leader first saw each replica draining, to finish moves
    /// cut short.
    draining_since: Mutex<HashMap<(ExpertKey, String), Instant>>,
    /// Counts the moves cut short that this leader finishes.
    metrics: CoordinatorMetrics,
}

impl Membership {
    /// Membership with moves draining for [`DRAIN_GRACE`].
    pub fn new(raft: RaftHandle, dead_after: Duration) -> Arc<Self> {
        Self::with_drain_grace(raft, dead_after, DRAIN_GRACE, CoordinatorMetrics::default())
    }

    /// Membership with moves draining for `drain_grace`: a replica left
    /// draining for twice that is taken to belong to a move cut short.
    /// The moves it finishes are counted in `metrics`.
    pub fn with_drain_grace(
        raft: RaftHandle,
        dead_after: Duration,
        drain_grace: Duration,
        metrics: CoordinatorMetrics,
    ) -> Arc<Self> {
        Arc::new(Self {
            raft,
            last_heard: Mutex::new(HashMap::new()),
            suspected: Mutex::new(HashMap::new()),
            dead_after,
            drain_grace,
            draining_since: Mutex::new(HashMap::new()),
            metrics,
        })
    }

    /// Whether `node_id` is registered; what is heard of others is not
    /// kept, so that made-up ids cannot fill memory.
    fn is_registered(&self, node_id: &str) -> bool {
        self.raft.applied_state().nodes.contains_key(node_id)
    }

    /// Records that a router could not reach `node_id`: if it has also
    /// been silent for half the usual time, it is declared dead then.
    pub fn suspect(&self, node_id: &str) {
        if !self.is_registered(node_id) {
            return;
        }
        self.suspected
            .lock()
            .expect("suspicions")
            .insert(node_id.to_string(), Instant::now());
    }

    /// Records that `node_id` is alive. A node not registered yet gets a
    /// full period from when the leader first sees it registered.
    pub fn heard_from(&self, node_id: &str) {
        if !self.is_registered(node_id) {
            return;
        }
        self.last_heard
            .lock()
            .expect("heartbeats")
            .insert(node_id.to_string(), Instant::now());
    }

    /// Runs forever: on the leader, marks silent nodes dead and re-places
    /// their replicas; revives dead nodes that speak again; finishes moves
    /// cut short.
    pub async fn monitor_task(self: Arc<Self>) {
        let mut was_leader = false;
        let period = (self.dead_after / 4)
            .min(self.drain_grace)
            .max(Duration::from_millis(10));
        let mut interval = tokio::time::interval(period);
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
                // Nor seen any drain: each gets its full grace from now.
                self.draining_since.lock().expect("drains").clear();
            }
            was_leader = is_leader;
            if !is_leader {
                continue;
            }
            if let Err(error) = self.check_nodes().await {
                tracing::warn!(%error, "membership check failed; retrying");
            }
            if let Err(error) = self.finish_abandoned_drains().await {
                tracing::warn!(%error, "finishing abandoned moves failed; retrying");
            }
        }
    }

    /// Removes each replica left draining for twice the drain grace (its
    /// move was cut short), or puts it back to ready when its expert has
    /// no other ready replica. Replicas of dead nodes are re-placed instead.
    pub async fn finish_abandoned_drains(&self) -> CoordinatorResult<()> {
        let state = self.raft.applied_state();
        let now = Instant::now();
        let abandoned: Vec<(ExpertKey, String)> = {
            let mut draining_since = self.draining_since.lock().expect("drains");
            let draining: Vec<(ExpertKey, String)> = state
                .replicas
                .iter()
                .flat_map(|(key, replicas)| {
                    replicas
                        .iter()
                        .filter(|replica| replica.state == ReplicaState::Draining)
                        .filter(|replica| {
                            state
                                .nodes
                                .get(&replica.node)
                                .is_some_and(|node| node.status != NodeStatus::Dead)
                        })
                        .map(|replica| (key.clone(), replica.node.clone()))
                })
                .collect();
            draining_since.retain(|replica, _| draining.contains(replica));
            draining
                .into_iter()
                .filter(|replica| {
                    let since = *draining_since.entry(replica.clone()).or_insert(now);
                    now.duration_since(since) >= self.drain_grace * 2
                })
                .collect()
        };
        for (key, node) in abandoned {
            let tag = format!("abandoned/{key}/{node}/{}", state.epoch);
            if has_other_ready_replica(&state, &key, &node) {
                tracing::warn!(%key, %node, "removing a replica a cut-short move left draining");
                remove_drained(&self.raft, tag, key, &node).await?;
            } else {
                tracing::warn!(%key, %node, "a cut-short move left the only copy draining; it serves again");
                let restore = Command::RestoreReplica { key, node };
                self.raft.propose_applied(tag, restore).await?;
            }
            self.metrics.count_move(MoveOutcome::Abandoned);
        }
        Ok(())
    }

    async fn check_nodes(&self) -> CoordinatorResult<()> {
        let state = self.raft.applied_state();
        let now = Instant::now();
        let (silent, revived): (Vec<String>, Vec<String>) = {
            let mut last_heard = self.last_heard.lock().expect("heartbeats");
            // A node this leader has never heard of gets a full period from now.
            last_heard.retain(|node, _| state.nodes.contains_key(node));
            for node in state.nodes.keys() {
                last_heard.entry(node.clone()).or_insert(now);
            }
            let mut suspected = self.suspected.lock().expect("suspicions");
            suspected.retain(|node, _| state.nodes.contains_key(node));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{ModelRecord, Proposal};

    fn apply(state: &mut ClusterState, command: Command) {
        let request_id = format!("{}", state.applied_commands);
        state.apply(Proposal {
            request_id,
            command,
        });
    }

    #[test]
    fn a_new_home_computes_in_the_expert_s_format() {
        let mut state = ClusterState::default();
        let model = ModelRecord {
            id: "m".into(),
            checkpoint: "/models/m".into(),
            family: "mixtral".into(),
            moe_layers: vec![0],
            experts_per_layer: 2,
        };
        apply(&mut state, Command::AddModel { model });
        for (id, device, group) in [
            ("cpu-a", "cpu", "rack-1"),
            ("cpu-b", "cpu", "rack-1"),
            ("gpu-a", "cuda:0", "rack-2"),
        ] {
            let node = NodeRecord {
                id: id.into(),
                address: format!("http://{id}:1"),
                group: group.into(),
                device: device.into(),
                memory_bytes: 1 << 30,
                buffer_bytes: 0,
                weight_format: String::new(),
                status: NodeStatus::Ready,
            };
            apply(&mut state, Command::RegisterNode { node });
        }
        let key = ExpertKey {
            model: "m".into(),
            layer: 0,
            expert: 0,
        };
        let node = "cpu-a".to_string();
        apply(
            &mut state,
            Command::AddReplica {
                key: key.clone(),
                node: node.clone(),
            },
        );
        apply(
            &mut state,
            Command::ReplicaReady {
                key: key.clone(),
                node,
            },
        );
        // The GPU is in an unused rack and holds nothing, yet computes in bf16.
        assert_eq!(choose_target(&state, &key).as_deref(), Some("cpu-b"));
        let cpu_b = "cpu-b".to_string();
        apply(
            &mut state,
            Command::AddReplica {
                key: key.clone(),
                node: cpu_b,
            },
        );
        assert_eq!(choose_target(&state, &key), None);
        // Once its CPU holders are dead, the expert may move to the GPU.
        for holder in ["cpu-a", "cpu-b"] {
            let status = NodeStatus::Dead;
            apply(
                &mut state,
                Command::SetNodeStatus {
                    node: holder.into(),
                    status,
                },
            );
        }
        assert_eq!(choose_target(&state, &key).as_deref(), Some("gpu-a"));
    }
}
