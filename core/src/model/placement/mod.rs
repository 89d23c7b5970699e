//! Which expert node holds which expert.
//!
//! A placement lists the expert nodes and, per MoE layer and expert, the
//! nodes holding a replica. It comes from a TOML placement file (for small
//! fixed deployments), is spread evenly by [`Placement::spread`], or is
//! assigned by the coordinators: first by memory and buffer with
//! [`initial_assignment`], then by load with the [`planner`].
//!
//! ```toml
//! model = "mixtral-8x7b"          # optional
//!
//! [[nodes]]
//! id = "expert-0"
//! address = "http://10.0.0.5:50061"
//!
//! [[layers]]
//! layer = 0
//! experts = [["expert-0"], ["expert-1", "expert-0"]]  # replicas of expert 0, 1, ...
//! shared = ["expert-1"]                               # the shared expert, if any
//! ```

pub mod planner;

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::model::config::ModelConfig;
use crate::{CoreError, CoreResult};

/// An expert node as the placement file names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeEntry {
    /// A name unique in the cluster.
    pub id: String,
    /// Its ExpertService URL, for example `http://127.0.0.1:50061`.
    pub address: String,
}

/// One layer's replicas as the placement file writes them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerEntry {
    pub layer: usize,
    /// Per routed expert, in id order, the ids of the nodes holding it.
    pub experts: Vec<Vec<String>>,
    /// The nodes holding the layer's shared expert.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shared: Vec<String>,
}

/// The placement file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlacementFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    pub nodes: Vec<NodeEntry>,
    pub layers: Vec<LayerEntry>,
}

/// One expert of one MoE layer; the shared expert is id `num_experts`.
/// Orders by layer, then expert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LayerExpert {
    pub layer: usize,
    pub expert: u32,
}

/// A validated placement: replicas as node indices.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    nodes: Vec<NodeEntry>,
    /// Layer index to, per expert id (shared last), indices into `nodes`.
    layers: HashMap<usize, Vec<Vec<usize>>>,
}

impl PlacementFile {
    /// Reads a placement file.
    pub fn read(path: &Path) -> CoreResult<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| CoreError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text)
            .map_err(|error| CoreError::Placement(format!("{}: {error}", path.display())))
    }

    /// Returns the file as TOML text.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("placement files always serialise")
    }
}

impl Placement {
    /// Checks a placement file against the model: every MoE layer placed,
    /// every expert on at least one known node, no unknown layers.
    pub fn from_file(file: &PlacementFile, config: &ModelConfig) -> CoreResult<Self> {
        let mut node_index = HashMap::new();
        for (index, node) in file.nodes.iter().enumerate() {
            if node.id.is_empty() {
                return Err(CoreError::Placement(format!("nodes[{index}].id is empty")));
            }
            if node_index.insert(node.id.as_str(), index).is_some() {
                return Err(CoreError::Placement(format!(
                    "nodes[{index}].id {:?} appears twice",
                    node.id
                )));
            }
        }
        let mut layers = HashMap::new();
        for entry in &file.layers {
            let layer = entry.layer;
            if !config.is_moe_layer(layer) {
                return Err(CoreError::Placement(format!(
                    "layers: layer {layer} is not an MoE layer (MoE layers: {:?})",
                    config.moe_layers()
                )));
            }
            if entry.experts.len() != config.num_experts {
                return Err(CoreError::Placement(format!(
                    "layer {layer}: experts lists {} experts, the model has {}",
                    entry.experts.len(),
                    config.num_experts
                )));
            }
            if config.has_shared_expert() == entry.shared.is_empty() {
                return Err(CoreError::Placement(format!(
                    "layer {layer}: shared must {} because the model {} a shared expert",
                    if config.has_shared_expert() {
                        "list at least one node"
                    } else {
                        "be empty"
                    },
                    if config.has_shared_expert() {
                        "has"
                    } else {
                        "has no"
                    },
                )));
            }
            let all_experts = entry
                .experts
                .iter()
                .chain(config.has_shared_expert().then_some(&entry.shared));
            let mut replicas_by_expert = Vec::with_capacity(config.experts_per_layer());
            for (expert, replicas) in all_experts.enumerate() {
                if replicas.is_empty() {
                    return Err(CoreError::Placement(format!(
                        "layer {layer}, expert {expert} has no replica"
                    )));
                }
                let mut indices = Vec::with_capacity(replicas.len());
                for node_id in replicas {
                    let &index = node_index.get(node_id.as_str()).ok_or_else(|| {
                        CoreError::Placement(format!(
                            "layer {layer}, expert {expert}: unknown node {node_id:?}"
                        ))
                    })?;
                    if indices.contains(&index) {
                        return Err(CoreError::Placement(format!(
                            "layer {layer}, expert {expert}: node {node_id:?} listed twice"
                        )));
                    }
                    indices.push(index);
                }
                replicas_by_expert.push(indices);
            }
            if layers.insert(layer, replicas_by_expert).is_some() {
                return Err(CoreError::Placement(format!(
                    "layer {layer} is placed twice"
                )));
            }
        }
        if layers.is_empty() {
            return Err(CoreError::Placement(
                "layers is empty: place at least one MoE layer".into(),
            ));
        }
        Ok(Self {
            nodes: file.nodes.clone(),
            layers,
        })
    }

    /// Spreads every expert of every MoE layer over `nodes` round-robin,
    /// `replicas` times each on distinct nodes (capped at the node count).
    pub fn spread(
        config: &ModelConfig,
        nodes: Vec<NodeEntry>,
        replicas: usize,
    ) -> CoreResult<Self> {
        if nodes.is_empty() {
            return Err(CoreError::Placement(
                "at least one expert node is needed".into(),
            ));
        }
        let replicas = replicas.clamp(1, nodes.len());
        let mut next = 0;
        let layers = config
            .moe_layers()
            .into_iter()
            .map(|layer| {
                let experts = (0..config.experts_per_layer())
                    .map(|_| {
                        let owners = (0..replicas)
                            .map(|offset| (next + offset) % nodes.len())
                            .collect();
                        next += 1;
                        owners
                    })
                    .collect();
                (layer, experts)
            })
            .collect();
        Ok(Self { nodes, layers })
    }

    /// Builds a placement as the coordinators publish it: per layer and
    /// expert, the indices into `nodes` of its serving replicas. An expert
    /// may have none for a while (its only node died); routing reports it.
    pub fn from_parts(nodes: Vec<NodeEntry>, layers: HashMap<usize, Vec<Vec<usize>>>) -> Self {
        debug_assert!(
            layers
                .values()
                .flatten()
                .flatten()
                .all(|&node| node < nodes.len())
        );
        Self { nodes, layers }
    }

    /// Returns the expert nodes.
    pub fn nodes(&self) -> &[NodeEntry] {
        &self.nodes
    }

    /// Returns the placed layers, ascending.
    pub fn layers(&self) -> Vec<usize> {
        let mut layers: Vec<usize> = self.layers.keys().copied().collect();
        layers.sort_unstable();
        layers
    }

    /// Returns, per expert id of `layer` (shared last), its replicas as node indices.
    pub fn replicas(&self, layer: usize) -> Option<&[Vec<usize>]> {
        self.layers.get(&layer).map(Vec::as_slice)
    }

    /// Returns the experts node `node_id` holds, ascending.
    pub fn experts_of(&self, node_id: &str) -> Vec<LayerExpert> {
        let Some(node) = self.nodes.iter().position(|node| node.id == node_id) else {
            return Vec::new();
        };
        let mut held = Vec::new();
        for layer in self.layers() {
            for (expert, replicas) in self.layers[&layer].iter().enumerate() {
                if replicas.contains(&node) {
                    held.push(LayerExpert {
                        layer,
                        expert: expert as u32,
                    });
                }
            }
        }
        held
    }

    /// Returns the placement as a placement file.
    pub fn to_file(&self, config: &ModelConfig, model: Option<String>) -> PlacementFile {
        let layers = self
            .layers()
            .into_iter()
            .map(|layer| {
                let names = |replicas: &Vec<usize>| {
                    replicas
                        .iter()
                        .map(|&node| self.nodes[node].id.clone())
                        .collect()
                };
                let experts = &self.layers[&layer];
                LayerEntry {
                    layer,
                    experts: experts[..config.num_experts].iter().map(names).collect(),
                    shared: experts
                        .get(config.num_experts)
                        .map(names)
                        .unwrap_or_default(),
                }
            })
            .collect();
        PlacementFile {
            model,
            nodes: self.nodes.clone(),
            layers,
        }
    }
}

/// A well-mixed 64-bit hash of a token's values and an expert id: routers
/// draw a token's candidate replicas from it, so the draw depends on the
/// token alone.
pub fn token_hash(token: &[f32], expert: u32) -> u64 {
    // FNV-1a over the bits, finished with a splitmix64 mix.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325 ^ u64::from(expert);
    for value in token {
        hash = (hash ^ u64::from(value.to_bits())).wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash ^= hash >> 30;
    hash = hash.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash ^= hash >> 27;
    hash = hash.wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^= hash >> 31;
    hash
}

/// An expert node as the initial placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCapacity {
    pub id: String,
    /// Topology group (host, rack); replicas of one expert prefer distinct groups.
    pub group: String,
    /// Bytes of expert weights it keeps resident.
    pub memory_bytes: u64,
    /// Bytes of the next tier where experts beyond `memory_bytes` wait; 0: none.
    pub buffer_bytes: u64,
}

/// One expert to place, and the bytes of its weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpertToPlace {
    pub expert: LayerExpert,
    pub bytes: u64,
}

/// One replica the initial placement made: an expert on a node, by its
/// index in the node list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlacedReplica {
    pub expert: LayerExpert,
    pub node: usize,
}

/// Places every expert `replicas` times on distinct nodes: replicas of one
/// expert go to distinct topology groups where possible, nodes never hold
/// more than their memory and buffer together, experts go where they stay
/// resident while some node has resident room, and expert counts stay
/// balanced (ties to the node listed first).
pub fn initial_assignment(
    nodes: &[NodeCapacity],
    experts: &[ExpertToPlace],
    replicas: usize,
) -> Result<Vec<PlacedReplica>, String> {
    if nodes.is_empty() {
        return Err("no ready expert node to place experts on".into());
    }
    if replicas == 0 || replicas > nodes.len() {
        return Err(format!(
            "{replicas} replicas need between 1 and {} nodes",
            nodes.len()
        ));
    }
    let mut free: Vec<u64> = nodes
        .iter()
        .map(|node| node.memory_bytes.saturating_add(node.buffer_bytes))
        .collect();
    // Bytes free before a node's experts spill into its next tier.
    let mut resident_free: Vec<u64> = nodes.iter().map(|node| node.memory_bytes).collect();
    let mut held = vec![0usize; nodes.len()];
    let mut assignment = Vec::with_capacity(experts.len() * replicas);
    for &ExpertToPlace {
        expert: to_place,
        bytes,
    } in experts
    {
        let LayerExpert { layer, expert } = to_place;
        let mut chosen: Vec<usize> = Vec::with_capacity(replicas);
        for _ in 0..replicas {
            let best = (0..nodes.len())
                .filter(|&node| !chosen.contains(&node) && free[node] >= bytes)
                .min_by_key(|&node| {
                    let group_taken = chosen.iter().any(|&other| nodes[other].group == nodes[node].group);
                    let buffered = resident_free[node] < bytes;
                    (group_taken, buffered, held[node], node)
                })
                .ok_or_else(|| {
                    format!("no node has {bytes} bytes free for layer {layer} expert {expert} (replica {})", chosen.len() + 1)
                })?;
            free[best] -= bytes;
            resident_free[best] = resident_free[best].saturating_sub(bytes);
            held[best] += 1;
            chosen.push(best);
            assignment.push(PlacedReplica {
                expert: to_place,
                node: best,
            });
        }
    }
    Ok(assignment)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qwen2() -> ModelConfig {
        ModelConfig::from_json(
            r#"{"model_type":"qwen2_moe","hidden_size":8,"num_hidden_layers":2,
                "moe_intermediate_size":4,"shared_expert_intermediate_size":8,
                "num_experts":3,"num_experts_per_tok":2}"#,
        )
        .unwrap()
    }

    fn nodes(count: usize) -> Vec<NodeEntry> {
        (0..count)
            .map(|index| NodeEntry {
                id: format!("n{index}"),
                address: format!("http://127.0.0.1:{}", 5000 + index),
            })
            .collect()
    }

    #[test]
    fn spread_places_every_expert_and_round_trips_through_toml() {
        let config = qwen2();
        let placement = Placement::spread(&config, nodes(3), 2).unwrap();
        for layer in [0, 1] {
            let replicas = placement.replicas(layer).unwrap();
            assert_eq!(replicas.len(), 4);
            assert!(
                replicas
                    .iter()
                    .all(|owners| owners.len() == 2 && owners[0] != owners[1])
            );
        }
        let held: usize = (0..3)
            .map(|node| placement.experts_of(&format!("n{node}")).len())
            .sum();
        assert_eq!(held, 2 * 4 * 2);
        let text = placement.to_file(&config, None).to_toml();
        let parsed: PlacementFile = toml::from_str(&text).unwrap();
        assert_eq!(Placement::from_file(&parsed, &config).unwrap(), placement);
    }

    #[test]
    fn bad_placement_files_name_the_field() {
        let config = qwen2();
        let good = Placement::spread(&config, nodes(2), 1)
            .unwrap()
            .to_file(&config, None);
        let error = |file: PlacementFile| {
            Placement::from_file(&file, &config)
                .unwrap_err()
                .to_string()
        };
        let mut missing_shared = good.clone();
        missing_shared.layers[0].shared.clear();
        assert!(error(missing_shared).contains("layer 0: shared must list at least one node"));
        let mut unknown_node = good.clone();
        unknown_node.layers[1].experts[2] = vec!["n9".into()];
        assert!(error(unknown_node).contains("layer 1, expert 2: unknown node \"n9\""));
        let mut short = good.clone();
        short.layers[0].experts.pop();
        assert!(error(short).contains("experts lists 2 experts, the model has 3"));
        let mut dense = good.clone();
        dense.layers[0].layer = 7;
        assert!(error(dense).contains("layer 7 is not an MoE layer"));
        assert!(toml::from_str::<PlacementFile>("nodes = []\nlayers = []\nextra = 1").is_err());
    }

    #[test]
    fn token_hashes_depend_on_the_token_and_spread() {
        let mut counts = [0usize; 3];
        for token in 0..3000 {
            let row = [token as f32, 0.5];
            let hash = token_hash(&row, 4);
            assert_eq!(hash, token_hash(&row, 4));
            assert_ne!(hash, token_hash(&row, 5));
            counts[(hash % 3) as usize] += 1;
        }
        assert!(counts.iter().all(|&count| count > 800), "{counts:?}");
    }
}

#[cfg(test)]
mod initial_assignment_tests {
    use proptest::prelude::*;

    use super::*;

    fn to_place(layer: usize, expert: u32, bytes: u64) -> ExpertToPlace {
        ExpertToPlace {
            expert: LayerExpert { layer, expert },
            bytes,
        }
    }

    fn nodes(groups: &[&str], memory: u64) -> Vec<NodeCapacity> {
        groups
            .iter()
            .enumerate()
            .map(|(index, group)| NodeCapacity {
                id: format!("n{index}"),
                group: group.to_string(),
                memory_bytes: memory,
                buffer_bytes: 0,
            })
            .collect()
    }

    #[test]
    fn replicas_spread_over_groups_and_counts_balance() {
        let nodes = nodes(&["a", "a", "b", "b"], 1 << 30);
        let experts: Vec<ExpertToPlace> = (0..8).map(|expert| to_place(1, expert, 100)).collect();
        let assignment = initial_assignment(&nodes, &experts, 2).unwrap();
        for expert in 0..8 {
            let owners: Vec<usize> = assignment
                .iter()
                .filter(|placed| placed.expert.expert == expert)
                .map(|placed| placed.node)
                .collect();
            assert_eq!(owners.len(), 2);
            assert_ne!(
                nodes[owners[0]].group, nodes[owners[1]].group,
                "expert {expert}: {owners:?}"
            );
        }
        let mut counts = [0; 4];
        assignment
            .iter()
            .for_each(|placed| counts[placed.node] += 1);
        assert_eq!(counts, [4, 4, 4, 4]);
    }

    #[test]
    fn memory_limits_are_respected_and_named_when_short() {
        let nodes = nodes(&["a", "b"], 250);
        let experts: Vec<ExpertToPlace> = (0..4).map(|expert| to_place(0, expert, 100)).collect();
        assert_eq!(initial_assignment(&nodes, &experts, 1).unwrap().len(), 4);
        let error = initial_assignment(&nodes, &experts, 2).unwrap_err();
        assert!(error.contains("no node has 100 bytes free"), "{error}");
    }

    #[test]
    fn experts_stay_resident_while_they_can_and_buffers_add_room() {
        // Node 0 keeps one expert resident and three more in its buffer;
        // node 1 keeps three resident and has no buffer.
        let mut nodes = nodes(&["a", "a"], 0);
        (nodes[0].memory_bytes, nodes[0].buffer_bytes) = (100, 300);
        nodes[1].memory_bytes = 300;
        let experts: Vec<ExpertToPlace> = (0..8).map(|expert| to_place(0, expert, 100)).collect();
        let per_node = |count: usize| {
            let mut counts = [0; 2];
            for placed in initial_assignment(&nodes, &experts[..count], 1).unwrap() {
                counts[placed.node] += 1;
            }
            counts
        };
        // Balanced counts would buffer one of four; resident room takes them all.
        assert_eq!(per_node(4), [1, 3]);
        // Past the resident room, buffers take the rest, up to memory and buffer.
        assert_eq!(per_node(7), [4, 3]);
        let error = initial_assignment(&nodes, &experts, 1).unwrap_err();
        assert!(error.contains("no node has 100 bytes free"), "{error}");
    }

    proptest! {
        #[test]
        fn every_expert_gets_its_replicas_on_distinct_nodes_and_groups(
            node_count in 1usize..7, group_count in 1usize..4, experts in 1u32..40, replicas in 1usize..4,
        ) {
            let replicas = replicas.min(node_count);
            let groups: Vec<String> = (0..node_count).map(|index| format!("g{}", index % group_count)).collect();
            let distinct_groups = group_count.min(node_count);
            let group_refs: Vec<&str> = groups.iter().map(String::as_str).collect();
            let nodes = nodes(&group_refs, u64::MAX);
            let all: Vec<ExpertToPlace> = (0..experts).map(|expert| to_place(0, expert, 1)).collect();
            let assignment = initial_assignment(&nodes, &all, replicas).unwrap();
            prop_assert_eq!(assignment.len(), experts as usize * replicas);
            let mut counts = vec![0usize; node_count];
            for expert in 0..experts {
                let owners: Vec<usize> = assignment.iter().filter(|placed| placed.expert.expert == expert).map(|placed| placed.node).collect();
                let mut distinct = owners.clone();
                distinct.sort_unstable();
                distinct.dedup();
                prop_assert_eq!(distinct.len(), replicas);
                let mut owner_groups: Vec<&str> = owners.iter().map(|&node| groups[node].as_str()).collect();
                owner_groups.sort_unstable();
                owner_groups.dedup();
                prop_assert_eq!(owner_groups.len(), replicas.min(distinct_groups));
                owners.iter().for_each(|&node| counts[node] += 1);
            }
            if group_count == 1 {
                let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
                prop_assert!(max - min <= 1, "unbalanced: {:?}", counts);
            }
        }
    }
}
