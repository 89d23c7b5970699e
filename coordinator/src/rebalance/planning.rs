//! The planner's view of one model: which ready nodes it may use, what
//! each holds of a layer, and how many experts each can hold and keep
//! resident, from their memory and buffer bytes and what they hold of
//! every model; and one layer's plan as replicas to add and drop.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use moemesh_core::model::config::ModelConfig;
use moemesh_core::model::placement::planner::{
    PlanError, PlanNode, PlanOptions, plan_layer, tiered_max_over_mean,
};
use moemesh_proto::v1::LayerLoad;

use super::{LayerOutcome, RebalanceOptions};
use crate::placement::expert_bytes;
use crate::state::{ClusterState, ExpertKey, NodeRecord, NodeStatus, ReplicaState};
use crate::{CoordinatorError, CoordinatorResult};

/// Bytes of weights each node holds now, over every model.
fn used_bytes(
    state: &ClusterState,
    configs: &BTreeMap<String, ModelConfig>,
) -> BTreeMap<String, u64> {
    let mut used = BTreeMap::new();
    for (key, replicas) in &state.replicas {
        let Some(config) = configs.get(&key.model) else {
            continue;
        };
        for replica in replicas {
            *used.entry(replica.node.clone()).or_default() += expert_bytes(config, key.expert);
        }
    }
    used
}

/// Tokens per expert of `layer` in the window, over `experts` experts;
/// None when the layer saw no traffic, so there is nothing to balance.
pub(super) fn window_loads(window: &[LayerLoad], layer: usize, experts: usize) -> Option<Vec<f64>> {
    let entry = window.iter().find(|entry| entry.layer as usize == layer)?;
    if !entry.tokens.iter().any(|&tokens| tokens > 0) {
        return None;
    }
    let mut loads: Vec<f64> = entry.tokens.iter().map(|&tokens| tokens as f64).collect();
    loads.resize(experts, 0.0);
    Some(loads)
}

/// Of a node's `slots` for one layer, those its `memory_bytes` keep
/// resident when it holds `capacity_bytes` in all: the same share of the
/// slots as of the bytes, since the node keeps its hottest experts of
/// every layer resident.
fn resident_share(slots: usize, memory_bytes: u64, capacity_bytes: u64) -> usize {
    if memory_bytes >= capacity_bytes {
        return slots;
    }
    (slots as u128 * memory_bytes as u128 / capacity_bytes as u128) as usize
}

/// The model being rebalanced and the ready nodes it may use.
pub(super) struct ModelPlanning<'a> {
    state: &'a ClusterState,
    model: &'a str,
    pub(super) config: ModelConfig,
    nodes: Vec<&'a NodeRecord>,
    /// Index of each ready node's topology group, as the planner counts them.
    groups: BTreeMap<&'a str, usize>,
    /// Bytes of weights each node holds, over every model.
    used: BTreeMap<String, u64>,
}

impl<'a> ModelPlanning<'a> {
    pub(super) fn new(state: &'a ClusterState, model: &'a str) -> CoordinatorResult<Self> {
        let record = state
            .models
            .get(model)
            .ok_or_else(|| CoordinatorError::Rejected(format!("no model {model:?}")))?;
        let config = ModelConfig::from_dir(Path::new(&record.checkpoint)).map_err(|error| {
            CoordinatorError::Rejected(format!(
                "cannot read {model}'s config at {}: {error}",
                record.checkpoint
            ))
        })?;
        let mut configs = BTreeMap::new();
        for (id, other) in &state.models {
            if let Ok(config) = ModelConfig::from_dir(Path::new(&other.checkpoint)) {
                configs.insert(id.clone(), config);
            }
        }
        configs.insert(model.to_string(), config.clone());
        let nodes: Vec<&NodeRecord> = state
            .nodes
            .values()
            .filter(|node| node.status == NodeStatus::Ready)
            .collect();
        if nodes.is_empty() {
            return Err(CoordinatorError::Rejected("no ready expert node".into()));
        }
        let groups = nodes
            .iter()
            .map(|node| node.group.as_str())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .enumerate()
            .map(|(index, group)| (group, index))
            .collect();
        Ok(Self {
            state,
            model,
            used: used_bytes(state, &configs),
            config,
            nodes,
            groups,
        })
    }

    /// Per ready node, the experts of `layer` it holds (loading or ready;
    /// draining ones are on their way out).
    fn held_experts(&self, layer: usize) -> Vec<Vec<u32>> {
        let experts = self.config.experts_per_layer() as u32;
        self.nodes
            .iter()
            .map(|node| {
                (0..experts)
                    .filter(|&expert| {
                        let key = ExpertKey {
                            model: self.model.to_string(),
                            layer,
                            expert,
                        };
                        self.state.replicas.get(&key).is_some_and(|replicas| {
                            replicas.iter().any(|replica| {
                                replica.node == node.id && replica.state != ReplicaState::Draining
                            })
                        })
                    })
                    .collect()
            })
            .collect()
    }

    /// The planner's view of each ready node. Slots: what the node holds of
    /// this layer now, plus its free memory and buffer shared out over the
    /// model's layers. Resident slots: the share of those its memory keeps
    /// resident, all of them on a node without a buffer.
    fn plan_nodes(&self, held: &[Vec<u32>]) -> Vec<PlanNode> {
        let typical_bytes = expert_bytes(&self.config, 0).max(1);
        let layers = self.config.moe_layers().len().max(1);
        self.nodes
            .iter()
            .zip(held)
            .map(|(node, held)| {
                let capacity = node.memory_bytes.saturating_add(node.buffer_bytes);
                let free = capacity.saturating_sub(self.used.get(&node.id).copied().unwrap_or(0));
                let slots = held.len() + (free / typical_bytes) as usize / layers;
                PlanNode {
                    slots,
                    resident_slots: resident_share(slots, node.memory_bytes, capacity),
                    group: self.groups[node.group.as_str()],
                }
            })
            .collect()
    }

    /// Plans one layer from its `loads`; None when the layer has no
    /// replicas. Each compute format's nodes are planned on their own,
    /// with the experts they serve, so that no expert gets replicas in two
    /// formats.
    pub(super) fn plan_layer(
        &self,
        layer: usize,
        loads: &[f64],
        options: &RebalanceOptions,
    ) -> Result<Option<LayerOutcome>, PlanError> {
        let held = self.held_experts(layer);
        if held.iter().map(Vec::len).sum::<usize>() == 0 {
            return Ok(None);
        }
        let experts = self.config.experts_per_layer();
        let mut options_for_layer = PlanOptions {
            threshold: options.threshold,
            routing_groups: self.config.group_limit.map(|limit| limit.groups),
            max_extra_replicas: Some((experts as f64 * options.redundant_fraction).ceil() as usize),
            buffered_load_factor: options.buffered_load_factor,
        };
        let plan_nodes = self.plan_nodes(&held);
        let formats = self.formats_of_layer(layer, &held);
        let (planned, before, after) = if formats.len() == 1 {
            let plan = plan_layer(loads, &plan_nodes, Some(&held), &options_for_layer)?;
            let before = plan.current_max_over_mean.unwrap_or(plan.max_over_mean);
            (plan.nodes, before, plan.max_over_mean)
        } else {
            // Routing groups span formats; each format plans its share alone.
            options_for_layer.routing_groups = None;
            let mut planned = vec![Vec::new(); held.len()];
            for (nodes, format_experts) in &formats {
                let part = plan_format(
                    loads,
                    &plan_nodes,
                    &held,
                    nodes,
                    format_experts,
                    &options_for_layer,
                )?;
                for (&node, experts) in nodes.iter().zip(part) {
                    planned[node] = experts;
                }
            }
            let factor = options.buffered_load_factor;
            let tiered = |assignment: &[Vec<u32>]| {
                tiered_max_over_mean(loads, &plan_nodes, assignment, factor)
            };
            let (before, after) = (tiered(&held), tiered(&planned));
            (planned, before, after)
        };
        let mut added = Vec::new();
        let mut removed = Vec::new();
        for ((node, now), planned) in self.nodes.iter().zip(&held).zip(&planned) {
            let now: BTreeSet<u32> = now.iter().copied().collect();
            let planned: BTreeSet<u32> = planned.iter().copied().collect();
            added.extend(
                planned
                    .difference(&now)
                    .map(|&expert| (node.id.clone(), expert)),
            );
            removed.extend(
                now.difference(&planned)
                    .map(|&expert| (node.id.clone(), expert)),
            );
        }
        Ok(Some(LayerOutcome {
            layer,
            before,
            after,
            added,
            removed,
        }))
    }

    /// The ready nodes of each compute format (by index) and the experts
    /// of `layer` that format serves: those its nodes hold; an expert no
    /// ready node holds goes to the format it is served in elsewhere, else
    /// to the format with the most nodes. Formats in a fixed order.
    fn formats_of_layer(&self, layer: usize, held: &[Vec<u32>]) -> Vec<(Vec<usize>, Vec<u32>)> {
        let mut formats: BTreeMap<String, (Vec<usize>, BTreeSet<u32>)> = BTreeMap::new();
        for (index, node) in self.nodes.iter().enumerate() {
            let entry = formats.entry(node.compute_format()).or_default();
            entry.0.push(index);
        }
        let mut format_of_expert: BTreeMap<u32, String> = BTreeMap::new();
        for (node, experts) in self.nodes.iter().zip(held) {
            for &expert in experts {
                format_of_expert
                    .entry(expert)
                    .or_insert_with(|| node.compute_format());
            }
        }
        let largest = formats
            .iter()
            .max_by_key(|(_, (nodes, _))| nodes.len())
            .map(|(format, _)| format.clone())
            .expect("planning has ready nodes");
        for expert in 0..self.config.experts_per_layer() as u32 {
            let format = format_of_expert.remove(&expert).unwrap_or_else(|| {
                let key = ExpertKey {
                    model: self.model.to_string(),
                    layer,
                    expert,
                };
                self.state
                    .serving_format(&key, "")
                    .map(|(format, _)| format)
                    .filter(|format| formats.contains_key(format))
                    .unwrap_or_else(|| largest.clone())
            });
            if let Some(entry) = formats.get_mut(&format) {
                entry.1.insert(expert);
            }
        }
        formats
            .into_values()
            .map(|(nodes, experts)| (nodes, experts.into_iter().collect()))
            .collect()
    }
}

/// Plans one compute format's share of a layer: its `nodes` (indexes into
/// `plan_nodes` and `held`) and `experts`, renumbered for the planner and
/// back. Returns each of those nodes' planned experts; a format without
/// experts keeps none.
fn plan_format(
    loads: &[f64],
    plan_nodes: &[PlanNode],
    held: &[Vec<u32>],
    nodes: &[usize],
    experts: &[u32],
    options: &PlanOptions,
) -> Result<Vec<Vec<u32>>, PlanError> {
    if experts.is_empty() {
        return Ok(vec![Vec::new(); nodes.len()]);
    }
    let local = |expert: u32| {
        experts
            .iter()
            .position(|&e| e == expert)
            .map(|index| index as u32)
    };
    let format_loads: Vec<f64> = experts
        .iter()
        .map(|&expert| loads.get(expert as usize).copied().unwrap_or(0.0))
        .collect();
    let format_nodes: Vec<PlanNode> = nodes.iter().map(|&node| plan_nodes[node]).collect();
    let format_held: Vec<Vec<u32>> = nodes
        .iter()
        .map(|&node| {
            held[node]
                .iter()
                .filter_map(|&expert| local(expert))
                .collect()
        })
        .collect();
    let plan = plan_layer(&format_loads, &format_nodes, Some(&format_held), options)?;
    Ok(plan
        .nodes
        .into_iter()
        .map(|locals| {
            locals
                .into_iter()
                .map(|index| experts[index as usize])
                .collect()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Command, ModelRecord, Proposal};

    /// One expert's bytes in the test model: 3 x 8 x 4 f32 weights.
    const EXPERT: u64 = 384;

    /// A one-layer Mixtral of 8 experts, its config in `dir`.
    fn mixtral(dir: &Path) -> ModelConfig {
        let config = r#"{"model_type":"mixtral","hidden_size":8,"num_hidden_layers":1,
            "intermediate_size":4,"num_local_experts":8,"num_experts_per_tok":2}"#;
        std::fs::write(dir.join("config.json"), config).unwrap();
        let config = ModelConfig::from_dir(dir).unwrap();
        assert_eq!(expert_bytes(&config, 0), EXPERT);
        config
    }

    fn apply(state: &mut ClusterState, command: Command) {
        let request_id = format!("{}", state.applied_commands);
        state.apply(Proposal {
            request_id,
            command,
        });
    }

    /// A cluster serving model `m` from `dir`: per node, its id, memory and
    /// buffer bytes, and the experts of layer 0 it holds.
    fn cluster(dir: &Path, nodes: &[(&str, u64, u64, &[u32])]) -> ClusterState {
        let config = mixtral(dir);
        let mut state = ClusterState::default();
        let model = ModelRecord {
            id: "m".into(),
            checkpoint: dir.to_string_lossy().into_owned(),
            family: config.family.to_string(),
            moe_layers: config.moe_layers(),
            experts_per_layer: config.experts_per_layer(),
        };
        apply(&mut state, Command::AddModel { model });
        for &(id, memory_bytes, buffer_bytes, held) in nodes {
            let node = NodeRecord {
                id: id.into(),
                address: format!("http://{id}:1"),
                group: "rack".into(),
                device: "cuda:0".into(),
                memory_bytes,
                buffer_bytes,
                weight_format: "bf16".into(),
                status: NodeStatus::Ready,
            };
            apply(&mut state, Command::RegisterNode { node });
            let keys = held
                .iter()
                .map(|&expert| ExpertKey {
                    model: "m".into(),
                    layer: 0,
                    expert,
                })
                .collect();
            let node = id.to_string();
            apply(&mut state, Command::AddServingReplicas { node, keys });
        }
        state
    }

    #[test]
    fn slots_hold_memory_and_buffer_and_only_memory_stays_resident() {
        let dir = tempfile::tempdir().unwrap();
        let state = cluster(
            dir.path(),
            &[
                ("big", 8 * EXPERT + EXPERT / 2, 0, &[]),
                ("cpu", 4 * EXPERT, 0, &[0, 1]),
                ("gpu", 2 * EXPERT, 6 * EXPERT, &[]),
            ],
        );
        let planning = ModelPlanning::new(&state, "m").unwrap();
        let held = planning.held_experts(0);
        let slots: Vec<(usize, usize)> = planning
            .plan_nodes(&held)
            .iter()
            .map(|node| (node.slots, node.resident_slots))
            .collect();
        // Without a buffer every slot is resident; the GPU node holds eight
        // experts, of which its memory keeps two resident.
        assert_eq!(slots, vec![(8, 8), (4, 4), (8, 2)]);
    }

    #[test]
    fn hot_experts_in_a_buffer_are_moved_to_resident_room() {
        let loads = [40.0, 35.0, 30.0, 25.0, 20.0, 15.0, 10.0, 5.0];
        // The same placement, balanced in tokens; on the second cluster the
        // GPU node keeps only two experts resident and buffers 20 + 15.
        let held: [(&str, u64, u64, &[u32]); 2] = [
            ("cpu", 4 * EXPERT, 0, &[0, 1, 6, 7]),
            ("gpu", 4 * EXPERT, 0, &[2, 3, 4, 5]),
        ];
        let dir = tempfile::tempdir().unwrap();
        let plan_layer_zero = |state: &ClusterState| {
            ModelPlanning::new(state, "m")
                .unwrap()
                .plan_layer(0, &loads, &RebalanceOptions::default())
                .unwrap()
                .unwrap()
        };
        let plan = plan_layer_zero(&cluster(dir.path(), &held));
        assert!(plan.added.is_empty() && plan.removed.is_empty(), "{plan:?}");

        let mut tiered_nodes = held;
        tiered_nodes[1].1 = 2 * EXPERT;
        tiered_nodes[1].2 = 2 * EXPERT;
        let plan = plan_layer_zero(&cluster(dir.path(), &tiered_nodes));
        assert!(plan.after < plan.before - 0.05, "{plan:?}");
        let gpu_drops: Vec<u32> = plan
            .removed
            .iter()
            .filter(|(node, _)| node == "gpu")
            .map(|&(_, expert)| expert)
            .collect();
        assert!(gpu_drops.contains(&4), "{plan:?}");
        // Swaps only: neither node has a free slot.
        assert_eq!(plan.added.len(), plan.removed.len());
    }

    #[test]
    fn each_compute_format_plans_its_own_experts() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = cluster(
            dir.path(),
            &[
                ("cpu-1", 2 * EXPERT, 0, &[0, 1]),
                ("cpu-2", 2 * EXPERT, 0, &[2, 3]),
                ("gpu-1", 8 * EXPERT, 0, &[4, 5]),
                ("gpu-2", 8 * EXPERT, 0, &[6, 7]),
            ],
        );
        for id in ["cpu-1", "cpu-2"] {
            let node = state.nodes.get_mut(id).unwrap();
            node.device = "cpu".into();
            node.weight_format = "f32".into();
        }
        // Expert 0 (on a full CPU) and expert 6 (on a GPU) are hot; only
        // the GPUs have room, which expert 0 must not take.
        let loads = [90.0, 5.0, 5.0, 5.0, 5.0, 5.0, 60.0, 5.0];
        let plan = ModelPlanning::new(&state, "m")
            .unwrap()
            .plan_layer(0, &loads, &RebalanceOptions::default())
            .unwrap()
            .unwrap();
        // The full CPU node stays the busiest; the GPUs still balance.
        assert!(plan.after <= plan.before, "{plan:?}");
        for (node, expert) in &plan.added {
            let expected = if *expert < 4 { "cpu/f32" } else { "cuda/bf16" };
            assert_eq!(
                state.nodes[node].compute_format(),
                expected,
                "expert {expert} planned onto {node}: {plan:?}"
            );
        }
        assert!(
            plan.added
                .iter()
                .any(|(node, expert)| (node.as_str(), *expert) == ("gpu-1", 6))
        );
    }
}
