//! Placement policy as plain functions over [`ClusterState`], callable
//! without a server: what a checkpoint describes, which model a request
//! means, which ready nodes get the first replicas of a model being loaded,
//! which replicas a joining node already serves, and the placement as it
//! goes on the wire ([`placement_snapshot`], [`node_info`]).
//!
//! Errors are [`PlacementError`]s; `error.rs` maps them to gRPC codes.

use std::collections::BTreeMap;
use std::path::Path;

use moemesh_core::model::config::ModelConfig;
use moemesh_core::model::placement::{
    ExpertToPlace, LayerExpert, NodeCapacity, initial_assignment,
};
use moemesh_proto::LayerExperts;
use moemesh_proto::v1::{ExpertPlacement, NodeInfo, PlacementSnapshot, ReplicaInfo};

use crate::state::{
    ClusterState, ExpertKey, ModelRecord, NodeRecord, NodeStatus, Replica, ReplicaState,
};

/// Why a placement question has no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    /// The checkpoint's config could not be read or understood.
    #[error("{0}")]
    UnreadableConfig(String),
    /// No model id was given and the checkpoint path names no directory.
    #[error("give a model id: the checkpoint path has no directory name")]
    NoModelId,
    /// A request about one expert named no model.
    #[error("model is required")]
    MissingModel,
    /// The request names a model that is not loaded.
    #[error("no model {requested:?}; loaded: {loaded:?}")]
    UnknownModel {
        requested: String,
        loaded: Vec<String>,
    },
    /// The request names no model and none is loaded.
    #[error("no model is loaded")]
    NoModelLoaded,
    /// The request names no model and several are loaded.
    #[error("several models are loaded ({0:?}); name one")]
    SeveralModels(Vec<String>),
    /// The ready nodes cannot take the replicas asked for.
    #[error("{0}")]
    NoRoom(String),
}

/// Bytes of one expert's weights in f32, as placement counts them.
pub fn expert_bytes(config: &ModelConfig, expert: u32) -> u64 {
    (3 * config.hidden_size * config.intermediate_size_of(expert) * size_of::<f32>()) as u64
}

/// A model read from its checkpoint: its config, and its record for the
/// cluster state.
#[derive(Debug, Clone)]
pub struct DescribedModel {
    pub config: ModelConfig,
    pub record: ModelRecord,
}

/// Reads a checkpoint's config and describes the model for the cluster
/// state; an empty `model` takes the checkpoint directory's name.
pub fn describe_model(model: String, checkpoint: &str) -> Result<DescribedModel, PlacementError> {
    let config = ModelConfig::from_dir(Path::new(checkpoint))
        .map_err(|error| PlacementError::UnreadableConfig(error.to_string()))?;
    let model = if model.is_empty() {
        Path::new(checkpoint)
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .ok_or(PlacementError::NoModelId)?
    } else {
        model
    };
    let record = ModelRecord {
        id: model,
        checkpoint: checkpoint.to_string(),
        family: config.family.to_string(),
        moe_layers: config.moe_layers(),
        experts_per_layer: config.experts_per_layer(),
    };
    Ok(DescribedModel { config, record })
}

/// The model `requested` names; empty names the only model loaded.
pub fn resolve_model(state: &ClusterState, requested: &str) -> Result<String, PlacementError> {
    let loaded: Vec<String> = state.models.keys().cloned().collect();
    if !requested.is_empty() {
        return if state.models.contains_key(requested) {
            Ok(requested.to_string())
        } else {
            Err(PlacementError::UnknownModel {
                requested: requested.to_string(),
                loaded,
            })
        };
    }
    match <[String; 1]>::try_from(loaded) {
        Ok([only]) => Ok(only),
        Err(loaded) if loaded.is_empty() => Err(PlacementError::NoModelLoaded),
        Err(several) => Err(PlacementError::SeveralModels(several)),
    }
}

/// The expert a request names; the model must be given.
pub fn expert_key(model: String, layer: u32, expert: u32) -> Result<ExpertKey, PlacementError> {
    if model.is_empty() {
        return Err(PlacementError::MissingModel);
    }
    Ok(ExpertKey {
        model,
        layer: layer as usize,
        expert,
    })
}

/// The first replicas of `model`: `replicas_per_expert` (at least one) on
/// distinct ready nodes for every expert that has none yet, as
/// `moemesh_core`'s initial assignment spreads them over groups, memory
/// and buffers. All replicas of an expert go to nodes of one compute
/// format ([`NodeRecord::compute_format`]); with several formats among the
/// ready nodes, experts are shared out between them in proportion to their
/// memory.
pub fn initial_replicas(
    state: &ClusterState,
    config: &ModelConfig,
    model: &str,
    replicas_per_expert: usize,
) -> Result<Vec<(ExpertKey, String)>, PlacementError> {
    let replicas_per_expert = replicas_per_expert.max(1);
    let mut formats: BTreeMap<String, Vec<NodeCapacity>> = BTreeMap::new();
    for node in state.nodes.values() {
        if node.status == NodeStatus::Ready {
            formats
                .entry(node.compute_format())
                .or_default()
                .push(NodeCapacity {
                    id: node.id.clone(),
                    group: node.group.clone(),
                    memory_bytes: node.memory_bytes,
                    buffer_bytes: node.buffer_bytes,
                });
        }
    }
    let key = |layer: usize, expert: u32| ExpertKey {
        model: model.to_string(),
        layer,
        expert,
    };
    let mut experts = Vec::new();
    for layer in config.moe_layers() {
        for expert in 0..config.experts_per_layer() as u32 {
            let placed = state
                .replicas
                .get(&key(layer, expert))
                .is_some_and(|replicas| !replicas.is_empty());
            if !placed {
                experts.push(ExpertToPlace {
                    expert: LayerExpert { layer, expert },
                    bytes: expert_bytes(config, expert),
                });
            }
        }
    }
    let mut placed = Vec::new();
    for (nodes, experts) in share_out_by_format(formats, experts, replicas_per_expert) {
        let assignment = initial_assignment(&nodes, &experts, replicas_per_expert)
            .map_err(PlacementError::NoRoom)?;
        placed.extend(assignment.into_iter().map(|replica| {
            let LayerExpert { layer, expert } = replica.expert;
            (key(layer, expert), nodes[replica.node].id.clone())
        }));
    }
    Ok(placed)
}

/// One compute format's ready nodes and the experts given to them.
struct FormatShare {
    nodes: Vec<NodeCapacity>,
    experts: Vec<ExpertToPlace>,
    /// Bytes of the experts given to them, replicas counted.
    given_bytes: f64,
    /// Their memory and buffer bytes.
    capacity_bytes: f64,
}

/// Gives each expert to one compute format's nodes: the one whose memory
/// and buffer it fills least, among those with enough nodes for its
/// replicas (every format when none has). Returns each format's nodes with
/// their experts; a single format takes every expert.
fn share_out_by_format(
    formats: BTreeMap<String, Vec<NodeCapacity>>,
    experts: Vec<ExpertToPlace>,
    replicas: usize,
) -> Vec<(Vec<NodeCapacity>, Vec<ExpertToPlace>)> {
    let mut shares: Vec<FormatShare> = formats
        .into_values()
        .map(|nodes| {
            let capacity = nodes
                .iter()
                .map(|node| node.memory_bytes.saturating_add(node.buffer_bytes))
                .fold(0u64, u64::saturating_add);
            FormatShare {
                nodes,
                experts: Vec::new(),
                given_bytes: 0.0,
                capacity_bytes: capacity.max(1) as f64,
            }
        })
        .collect();
    if shares.len() <= 1 {
        // No ready node at all: the assignment says so.
        let nodes = shares.pop().map(|share| share.nodes).unwrap_or_default();
        return vec![(nodes, experts)];
    }
    let enough_nodes_somewhere = shares.iter().any(|share| share.nodes.len() >= replicas);
    for expert in experts {
        let bytes = expert.bytes as f64 * replicas as f64;
        let fill = |share: &FormatShare| (share.given_bytes + bytes) / share.capacity_bytes;
        let chosen = shares
            .iter_mut()
            .filter(|share| !enough_nodes_somewhere || share.nodes.len() >= replicas)
            .min_by(|a, b| fill(a).total_cmp(&fill(b)))
            .expect("at least two formats");
        chosen.experts.push(expert);
        chosen.given_bytes += bytes;
    }
    shares
        .into_iter()
        .filter(|share| !share.experts.is_empty())
        .map(|share| (share.nodes, share.experts))
        .collect()
}

/// The experts of `model` that a joining node says it serves already.
pub fn serving_keys(model: &str, serving: Vec<LayerExperts>) -> Vec<ExpertKey> {
    serving
        .into_iter()
        .flat_map(|layer| {
            layer.experts.into_iter().map(move |expert| ExpertKey {
                model: model.to_string(),
                layer: layer.layer as usize,
                expert,
            })
        })
        .collect()
}

fn node_status_to_proto(status: NodeStatus) -> moemesh_proto::NodeStatus {
    match status {
        NodeStatus::Joining => moemesh_proto::NodeStatus::Joining,
        NodeStatus::Ready => moemesh_proto::NodeStatus::Ready,
        NodeStatus::Draining => moemesh_proto::NodeStatus::Draining,
        NodeStatus::Dead => moemesh_proto::NodeStatus::Dead,
    }
}

fn replica_state_to_proto(state: ReplicaState) -> moemesh_proto::ReplicaState {
    match state {
        ReplicaState::Loading => moemesh_proto::ReplicaState::Loading,
        ReplicaState::Ready => moemesh_proto::ReplicaState::Ready,
        ReplicaState::Draining => moemesh_proto::ReplicaState::Draining,
    }
}

/// An expert node as operators and routers see it.
pub fn node_info(node: &NodeRecord) -> NodeInfo {
    NodeInfo {
        id: node.id.clone(),
        address: node.address.clone(),
        group: node.group.clone(),
        device: node.device.clone(),
        memory_bytes: node.memory_bytes,
        buffer_bytes: node.buffer_bytes,
        weight_format: node.weight_format.clone(),
        status: node_status_to_proto(node.status).into(),
    }
}

/// One expert's replicas on the wire.
pub fn expert_placement(key: &ExpertKey, replicas: &[Replica]) -> ExpertPlacement {
    ExpertPlacement {
        model: key.model.clone(),
        layer: key.layer as u32,
        expert: key.expert,
        replicas: replicas
            .iter()
            .map(|replica| ReplicaInfo {
                node: replica.node.clone(),
                state: replica_state_to_proto(replica.state).into(),
            })
            .collect(),
    }
}

/// The placement of `model` (all models when empty), of one `layer` when
/// given, with every node.
pub fn placement_snapshot(
    state: &ClusterState,
    model: &str,
    layer: Option<usize>,
) -> PlacementSnapshot {
    let experts = state
        .replicas
        .iter()
        .filter(|(key, _)| model.is_empty() || key.model == model)
        .filter(|(key, _)| layer.is_none_or(|layer| key.layer == layer))
        .map(|(key, replicas)| expert_placement(key, replicas))
        .collect();
    PlacementSnapshot {
        epoch: state.epoch,
        nodes: state.nodes.values().map(node_info).collect(),
        experts,
        revision: state.applied_commands,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Command, Proposal};

    fn mixtral(experts: usize) -> ModelConfig {
        ModelConfig::from_json(&format!(
            r#"{{"model_type":"mixtral","hidden_size":8,"num_hidden_layers":2,
                "intermediate_size":4,"num_local_experts":{experts},"num_experts_per_tok":2}}"#
        ))
        .expect("a valid mixtral config")
    }

    fn apply(state: &mut ClusterState, id: &str, command: Command) {
        state.apply(Proposal {
            request_id: id.into(),
            command,
        });
    }

    fn node(id: &str, group: &str, status: NodeStatus) -> NodeRecord {
        NodeRecord {
            id: id.into(),
            address: format!("http://{id}:1"),
            group: group.into(),
            device: "cpu".into(),
            memory_bytes: 1 << 30,
            buffer_bytes: 0,
            weight_format: String::new(),
            status,
        }
    }

    fn model_record(id: &str, config: &ModelConfig) -> ModelRecord {
        ModelRecord {
            id: id.into(),
            checkpoint: format!("/models/{id}"),
            family: config.family.to_string(),
            moe_layers: config.moe_layers(),
            experts_per_layer: config.experts_per_layer(),
        }
    }

    #[test]
    fn an_empty_model_name_means_the_only_model_loaded() {
        let config = mixtral(2);
        let mut state = ClusterState::default();
        assert_eq!(
            resolve_model(&state, ""),
            Err(PlacementError::NoModelLoaded)
        );
        let model = model_record("a", &config);
        apply(&mut state, "a", Command::AddModel { model });
        assert_eq!(resolve_model(&state, "").as_deref(), Ok("a"));
        let model = model_record("b", &config);
        apply(&mut state, "b", Command::AddModel { model });
        let several = resolve_model(&state, "").unwrap_err();
        assert_eq!(
            several.to_string(),
            r#"several models are loaded (["a", "b"]); name one"#
        );
        assert_eq!(resolve_model(&state, "b").as_deref(), Ok("b"));
        let unknown = resolve_model(&state, "c").unwrap_err();
        assert_eq!(unknown.to_string(), r#"no model "c"; loaded: ["a", "b"]"#);
    }

    #[test]
    fn first_replicas_go_to_ready_nodes_and_skip_placed_experts() {
        let config = mixtral(4);
        let mut state = ClusterState::default();
        for (id, group, status) in [
            ("a", "rack-1", NodeStatus::Ready),
            ("b", "rack-2", NodeStatus::Ready),
            ("c", "rack-3", NodeStatus::Dead),
        ] {
            let node = node(id, group, status);
            apply(&mut state, id, Command::RegisterNode { node });
        }
        let model = model_record("m", &config);
        apply(&mut state, "m", Command::AddModel { model });
        let replicas = initial_replicas(&state, &config, "m", 2).unwrap();
        let experts = config.moe_layers().len() * config.experts_per_layer();
        assert_eq!(replicas.len(), 2 * experts, "two replicas of every expert");
        assert!(replicas.iter().all(|(_, node)| node != "c"), "no dead node");

        let placed = ExpertKey {
            model: "m".into(),
            layer: config.moe_layers()[0],
            expert: 0,
        };
        let add = Command::AddReplica {
            key: placed.clone(),
            node: "a".into(),
        };
        apply(&mut state, "placed", add);
        let replicas = initial_replicas(&state, &config, "m", 1).unwrap();
        assert_eq!(replicas.len(), experts - 1);
        assert!(replicas.iter().all(|(key, _)| key != &placed));

        let too_many = initial_replicas(&state, &config, "m", 3).unwrap_err();
        assert!(matches!(too_many, PlacementError::NoRoom(_)), "{too_many}");
    }

    #[test]
    fn the_snapshot_filters_by_model_and_layer() {
        let config = mixtral(2);
        let mut state = ClusterState::default();
        let node = node("a", "rack-1", NodeStatus::Ready);
        apply(&mut state, "a", Command::RegisterNode { node });
        let model = model_record("m", &config);
        apply(&mut state, "m", Command::AddModel { model });
        let keys = serving_keys(
            "m",
            vec![
                LayerExperts {
                    layer: 0,
                    experts: vec![0, 1],
                },
                LayerExperts {
                    layer: 1,
                    experts: vec![1],
                },
            ],
        );
        assert_eq!(keys.len(), 3);
        let serving = Command::AddServingReplicas {
            node: "a".into(),
            keys,
        };
        apply(&mut state, "serving", serving);
        assert_eq!(placement_snapshot(&state, "", None).experts.len(), 3);
        assert_eq!(placement_snapshot(&state, "m", Some(1)).experts.len(), 1);
        assert!(placement_snapshot(&state, "other", None).experts.is_empty());
        let snapshot = placement_snapshot(&state, "m", Some(1));
        assert_eq!(snapshot.epoch, state.epoch);
        assert_eq!(snapshot.nodes, vec![node_info(&state.nodes["a"])]);
        assert_eq!(
            snapshot.experts[0].replicas[0].state,
            i32::from(moemesh_proto::ReplicaState::Ready)
        );
    }

    #[test]
    fn first_replicas_of_an_expert_share_one_compute_format() {
        let config = mixtral(8);
        let mut state = ClusterState::default();
        for (id, device, weights) in [
            ("cpu-1", "cpu", "f32"),
            ("cpu-2", "cpu", "f32"),
            ("gpu-1", "cuda:0", ""),
            ("gpu-2", "cuda:1", "bf16"),
            ("half-1", "cpu", "bf16"),
        ] {
            let mut record = node(id, "rack", NodeStatus::Ready);
            record.device = device.into();
            record.weight_format = weights.into();
            apply(&mut state, id, Command::RegisterNode { node: record });
        }
        let model = model_record("m", &config);
        apply(&mut state, "m", Command::AddModel { model });
        let replicas = initial_replicas(&state, &config, "m", 2).unwrap();
        let experts = config.moe_layers().len() * config.experts_per_layer();
        assert_eq!(replicas.len(), 2 * experts);
        let mut formats_used = BTreeMap::new();
        for (key, node) in &replicas {
            let format = state.nodes[node].compute_format();
            let first = formats_used
                .entry(key.clone())
                .or_insert_with(|| format.clone());
            assert_eq!(*first, format, "{key} is placed in two formats");
        }
        let mut formats: Vec<&String> = formats_used.values().collect();
        formats.sort();
        formats.dedup();
        // The lone bf16 CPU node cannot hold two replicas of anything.
        assert_eq!(formats, vec!["cpu/f32", "cuda/bf16"]);
        // The batch applies: the state machine agrees.
        let add = Command::AddReplicas { replicas };
        let outcome = state.apply(Proposal {
            request_id: "place".into(),
            command: add,
        });
        assert!(
            matches!(outcome, crate::state::Outcome::Applied { .. }),
            "{outcome:?}"
        );
    }
}
