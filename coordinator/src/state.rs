//! The replicated state machine: expert nodes, models and the placement.
//!
//! Every change is a [`Command`] in the Raft log; every coordinator applies
//! the same commands in the same order and reaches the same state. Commands
//! carry a request id: a command whose id was already applied is answered
//! with its first outcome instead of being applied again, so a client may
//! retry a proposal whose outcome it did not learn without doing it twice.
//!
//! Replicas of one expert keep one compute format (the device kind and the
//! weight format of the nodes holding them, [`NodeRecord::compute_format`]),
//! so that a token's output does not depend on the replica that served it:
//! a command that would mix formats is refused.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

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
    /// How the node keeps expert weights: `f32` or `bf16`. Empty in logs
    /// and snapshots written before nodes reported it: the default of the
    /// device kind (see [`NodeRecord::compute_format`]).
    #[serde(default)]
    pub weight_format: String,
    pub status: NodeStatus,
}

impl NodeRecord {
    /// What a replica on this node computes with: the device kind (`cpu`,
    /// `cuda`) and the weight format, as in `cpu/f32`. A node recorded
    /// before nodes reported their weight format keeps its device's
    /// default: f32 on a CPU, bf16 on a GPU.
    pub fn compute_format(&self) -> String {
        let kind = self.device.split(':').next().unwrap_or_default();
        let weights = match (self.weight_format.as_str(), kind) {
            ("", "cpu") => "f32",
            ("", _) => "bf16",
            (format, _) => format,
        };
        format!("{kind}/{weights}")
    }
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
    /// Removes a replica only if it is still draining (it may have been
    /// put back to ready since); publishes a new epoch.
    RemoveDrainedReplica { key: ExpertKey, node: String },
    /// Starts many new replicas at once, all or none (a model being placed).
    AddReplicas { replicas: Vec<(ExpertKey, String)> },
    /// Records experts a node already serves as ready replicas, all at
    /// once (a node joining with experts loaded); publishes one epoch.
    /// Experts served elsewhere in another compute format are left out.
    AddServingReplicas { node: String, keys: Vec<ExpertKey> },
    /// Brings a (re-)registered node's replicas in line with what it now
    /// is: ready replicas it does not `serving` go back to loading (it
    /// restarted without them; routers leave them until it loads them and
    /// reports them ready again), and replicas of experts served elsewhere
    /// in another compute format (it came back in a new one) are removed.
    /// Publishes one epoch if anything changed.
    ReconcileNodeReplicas {
        node: String,
        serving: Vec<ExpertKey>,
    },
    /// Puts a draining replica back to ready: its move was abandoned and
    /// the expert has no other ready replica; publishes a new epoch.
    RestoreReplica { key: ExpertKey, node: String },
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
            Command::RemoveDrainedReplica { key, node } => self.remove_drained_replica(&key, &node),
            Command::AddReplicas { replicas } => self.add_replicas(replicas),
            Command::AddServingReplicas { node, keys } => self.add_serving_replicas(&node, keys),
            Command::ReconcileNodeReplicas { node, serving } => {
                self.reconcile_node_replicas(&node, &serving)
            }
            Command::RestoreReplica { key, node } => self.restore_replica(&key, &node),
        }
    }

    /// The compute format `key` is served in, and a node serving it: that
    /// of its replicas on live nodes other than `except`; None when it has
    /// none.
    pub fn serving_format(&self, key: &ExpertKey, except: &str) -> Option<(String, String)> {
        self.replicas
            .get(key)?
            .iter()
            .filter(|replica| replica.node != except)
            .filter_map(|replica| self.nodes.get(&replica.node))
            .find(|node| node.status != NodeStatus::Dead)
            .map(|node| (node.compute_format(), node.id.clone()))
    }

    /// Refuses a replica of `key` on `node` in another compute format than
    /// the expert's other replicas.
    fn check_format(&self, key: &ExpertKey, node: &NodeRecord) -> Result<(), String> {
        let format = node.compute_format();
        match self.serving_format(key, &node.id) {
            Some((served, holder)) if served != format => Err(format!(
                "node {} computes in {format}, but {key} is served in {served} (on {holder}); \
                 replicas of one expert keep one format so that a token's output does not \
                 depend on the replica",
                node.id
            )),
            _ => Ok(()),
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
        let record = self
            .nodes
            .get(&node)
            .ok_or_else(|| format!("unknown node {node:?}"))?;
        if !matches!(record.status, NodeStatus::Ready | NodeStatus::Joining) {
            return Err(format!(
                "node {node} is {:?} and takes no new replicas",
                record.status
            ));
        }
        self.check_format(&key, record)?;
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
        self.take_replica(key, node)?;
        self.epoch += 1;
        Ok(())
    }

    fn remove_drained_replica(&mut self, key: &ExpertKey, node: &str) -> Result<(), String> {
        let state = self.replica_mut(key, node)?.state;
        if state != ReplicaState::Draining {
            return Err(format!(
                "replica of {key} on {node} is {state:?}, not draining; it stays"
            ));
        }
        self.remove_replica(key, node)
    }

    /// Removes a replica without publishing an epoch.
    fn take_replica(&mut self, key: &ExpertKey, node: &str) -> Result<(), String> {
        self.replica_mut(key, node)?;
        let replicas = self.replicas.get_mut(key).expect("checked above");
        replicas.retain(|replica| replica.node != node);
        if replicas.is_empty() {
            self.replicas.remove(key);
        }
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
        let record = self
            .nodes
            .get(node)
            .ok_or_else(|| format!("unknown node {node:?}"))?
            .clone();
        for key in &keys {
            self.check_expert(key)?;
        }
        let mut changed = false;
        for key in keys {
            if self.check_format(&key, &record).is_err() {
                continue;
            }
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

    fn reconcile_node_replicas(&mut self, node: &str, serving: &[ExpertKey]) -> Result<(), String> {
        let serving: BTreeSet<&ExpertKey> = serving.iter().collect();
        let record = self
            .nodes
            .get(node)
            .ok_or_else(|| format!("unknown node {node:?}"))?
            .clone();
        let held: Vec<ExpertKey> = self
            .replicas
            .iter()
            .filter(|(_, replicas)| replicas.iter().any(|replica| replica.node == node))
            .map(|(key, _)| key.clone())
            .collect();
        let mut changed = false;
        for key in held {
            if self.check_format(&key, &record).is_err() {
                self.take_replica(&key, node)?;
                changed = true;
                continue;
            }
            let replica = self.replica_mut(&key, node)?;
            if replica.state == ReplicaState::Ready && !serving.contains(&key) {
                replica.state = ReplicaState::Loading;
                changed = true;
            }
        }
        if changed {
            self.epoch += 1;
        }
        Ok(())
    }

    fn restore_replica(&mut self, key: &ExpertKey, node: &str) -> Result<(), String> {
        let replica = self.replica_mut(key, node)?;
        if replica.state != ReplicaState::Draining {
            return Err(format!(
                "replica of {key} on {node} is {:?}, not draining",
                replica.state
            ));
        }
        replica.state = ReplicaState::Ready;
        self.epoch += 1;
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
            weight_format: String::new(),
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

    fn ready(state: &mut ClusterState, id: &str, expert: u32, node: &str) {
        let (key, node) = (key(expert), node.to_string());
        let add = Command::AddReplica {
            key: key.clone(),
            node: node.clone(),
        };
        assert!(matches!(
            propose(state, &format!("add-{expert}-{node}"), add),
            Outcome::Applied { .. }
        ));
        let ready = Command::ReplicaReady { key, node };
        assert!(matches!(propose(state, id, ready), Outcome::Applied { .. }));
    }

    fn replica_states(state: &ClusterState, node: &str) -> Vec<(u32, ReplicaState)> {
        state
            .replicas
            .iter()
            .filter_map(|(key, replicas)| {
                let replica = replicas.iter().find(|replica| replica.node == node)?;
                Some((key.expert, replica.state))
            })
            .collect()
    }

    #[test]
    fn a_node_restarted_without_its_experts_loads_them_again() {
        let mut state = cluster();
        ready(&mut state, "r0", 0, "a");
        ready(&mut state, "r1", 1, "a");
        ready(&mut state, "r1b", 1, "b");
        let epoch = state.epoch;
        // a comes back serving expert 1 only.
        propose(
            &mut state,
            "again",
            Command::RegisterNode { node: node("a") },
        );
        let reconcile = Command::ReconcileNodeReplicas {
            node: "a".into(),
            serving: vec![key(1)],
        };
        assert_eq!(
            propose(&mut state, "reconcile", reconcile.clone()),
            Outcome::Applied { epoch: epoch + 1 }
        );
        assert_eq!(
            replica_states(&state, "a"),
            vec![(0, ReplicaState::Loading), (1, ReplicaState::Ready)]
        );
        assert_eq!(replica_states(&state, "b"), vec![(1, ReplicaState::Ready)]);
        // Nothing more to do: no new epoch.
        propose(&mut state, "reconcile again", reconcile);
        assert_eq!(state.epoch, epoch + 1);
        // It loads expert 0 and reports it ready, as a new replica would.
        let ready_again = Command::ReplicaReady {
            key: key(0),
            node: "a".into(),
        };
        assert_eq!(
            propose(&mut state, "ready again", ready_again),
            Outcome::Applied { epoch: epoch + 2 }
        );
    }

    #[test]
    fn compute_formats_default_by_device() {
        let mut record = node("a");
        assert_eq!(record.compute_format(), "cpu/f32");
        record.device = "cuda:1".into();
        assert_eq!(record.compute_format(), "cuda/bf16");
        record.device = "cpu".into();
        record.weight_format = "bf16".into();
        assert_eq!(record.compute_format(), "cpu/bf16");
    }

    #[test]
    fn replicas_of_one_expert_keep_one_compute_format() {
        let mut state = cluster();
        let mut gpu = node("gpu");
        gpu.device = "cuda:0".into();
        propose(&mut state, "gpu", Command::RegisterNode { node: gpu });
        ready(&mut state, "r0", 0, "a");
        let Outcome::Rejected { reason } = propose(
            &mut state,
            "mixed",
            Command::AddReplica {
                key: key(0),
                node: "gpu".into(),
            },
        ) else {
            panic!("a replica in another format must be refused");
        };
        assert!(
            reason.contains(
                "node gpu computes in cuda/bf16, but m layer 1 expert 0 is served in cpu/f32 (on a)"
            ),
            "{reason}"
        );
        // The same format is fine; a dead holder no longer counts.
        ready(&mut state, "r0b", 0, "b");
        for holder in ["a", "b"] {
            let dead = Command::SetNodeStatus {
                node: holder.into(),
                status: NodeStatus::Dead,
            };
            propose(&mut state, &format!("dead-{holder}"), dead);
        }
        let add = Command::AddReplica {
            key: key(0),
            node: "gpu".into(),
        };
        assert!(matches!(
            propose(&mut state, "after", add),
            Outcome::Applied { .. }
        ));

        // A node joining with experts served elsewhere in another format
        // keeps only the others.
        let mut bf16 = node("c");
        bf16.weight_format = "bf16".into();
        propose(
            &mut state,
            "c",
            Command::RegisterNode { node: bf16.clone() },
        );
        ready(&mut state, "r1", 1, "c");
        let join = Command::AddServingReplicas {
            node: "gpu".into(),
            keys: vec![key(1), key(2)],
        };
        assert!(matches!(
            propose(&mut state, "join", join),
            Outcome::Applied { .. }
        ));
        assert_eq!(
            replica_states(&state, "gpu"),
            vec![(0, ReplicaState::Loading), (2, ReplicaState::Ready)]
        );

        // A node back in another format loses replicas served elsewhere in
        // its old one, and keeps those only it holds.
        let mut d = bf16.clone();
        d.id = "d".into();
        propose(&mut state, "d", Command::RegisterNode { node: d });
        ready(&mut state, "r1d", 1, "d");
        ready(&mut state, "r3", 3, "c");
        let mut c_as_f32 = bf16;
        c_as_f32.weight_format = "f32".into();
        propose(
            &mut state,
            "c-back",
            Command::RegisterNode { node: c_as_f32 },
        );
        let reconcile = Command::ReconcileNodeReplicas {
            node: "c".into(),
            serving: vec![],
        };
        propose(&mut state, "c-reconcile", reconcile);
        assert_eq!(
            replica_states(&state, "c"),
            vec![(3, ReplicaState::Loading)]
        );
        assert_eq!(replica_states(&state, "d"), vec![(1, ReplicaState::Ready)]);
    }

    #[test]
    fn only_a_draining_replica_is_restored_or_removed_as_drained() {
        let mut state = cluster();
        ready(&mut state, "r0", 0, "a");
        ready(&mut state, "r0b", 0, "b");
        let drain = Command::DrainReplica {
            key: key(0),
            node: "a".into(),
        };
        propose(&mut state, "drain", drain);
        let restore = Command::RestoreReplica {
            key: key(0),
            node: "a".into(),
        };
        assert!(matches!(
            propose(&mut state, "restore", restore),
            Outcome::Applied { .. }
        ));
        let remove = Command::RemoveDrainedReplica {
            key: key(0),
            node: "a".into(),
        };
        let Outcome::Rejected { reason } = propose(&mut state, "remove", remove) else {
            panic!("a replica serving again must stay");
        };
        assert!(reason.contains("is Ready, not draining"), "{reason}");
    }
}
