//! The replicated state machine: expert nodes, models and the placement.
//!
//! Every change is a [`Command`] in the Raft log; every coordinator applies
//! the same commands in the same order and reaches the same state. Commands
//! carry a request id: a command whose id was already applied is answered
//! with its first outcome instead of being applied again, so a client may
//! retry a proposal whose outcome it did not learn without doing it twice.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

/// How many request ids are remembered for deduplication.
const REMEMBERED_REQUESTS: usize = 10_000;

/// Lifecycle of an expert node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeStatus {
    /// Registered, not yet given work.
    Joining,
    /// Serving.
    Ready,
    /// Being emptied on an operator's request; gets no new replicas.
    Draining,
    /// Silent for longer than the dead-node timeout.
    Dead,
}

/// An expert node as the cluster knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: String,
    /// ExpertService URL.
    pub address: String,
    /// Topology group (host, rack) for spreading replicas.
    pub group: String,
    /// For example `cpu` or `cuda:0`.
    pub device: String,
    /// Bytes of expert weights it keeps resident on its device.
    pub memory_bytes: u64,
    /// Bytes of the next tier where experts beyond `memory_bytes` wait
    /// (pinned host memory, the page cache); 0: none. Logs and snapshots
    /// written before nodes had a next tier lack it, hence the default.
    #[serde(default)]
    pub buffer_bytes: u64,
    pub status: NodeStatus,
}

/// A model the cluster serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRecord {
    pub id: String,
    /// Where every node finds the checkpoint.
    pub checkpoint: String,
    /// `model_type` of its config.
    pub family: String,
    pub moe_layers: Vec<usize>,
    /// Experts per MoE layer, shared expert included.
    pub experts_per_layer: usize,
}

/// Where a replica is in its life: loading, serving, or being drained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaState {
    Loading,
    Ready,
    Draining,
}

/// One copy of an expert on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    pub node: String,
    pub state: ReplicaState,
}

/// Identifies one expert of one layer of one model.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ExpertKey {
    pub model: String,
    pub layer: usize,
    pub expert: u32,
}

impl std::fmt::Display for ExpertKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} layer {} expert {}",
            self.model, self.layer, self.expert
        )
    }
}

/// A change to the cluster state; the payload of a Raft log entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// Adds a node or updates its address, group, device and memory tiers.
    RegisterNode { node: NodeRecord },
    /// Changes a node's status.
    SetNodeStatus { node: String, status: NodeStatus },
    /// Adds a model with no replicas yet.
    AddModel { model: ModelRecord },
    /// Starts a new replica in state `Loading` (not yet routed to).
    AddReplica { key: ExpertKey, node: String },
    /// Marks a loaded replica `Ready`; publishes a new epoch.
    ReplicaReady { key: ExpertKey, node: String },
    /// Marks a replica `Draining` (routers stop choosing it); publishes a new epoch.
    DrainReplica { key: ExpertKey, node: String },
    /// Removes a replica; publishes a new epoch.
    RemoveReplica { key: ExpertKey, node: String },
    /// Starts many new replicas at once, all or none (a model being placed).
    AddReplicas { replicas: Vec<(ExpertKey, String)> },
    /// Records experts a node already serves as ready replicas, all at
    /// once (a node joining with experts loaded); publishes one epoch.
    AddServingReplicas { node: String, keys: Vec<ExpertKey> },
}

/// A command with the id its client chose for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Proposal {
    pub request_id: String,
    pub command: Command,
}

/// What applying a command did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Applied; the placement epoch afterwards.
    Applied { epoch: u64 },
    /// Refused by the state machine, with the reason.
    Rejected { reason: String },
}

/// The replicated state of a cluster.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterState {
    pub nodes: BTreeMap<String, NodeRecord>,
    pub models: BTreeMap<String, ModelRecord>,
    /// Increases whenever the set of routable replicas changes.
    pub epoch: u64,
    /// Stored as a list of pairs: snapshots are JSON, whose keys are strings.
    #[serde(with = "replica_list")]
    pub replicas: BTreeMap<ExpertKey, Vec<Replica>>,
    /// Commands applied so far; a retry answered from memory does not count.
    pub applied_commands: u64,
    /// Outcomes of recent requests by id, for exactly-once retries.
    recent_requests: BTreeMap<String, Outcome>,
    /// The ids in `recent_requests`, oldest first.
    request_order: VecDeque<String>,
}

impl ClusterState {
    /// Applies one proposal, or returns the outcome it had the first time.
    pub fn apply(&mut self, proposal: Proposal) -> Outcome {
        if let Some(outcome) = self.recent_requests.get(&proposal.request_id) {
            return outcome.clone();
        }
        self.applied_commands += 1;
        let outcome = match self.apply_command(proposal.command) {
            Ok(()) => Outcome::Applied { epoch: self.epoch },
            Err(reason) => Outcome::Rejected { reason },
        };
        self.recent_requests
            .insert(proposal.request_id.clone(), outcome.clone());
        self.request_order.push_back(proposal.request_id);
        if self.request_order.len() > REMEMBERED_REQUESTS
            && let Some(oldest) = self.request_order.pop_front()
        {
            self.recent_requests.remove(&oldest);
        }
        outcome
    }

    fn replica_mut(&mut self, key: &ExpertKey, node: &str) -> Result<&mut Replica, String> {
        self.replicas
            .get_mut(key)
            .and_then(|replicas| replicas.iter_mut().find(|replica| replica.node == node))
            .ok_or_else(|| format!("node {node} has no replica of {key}"))
    }

    fn check_expert(&self, key: &ExpertKey) -> Result<(), String> {
        let model = self
            .models
            .get(&key.model)
            .ok_or_else(|| format!("unknown model {:?}", key.model))?;
        if !model.moe_layers.contains(&key.layer) {
            return Err(format!(
                "layer {} is not an MoE layer of {}",
                key.layer, key.model
            ));
        }
        if key.expert as usize >= model.experts_per_layer {
            return Err(format!(
                "expert {} does not exist in {} layer {}",
                key.expert, key.model, key.layer
            ));
        }
        Ok(())
    }

    /// Applies one command; each kind has its own method below.
    fn apply_command(&mut self, command: Command) -> Result<(), String> {
        match command {
            Command::RegisterNode { node } => self.register_node(node),
            Command::SetNodeStatus { node, status } => self.set_node_status(&node, status),
            Command::AddModel { model } => self.add_model(model),
            Command::AddReplica { key, node } => self.add_replica(key, node),
            Command::ReplicaReady { key, node } => self.mark_replica_ready(&key, &node),
            Command::DrainReplica { key, node } => self.drain_replica(&key, &node),
            Command::RemoveReplica { key, node } => self.remove_replica(&key, &node),
            Command::AddReplicas { replicas } => self.add_replicas(replicas),
            Command::AddServingReplicas { node, keys } => self.add_serving_replicas(&node, keys),
        }
    }

    // Nodes and models.

    fn register_node(&mut self, node: NodeRecord) -> Result<(), String> {
        if node.id.is_empty() {
            return Err("node id is empty".into());
        }
        self.nodes.insert(node.id.clone(), node);
        Ok(())
    }

    fn set_node_status(&mut self, node: &str, status: NodeStatus) -> Result<(), String> {
        let record = self
            .nodes
            .get_mut(node)
            .ok_or_else(|| format!("unknown node {node:?}"))?;
        if record.status != status {
            record.status = status;
            // Routers stop or resume using the node's replicas.
            self.epoch += 1;
        }
        Ok(())
    }

    fn add_model(&mut self, model: ModelRecord) -> Result<(), String> {
        if let Some(existing) = self.models.get(&model.id)
            && existing != &model
        {
            return Err(format!(
                "model {:?} is already loaded with a different checkpoint or shape",
                model.id
            ));
        }
        self.models.insert(model.id.clone(), model);
        Ok(())
    }

    // Replicas, through their life: added (loading), ready, draining, removed.

    fn add_replica(&mut self, key: ExpertKey, node: String) -> Result<(), String> {
        self.check_expert(&key)?;
        match self.nodes.get(&node).map(|record| record.status) {
            None => return Err(format!("unknown node {node:?}")),
            Some(NodeStatus::Ready | NodeStatus::Joining) => {}
            Some(status) => {
                return Err(format!(
                    "node {node} is {status:?} and takes no new replicas"
                ));
            }
        }
        let replicas = self.replicas.entry(key.clone()).or_default();
        if replicas.iter().any(|replica| replica.node == node) {
            return Err(format!("node {node} already holds {key}"));
        }
        replicas.push(Replica {
            node,
            state: ReplicaState::Loading,
        });
        Ok(())
    }

    fn mark_replica_ready(&mut self, key: &ExpertKey, node: &str) -> Result<(), String> {
        let replica = self.replica_mut(key, node)?;
        if replica.state != ReplicaState::Loading {
            return Err(format!(
                "replica of {key} on {node} is {:?}, not loading",
                replica.state
            ));
        }
        replica.state = ReplicaState::Ready;
        self.epoch += 1;
        Ok(())
    }

    fn drain_replica(&mut self, key: &ExpertKey, node: &str) -> Result<(), String> {
        let ready_elsewhere = self.replicas.get(key).is_some_and(|replicas| {
            replicas
                .iter()
                .any(|replica| replica.node != node && replica.state == ReplicaState::Ready)
        });
        if !ready_elsewhere {
            return Err(format!(
                "{key} has no other ready replica; draining {node} would leave it unserved"
            ));
        }
        self.replica_mut(key, node)?.state = ReplicaState::Draining;
        self.epoch += 1;
        Ok(())
    }

    fn remove_replica(&mut self, key: &ExpertKey, node: &str) -> Result<(), String> {
        self.replica_mut(key, node)?;
        let replicas = self.replicas.get_mut(key).expect("checked above");
        replicas.retain(|replica| replica.node != node);
        if replicas.is_empty() {
            self.replicas.remove(key);
        }
        self.epoch += 1;
        Ok(())
    }

    fn add_replicas(&mut self, replicas: Vec<(ExpertKey, String)>) -> Result<(), String> {
        // Check all first so that a refusal leaves nothing half done.
        let mut staged = self.clone();
        for (key, node) in replicas {
            staged.add_replica(key, node)?;
        }
        *self = staged;
        Ok(())
    }

    fn add_serving_replicas(&mut self, node: &str, keys: Vec<ExpertKey>) -> Result<(), String> {
        if !self.nodes.contains_key(node) {
            return Err(format!("unknown node {node:?}"));
        }
        for key in &keys {
            self.check_expert(key)?;
        }
        let mut changed = false;
        for key in keys {
            let replicas = self.replicas.entry(key).or_default();
            match replicas.iter_mut().find(|replica| replica.node == node) {
                Some(replica) if replica.state == ReplicaState::Ready => {}
                Some(replica) => {
                    replica.state = ReplicaState::Ready;
                    changed = true;
                }
                None => {
                    replicas.push(Replica {
                        node: node.to_string(),
                        state: ReplicaState::Ready,
                    });
                    changed = true;
                }
            }
        }
        if changed {
            self.epoch += 1;
        }
        Ok(())
    }
}

/// Serialises the replica map as a list of (key, replicas) pairs.
mod replica_list {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serializer};

    use super::{ExpertKey, Replica};

    pub fn serialize<S: Serializer>(
        map: &BTreeMap<ExpertKey, Vec<Replica>>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(map.iter())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<BTreeMap<ExpertKey, Vec<Replica>>, D::Error> {
        let pairs: Vec<(ExpertKey, Vec<Replica>)> = Vec::deserialize(deserializer)?;
        Ok(pairs.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn propose(state: &mut ClusterState, id: &str, command: Command) -> Outcome {
        state.apply(Proposal {
            request_id: id.into(),
            command,
        })
    }

    fn node(id: &str) -> NodeRecord {
        NodeRecord {
            id: id.into(),
            address: format!("http://{id}:1"),
            group: "rack-a".into(),
            device: "cpu".into(),
            memory_bytes: 1 << 30,
            buffer_bytes: 0,
            status: NodeStatus::Ready,
        }
    }

    fn key(expert: u32) -> ExpertKey {
        ExpertKey {
            model: "m".into(),
            layer: 1,
            expert,
        }
    }

    fn cluster() -> ClusterState {
        let mut state = ClusterState::default();
        propose(&mut state, "n1", Command::RegisterNode { node: node("a") });
        propose(&mut state, "n2", Command::RegisterNode { node: node("b") });
        let model = ModelRecord {
            id: "m".into(),
            checkpoint: "/models/m".into(),
            family: "mixtral".into(),
            moe_layers: vec![1],
            experts_per_layer: 4,
        };
        propose(&mut state, "m", Command::AddModel { model });
        state
    }

    #[test]
    fn a_move_publishes_epochs_only_when_routing_changes() {
        let mut state = cluster();
        propose(
            &mut state,
            "1",
            Command::AddReplica {
                key: key(0),
                node: "a".into(),
            },
        );
        assert_eq!(state.epoch, 0, "a loading replica is not routable yet");
        assert_eq!(
            propose(
                &mut state,
                "2",
                Command::ReplicaReady {
                    key: key(0),
                    node: "a".into()
                }
            ),
            Outcome::Applied { epoch: 1 }
        );
        // Move expert 0 from a to b: add, ready, drain, remove.
        propose(
            &mut state,
            "3",
            Command::AddReplica {
                key: key(0),
                node: "b".into(),
            },
        );
        propose(
            &mut state,
            "4",
            Command::ReplicaReady {
                key: key(0),
                node: "b".into(),
            },
        );
        propose(
            &mut state,
            "5",
            Command::DrainReplica {
                key: key(0),
                node: "a".into(),
            },
        );
        assert_eq!(
            propose(
                &mut state,
                "6",
                Command::RemoveReplica {
                    key: key(0),
                    node: "a".into()
                }
            ),
            Outcome::Applied { epoch: 4 }
        );
        assert_eq!(
            state.replicas[&key(0)],
            vec![Replica {
                node: "b".into(),
                state: ReplicaState::Ready
            }]
        );
    }

    #[test]
    fn the_state_round_trips_through_a_json_snapshot() {
        let mut state = cluster();
        propose(
            &mut state,
            "1",
            Command::AddReplica {
                key: key(0),
                node: "a".into(),
            },
        );
        propose(
            &mut state,
            "2",
            Command::ReplicaReady {
                key: key(0),
                node: "a".into(),
            },
        );
        let snapshot = serde_json::to_vec(&state).unwrap();
        let restored: ClusterState = serde_json::from_slice(&snapshot).unwrap();
        assert_eq!(restored, state);
        // Deduplication survives the snapshot too.
        let mut restored = restored;
        assert_eq!(
            propose(
                &mut restored,
                "2",
                Command::ReplicaReady {
                    key: key(0),
                    node: "a".into()
                }
            ),
            Outcome::Applied { epoch: 1 }
        );
    }

    #[test]
    fn nodes_recorded_before_buffers_existed_have_none() {
        let before_buffers = r#"{"id":"a","address":"http://a:1","group":"rack-a",
            "device":"cpu","memory_bytes":1073741824,"status":"ready"}"#;
        let record: NodeRecord = serde_json::from_str(before_buffers).unwrap();
        assert_eq!(record, node("a"));
        assert_eq!(record.buffer_bytes, 0);
    }

    #[test]
    fn placing_many_replicas_is_all_or_nothing() {
        let mut state = cluster();
        let good = vec![(key(0), "a".to_string()), (key(1), "b".to_string())];
        assert_eq!(
            propose(&mut state, "1", Command::AddReplicas { replicas: good }),
            Outcome::Applied { epoch: 0 }
        );
        assert_eq!(state.replicas.len(), 2);
        let partly_bad = vec![(key(2), "a".to_string()), (key(7), "a".to_string())];
        let Outcome::Rejected { reason } = propose(
            &mut state,
            "2",
            Command::AddReplicas {
                replicas: partly_bad,
            },
        ) else {
            panic!("an unknown expert must refuse the whole batch");
        };
        assert!(reason.contains("expert 7 does not exist"), "{reason}");
        assert!(
            !state.replicas.contains_key(&key(2)),
            "nothing of a refused batch is applied"
        );
    }

    #[test]
    fn a_repeated_request_id_is_answered_not_reapplied() {
        let mut state = cluster();
        propose(
            &mut state,
            "add",
            Command::AddReplica {
                key: key(1),
                node: "a".into(),
            },
        );
        let first = propose(
            &mut state,
            "ready",
            Command::ReplicaReady {
                key: key(1),
                node: "a".into(),
            },
        );
        let again = propose(
            &mut state,
            "ready",
            Command::ReplicaReady {
                key: key(1),
                node: "a".into(),
            },
        );
        assert_eq!(first, again);
        assert_eq!(state.epoch, 1);
    }

    #[test]
    fn unsafe_or_unknown_changes_are_rejected_with_a_reason() {
        let mut state = cluster();
        propose(
            &mut state,
            "1",
            Command::AddReplica {
                key: key(2),
                node: "a".into(),
            },
        );
        propose(
            &mut state,
            "2",
            Command::ReplicaReady {
                key: key(2),
                node: "a".into(),
            },
        );
        let Outcome::Rejected { reason } = propose(
            &mut state,
            "3",
            Command::DrainReplica {
                key: key(2),
                node: "a".into(),
            },
        ) else {
            panic!("draining the only replica must be refused");
        };
        assert!(reason.contains("no other ready replica"), "{reason}");
        let Outcome::Rejected { reason } = propose(
            &mut state,
            "4",
            Command::AddReplica {
                key: key(9),
                node: "a".into(),
            },
        ) else {
            panic!("an unknown expert must be refused");
        };
        assert!(reason.contains("expert 9 does not exist"), "{reason}");
        propose(
            &mut state,
            "5",
            Command::SetNodeStatus {
                node: "b".into(),
                status: NodeStatus::Dead,
            },
        );
        let Outcome::Rejected { reason } = propose(
            &mut state,
            "6",
            Command::AddReplica {
                key: key(2),
                node: "b".into(),
            },
        ) else {
            panic!("a dead node must get no replicas");
        };
        assert!(reason.contains("Dead"), "{reason}");
    }
}
