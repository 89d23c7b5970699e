//! The placement planner: given each expert's load, the nodes with their
//! expert slots, and the current placement, decides how many replicas each
//! expert gets and which node holds each, so that the busiest node carries
//! as little more than the mean as possible.
//!
//! Pure functions, one MoE layer at a time; the coordinator's rebalancer
//! and `moectl placement plan` both call [`plan_layer`].
//!
//! The plan works like the expert-parallel load balancers of production
//! MoE servers (DeepSeek's EPLB): hot experts get extra replicas while slots
//! remain, each replica taking an equal share of its expert's load, and
//! replicas are packed largest first onto the least loaded node. On top of
//! that it keeps a replica where it already is when that node can take it
//! (fewer bytes moved), keeps an expert's routing group together where the
//! model limits routing to a few groups, spreads an expert's replicas over
//! topology groups, and returns the current placement unchanged unless the
//! plan gains more than a threshold.
//!
//! Nodes may hold more experts than stay resident (Expert Buffering): a
//! node's `slots` count what its resident tier and the next tier hold
//! together, never exceeded, and its `resident_slots` what stays resident.
//! A node keeps its hottest experts resident, so the planner counts a
//! node's replicas largest share first into its resident slots and weighs
//! the load of the rest by [`PlanOptions::buffered_load_factor`]: a token
//! for a buffered expert waits for a page-in or runs on the host. Hot
//! experts thus land where they stay resident. With every slot resident
//! the plan is the same as without tiers.

mod packing;

use std::collections::BTreeSet;

use packing::{add_replica, pack};

/// One expert node as the planner sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanNode {
    /// Experts it may hold: its resident tier and the next tier together
    /// (memory and buffer bytes over an expert's bytes).
    pub slots: usize,
    /// Of those, the experts that stay resident (its memory bytes over an
    /// expert's bytes), at most `slots`; the others wait in the next tier.
    /// Equal to `slots` on a node without one.
    pub resident_slots: usize,
    /// Topology group (host, rack): replicas of one expert spread over them.
    pub group: usize,
}

/// What the planner may trade.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlanOptions {
    /// The least gain in max/mean node load worth moving experts for; the
    /// current placement is kept when it is within this of balanced, or
    /// when the plan improves it by less.
    pub threshold: f64,
    /// Routing groups of the layer's experts (DeepSeek-V3's `n_group`):
    /// experts `g·E/n .. (g+1)·E/n` form group `g`. With group-limited
    /// routing a token visits few groups, so a group kept on few nodes
    /// means few nodes per token.
    pub routing_groups: Option<usize>,
    /// At most this many replicas beyond one per expert; None fills the
    /// slots.
    pub max_extra_replicas: Option<usize>,
    /// How many times its share of the load a replica beyond its node's
    /// resident slots counts (at least 1). A miss costs a page-in over
    /// PCIe or a compute on the host, so that node's work per token is
    /// higher; 2 makes the planner keep hot experts resident when the
    /// balance allows it without letting resident room outweigh balance.
    /// 1 treats buffered experts like resident ones.
    pub buffered_load_factor: f64,
}

impl Default for PlanOptions {
    fn default() -> Self {
        Self {
            threshold: 0.05,
            routing_groups: None,
            max_extra_replicas: None,
            buffered_load_factor: DEFAULT_BUFFERED_LOAD_FACTOR,
        }
    }
}

/// The default [`PlanOptions::buffered_load_factor`].
pub const DEFAULT_BUFFERED_LOAD_FACTOR: f64 = 2.0;

/// A layer's placement: per node, the ids of the experts it holds (one
/// entry per replica).
pub type Assignment = Vec<Vec<u32>>;

/// The planner's answer for one layer.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerPlan {
    /// Per node, the experts it should hold.
    pub nodes: Assignment,
    /// Busiest node's load over the mean node load, under this plan, with
    /// buffered replicas weighted ([`tiered_max_over_mean`]).
    pub max_over_mean: f64,
    /// The same for the current placement, when one was given.
    pub current_max_over_mean: Option<f64>,
    /// Replicas the plan adds to nodes (loads), against the current placement.
    pub added: usize,
    /// Replicas the plan removes from nodes (drops).
    pub removed: usize,
}

impl LayerPlan {
    /// Whether carrying out the plan changes anything.
    pub fn moves(&self) -> bool {
        self.added + self.removed > 0
    }
}

/// Why no plan could be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("{0}")]
    BadInput(String),
}

/// Per node, the share of its expert's load each replica it holds takes
/// (an equal share per replica), in the node's order.
fn replica_shares(loads: &[f64], assignment: &[Vec<u32>]) -> Vec<Vec<f64>> {
    let mut replicas = vec![0usize; loads.len()];
    for experts in assignment {
        for &expert in experts {
            if let Some(count) = replicas.get_mut(expert as usize) {
                *count += 1;
            }
        }
    }
    assignment
        .iter()
        .map(|experts| {
            experts
                .iter()
                .filter_map(|&expert| {
                    let expert = expert as usize;
                    (expert < loads.len()).then(|| loads[expert] / replicas[expert] as f64)
                })
                .collect()
        })
        .collect()
}

/// The load each node carries under `assignment`, each replica taking an
/// equal share of its expert's load.
pub fn node_loads(loads: &[f64], assignment: &[Vec<u32>]) -> Vec<f64> {
    replica_shares(loads, assignment)
        .iter()
        .map(|shares| shares.iter().sum())
        .collect()
}

/// The load each node carries under `assignment` with its tiers counted:
/// its largest shares fill its resident slots, and each share beyond them
/// counts `buffered_load_factor` times. Equal to [`node_loads`] on nodes
/// that hold no more than their resident slots.
pub fn tiered_node_loads(
    loads: &[f64],
    nodes: &[PlanNode],
    assignment: &[Vec<u32>],
    buffered_load_factor: f64,
) -> Vec<f64> {
    replica_shares(loads, assignment)
        .into_iter()
        .zip(nodes)
        .map(|(mut shares, node)| {
            let load: f64 = shares.iter().sum();
            if shares.len() <= node.resident_slots {
                return load;
            }
            shares.sort_by(|a, b| b.total_cmp(a));
            let buffered: f64 = shares[node.resident_slots..].iter().sum();
            load + buffered * (buffered_load_factor - 1.0)
        })
        .collect()
}

/// The busiest node's load over the mean node load (1 when all load is
/// zero: nothing is unbalanced).
pub fn max_over_mean(loads: &[f64], assignment: &[Vec<u32>]) -> f64 {
    let per_node = node_loads(loads, assignment);
    busiest_over_mean(&per_node, &per_node)
}

/// What the planner minimises: the busiest node's [`tiered_node_loads`]
/// over the mean node load (unweighted), so 1 only when the load is
/// balanced and every replica resident. Not a plain ratio of tiered loads,
/// which would score spreading buffered load evenly as well as keeping it
/// resident.
pub fn tiered_max_over_mean(
    loads: &[f64],
    nodes: &[PlanNode],
    assignment: &[Vec<u32>],
    buffered_load_factor: f64,
) -> f64 {
    let tiered = tiered_node_loads(loads, nodes, assignment, buffered_load_factor);
    busiest_over_mean(&tiered, &node_loads(loads, assignment))
}

/// The largest of `busiest` over the mean of `per_node` (1 when all load
/// is zero: nothing is unbalanced).
fn busiest_over_mean(busiest: &[f64], per_node: &[f64]) -> f64 {
    let total: f64 = per_node.iter().sum();
    if per_node.is_empty() || total <= 0.0 {
        return 1.0;
    }
    let mean = total / per_node.len() as f64;
    busiest.iter().copied().fold(0.0, f64::max) / mean
}

/// Checks that `assignment` places every expert of `experts` at least
/// once, replicas of one expert on distinct nodes, no node over its slots
/// (resident and buffered together).
pub fn check_assignment(
    experts: usize,
    nodes: &[PlanNode],
    assignment: &[Vec<u32>],
) -> Result<(), String> {
    if assignment.len() != nodes.len() {
        return Err(format!(
            "{} node lists for {} nodes",
            assignment.len(),
            nodes.len()
        ));
    }
    let mut placed = vec![false; experts];
    for (index, (held, node)) in assignment.iter().zip(nodes).enumerate() {
        if held.len() > node.slots {
            return Err(format!(
                "node {index} holds {} experts in {} slots",
                held.len(),
                node.slots
            ));
        }
        let distinct: BTreeSet<u32> = held.iter().copied().collect();
        if distinct.len() != held.len() {
            return Err(format!("node {index} holds an expert twice"));
        }
        for &expert in held {
            *placed.get_mut(expert as usize).ok_or_else(|| {
                format!("node {index} holds expert {expert} of a layer with {experts}")
            })? = true;
        }
    }
    match placed.iter().position(|&placed| !placed) {
        Some(expert) => Err(format!("expert {expert} has no replica")),
        None => Ok(()),
    }
}

/// Plans one layer. `loads[e]` is expert `e`'s load (tokens in a window);
/// `current`, when given, is the placement now, per node.
pub fn plan_layer(
    loads: &[f64],
    nodes: &[PlanNode],
    current: Option<&[Vec<u32>]>,
    options: &PlanOptions,
) -> Result<LayerPlan, PlanError> {
    let experts = loads.len();
    let total_slots = check_plan_input(loads, nodes, current, options)?;
    let busiest_work = |assignment: &[Vec<u32>]| {
        tiered_max_over_mean(loads, nodes, assignment, options.buffered_load_factor)
    };
    let current_max_over_mean = current.map(busiest_work);
    let unchanged = |current: &[Vec<u32>], max_over_mean: f64| LayerPlan {
        nodes: current.to_vec(),
        max_over_mean,
        current_max_over_mean: Some(max_over_mean),
        added: 0,
        removed: 0,
    };
    if let (Some(current), Some(before)) = (current, current_max_over_mean)
        && before <= 1.0 + options.threshold
    {
        return Ok(unchanged(current, before));
    }

    let budget = options
        .max_extra_replicas
        .map_or(total_slots, |extra| total_slots.min(experts + extra));
    // One replica each, then one more at a time for the expert whose
    // replicas carry the most, until the packing is balanced: every extra
    // replica costs memory, a load, and its weights streamed per batch.
    let mut replicas = vec![1usize; experts];
    let mut assignment = pack(loads, &replicas, nodes, current, options);
    let mut after = busiest_work(&assignment);
    while after > 1.0 + options.threshold / 2.0
        && replicas.iter().sum::<usize>() < budget
        && add_replica(loads, nodes, &mut replicas)
    {
        let candidate = pack(loads, &replicas, nodes, current, options);
        let candidate_after = busiest_work(&candidate);
        if candidate_after < after {
            assignment = candidate;
            after = candidate_after;
        }
    }
    if let (Some(current), Some(before)) = (current, current_max_over_mean)
        && before - after < options.threshold
    {
        return Ok(unchanged(current, before));
    }
    let (added, removed) = match current {
        Some(current) => differences(current, &assignment),
        None => (assignment.iter().map(Vec::len).sum(), 0),
    };
    Ok(LayerPlan {
        nodes: assignment,
        max_over_mean: after,
        current_max_over_mean,
        added,
        removed,
    })
}

/// Refuses input no plan can honour: no experts or nodes, loads that are
/// not finite and non-negative, fewer slots than experts, more resident
/// slots than slots, a bad threshold or buffered load factor, routing
/// groups that do not divide the experts, or a current placement that
/// breaks the rules of [`check_assignment`]. Returns the nodes' slots in
/// all.
fn check_plan_input(
    loads: &[f64],
    nodes: &[PlanNode],
    current: Option<&[Vec<u32>]>,
    options: &PlanOptions,
) -> Result<usize, PlanError> {
    let bad = |message: String| Err(PlanError::BadInput(message));
    let experts = loads.len();
    if experts == 0 {
        return bad("no experts to place".into());
    }
    if nodes.is_empty() {
        return bad("no nodes to place experts on".into());
    }
    if let Some(expert) = loads
        .iter()
        .position(|load| !load.is_finite() || *load < 0.0)
    {
        return bad(format!(
            "expert {expert} has load {}; loads are finite and not negative",
            loads[expert]
        ));
    }
    let total_slots: usize = nodes.iter().map(|node| node.slots).sum();
    if total_slots < experts {
        return bad(format!(
            "{experts} experts need {experts} slots; the nodes have {total_slots}"
        ));
    }
    if let Some(index) = nodes
        .iter()
        .position(|node| node.resident_slots > node.slots)
    {
        return bad(format!(
            "node {index} has {} resident slots of {}",
            nodes[index].resident_slots, nodes[index].slots
        ));
    }
    if !(options.threshold >= 0.0 && options.threshold.is_finite()) {
        return bad(format!(
            "threshold {} is not a non-negative number",
            options.threshold
        ));
    }
    if !(options.buffered_load_factor >= 1.0 && options.buffered_load_factor.is_finite()) {
        return bad(format!(
            "buffered load factor {} is not a number of at least 1",
            options.buffered_load_factor
        ));
    }
    if let Some(groups) = options.routing_groups
        && (groups == 0 || !experts.is_multiple_of(groups))
    {
        return bad(format!(
            "{groups} routing groups do not divide {experts} experts"
        ));
    }
    if let Some(current) = current {
        check_assignment(experts, nodes, current)
            .map_err(|error| PlanError::BadInput(format!("current placement: {error}")))?;
    }
    Ok(total_slots)
}

/// Replicas in `to` that `from` lacks, and the reverse, per node.
fn differences(from: &[Vec<u32>], to: &[Vec<u32>]) -> (usize, usize) {
    from.iter()
        .zip(to)
        .fold((0, 0), |(added, removed), (from, to)| {
            let from: BTreeSet<u32> = from.iter().copied().collect();
            let to: BTreeSet<u32> = to.iter().copied().collect();
            (
                added + to.difference(&from).count(),
                removed + from.difference(&to).count(),
            )
        })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn nodes(count: usize, slots: usize, groups: usize) -> Vec<PlanNode> {
        (0..count)
            .map(|index| PlanNode {
                slots,
                resident_slots: slots,
                group: index % groups.max(1),
            })
            .collect()
    }

    /// Zipf(s) popularity over `experts`, scaled to `tokens`.
    fn zipf(experts: usize, exponent: f64, tokens: f64) -> Vec<f64> {
        let weights: Vec<f64> = (1..=experts)
            .map(|rank| 1.0 / (rank as f64).powf(exponent))
            .collect();
        let total: f64 = weights.iter().sum();
        weights
            .iter()
            .map(|weight| weight / total * tokens)
            .collect()
    }

    #[test]
    fn skewed_loads_get_replicas_and_balance() {
        let loads = zipf(64, 1.2, 100_000.0);
        let cluster = nodes(4, 20, 1);
        let round_robin: Assignment = (0..4)
            .map(|node| (0..64u32).filter(|expert| expert % 4 == node).collect())
            .collect();
        let plan = plan_layer(
            &loads,
            &cluster,
            Some(&round_robin),
            &PlanOptions::default(),
        )
        .unwrap();
        check_assignment(64, &cluster, &plan.nodes).unwrap();
        let before = plan.current_max_over_mean.unwrap();
        assert!(before > 1.5, "round robin under Zipf 1.2 is {before}");
        assert!(plan.max_over_mean <= 1.10, "planned {}", plan.max_over_mean);
        // The hottest expert got the most replicas.
        let replicas = |expert: u32| {
            plan.nodes
                .iter()
                .filter(|held| held.contains(&expert))
                .count()
        };
        assert!(replicas(0) >= 2);
        assert_eq!(replicas(63), 1);
        // No more extra replicas than balance needs.
        let total: usize = plan.nodes.iter().map(Vec::len).sum();
        assert!(total < 80, "{total} replicas: every slot filled");
        assert!(plan.moves());
        // A budget of extra replicas caps the copies.
        let capped = PlanOptions {
            max_extra_replicas: Some(1),
            ..PlanOptions::default()
        };
        let plan = plan_layer(&loads, &cluster, Some(&round_robin), &capped).unwrap();
        assert!(plan.nodes.iter().map(Vec::len).sum::<usize>() <= 65);
        check_assignment(64, &cluster, &plan.nodes).unwrap();
    }

    #[test]
    fn a_balanced_layer_is_left_alone() {
        let loads = vec![100.0; 16];
        let cluster = nodes(4, 6, 2);
        let current: Assignment = (0..4)
            .map(|node| (0..16u32).filter(|expert| expert % 4 == node).collect())
            .collect();
        let plan = plan_layer(&loads, &cluster, Some(&current), &PlanOptions::default()).unwrap();
        assert_eq!(plan.nodes, current);
        assert!(!plan.moves());
        assert_eq!(plan.max_over_mean, 1.0);
    }

    #[test]
    fn routing_groups_stay_on_few_nodes() {
        // 8 groups of 4 experts, 4 nodes of 8 slots: each node can hold two
        // whole groups, and equal loads let it.
        let loads = vec![10.0; 32];
        let cluster = nodes(4, 8, 1);
        let options = PlanOptions {
            routing_groups: Some(8),
            ..PlanOptions::default()
        };
        let plan = plan_layer(&loads, &cluster, None, &options).unwrap();
        for group in 0..8u32 {
            let holders = plan
                .nodes
                .iter()
                .filter(|held| held.iter().any(|expert| expert / 4 == group))
                .count();
            assert_eq!(holders, 1, "group {group} is split: {:?}", plan.nodes);
        }
        assert!((plan.max_over_mean - 1.0).abs() < 1e-9);
    }

    #[test]
    fn bad_input_is_named() {
        let cluster = nodes(2, 2, 1);
        let error = |loads: &[f64], nodes: &[PlanNode], options: PlanOptions| {
            plan_layer(loads, nodes, None, &options)
                .unwrap_err()
                .to_string()
        };
        assert!(error(&[1.0; 5], &cluster, PlanOptions::default()).contains("5 slots"));
        assert!(error(&[1.0, f64::NAN], &cluster, PlanOptions::default()).contains("expert 1"));
        assert!(error(&[], &cluster, PlanOptions::default()).contains("no experts"));
        let groups = PlanOptions {
            routing_groups: Some(3),
            ..PlanOptions::default()
        };
        assert!(error(&[1.0; 4], &cluster, groups).contains("routing groups"));
        let overfull = vec![vec![0, 1, 2], vec![3]];
        let message = plan_layer(
            &[1.0; 4],
            &cluster,
            Some(&overfull),
            &PlanOptions::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(message.contains("current placement"), "{message}");
    }

    /// Per node, its replicas beyond its resident slots when its largest
    /// shares fill those: the experts it keeps buffered.
    fn buffered_experts(loads: &[f64], nodes: &[PlanNode], assignment: &[Vec<u32>]) -> Vec<u32> {
        let mut buffered = Vec::new();
        for (node, held) in nodes.iter().zip(assignment) {
            let mut hottest_first = held.clone();
            hottest_first.sort_by(|&a, &b| loads[b as usize].total_cmp(&loads[a as usize]));
            buffered.extend(hottest_first.into_iter().skip(node.resident_slots));
        }
        buffered.sort_unstable();
        buffered
    }

    /// Two nodes that keep one expert resident and three buffered (a GPU
    /// with little memory and much pinned host memory), then two that keep
    /// four resident and have no buffer.
    fn mixed_tiers() -> Vec<PlanNode> {
        let node = |slots, resident_slots| PlanNode {
            slots,
            resident_slots,
            group: 0,
        };
        vec![node(4, 1), node(4, 1), node(4, 4), node(4, 4)]
    }

    #[test]
    fn hot_experts_land_where_they_stay_resident() {
        let loads = zipf(8, 1.0, 100_000.0);
        let cluster = mixed_tiers();
        let plan = plan_layer(&loads, &cluster, None, &PlanOptions::default()).unwrap();
        check_assignment(8, &cluster, &plan.nodes).unwrap();
        let buffered = buffered_experts(&loads, &cluster, &plan.nodes);
        assert!(
            buffered.iter().all(|&expert| expert >= 4),
            "the four hottest experts stay resident: {:?} buffers {buffered:?}",
            plan.nodes
        );
        // Counting buffered replicas like resident ones spreads replicas of
        // the hottest experts into the small nodes' buffers.
        let flat = PlanOptions {
            buffered_load_factor: 1.0,
            ..PlanOptions::default()
        };
        let flat_plan = plan_layer(&loads, &cluster, None, &flat).unwrap();
        let flat_buffered = buffered_experts(&loads, &cluster, &flat_plan.nodes);
        assert!(
            flat_buffered.iter().any(|&expert| expert < 4),
            "{flat_buffered:?}"
        );
        let tiered = |nodes: &[Vec<u32>]| {
            tiered_max_over_mean(&loads, &cluster, nodes, DEFAULT_BUFFERED_LOAD_FACTOR)
        };
        assert!(tiered(&plan.nodes) < tiered(&flat_plan.nodes));
    }

    #[test]
    fn a_balanced_layer_with_hot_experts_buffered_is_replanned() {
        let loads = [40.0, 35.0, 30.0, 25.0, 20.0, 15.0, 10.0, 5.0];
        let node = |slots, resident_slots| PlanNode {
            slots,
            resident_slots,
            group: 0,
        };
        let cluster = [node(4, 2), node(4, 4)];
        // Balanced tokens, but node 0 buffers experts 4 and 5.
        let current: Assignment = vec![vec![2, 3, 4, 5], vec![0, 1, 6, 7]];
        assert_eq!(max_over_mean(&loads, &current), 1.0);
        let flat = PlanOptions {
            buffered_load_factor: 1.0,
            ..PlanOptions::default()
        };
        assert!(
            !plan_layer(&loads, &cluster, Some(&current), &flat)
                .unwrap()
                .moves()
        );
        let plan = plan_layer(&loads, &cluster, Some(&current), &PlanOptions::default()).unwrap();
        assert!(plan.moves());
        check_assignment(8, &cluster, &plan.nodes).unwrap();
        // Node 0's buffered tokens: 35 now, less under the plan.
        let buffered_load = |nodes: &[Vec<u32>]| -> f64 {
            buffered_experts(&loads, &cluster, nodes)
                .iter()
                .map(|&expert| loads[expert as usize])
                .sum()
        };
        assert!(
            buffered_load(&plan.nodes) < buffered_load(&current),
            "{:?}",
            plan.nodes
        );
        assert!(plan.max_over_mean < plan.current_max_over_mean.unwrap() - 0.05);
    }

    #[test]
    fn resident_slots_are_checked() {
        let cluster = [PlanNode {
            slots: 2,
            resident_slots: 3,
            group: 0,
        }];
        let error = plan_layer(&[1.0], &cluster, None, &PlanOptions::default()).unwrap_err();
        assert!(
            error.to_string().contains("3 resident slots of 2"),
            "{error}"
        );
        let below_one = PlanOptions {
            buffered_load_factor: 0.5,
            ..PlanOptions::default()
        };
        let error = plan_layer(&[1.0], &nodes(1, 2, 1), None, &below_one).unwrap_err();
        assert!(
            error.to_string().contains("buffered load factor"),
            "{error}"
        );
    }

    fn layer_case() -> impl Strategy<Value = (Vec<f64>, Vec<PlanNode>, f64)> {
        (2usize..6, 1usize..4, 1usize..40, 0u32..3).prop_flat_map(
            |(node_count, groups, experts, skew)| {
                let min_slots = experts.div_ceil(node_count);
                (
                    prop::collection::vec(0f64..1000.0, experts).prop_map(move |loads| {
                        // Skew 0: as drawn; 1 and 2: one expert much hotter.
                        let mut loads = loads;
                        if skew > 0 {
                            loads[0] *= 20.0 * skew as f64;
                        }
                        loads
                    }),
                    prop::collection::vec(min_slots..min_slots + 6, node_count).prop_map(
                        move |slots| {
                            slots
                                .into_iter()
                                .enumerate()
                                .map(|(index, slots)| PlanNode {
                                    slots,
                                    resident_slots: slots,
                                    group: index % groups,
                                })
                                .collect::<Vec<_>>()
                        },
                    ),
                    prop_oneof![Just(0.0), Just(0.05), Just(0.2)],
                )
            },
        )
    }

    proptest! {
        #[test]
        fn plans_are_valid_and_never_worse(
            (loads, cluster, threshold) in layer_case(),
            seed in any::<u64>(),
        ) {
            let options = PlanOptions { threshold, ..PlanOptions::default() };
            let fresh = plan_layer(&loads, &cluster, None, &options).unwrap();
            prop_assert!(check_assignment(loads.len(), &cluster, &fresh.nodes).is_ok(),
                "{:?}", check_assignment(loads.len(), &cluster, &fresh.nodes));

            // A current placement: experts dealt to nodes from a seed.
            let mut current: Assignment = vec![Vec::new(); cluster.len()];
            let mut node = (seed as usize) % cluster.len();
            for expert in 0..loads.len() as u32 {
                while current[node].len() >= cluster[node].slots {
                    node = (node + 1) % cluster.len();
                }
                current[node].push(expert);
                node = (node + 1 + (seed as usize >> (expert % 32))) % cluster.len();
            }
            let plan = plan_layer(&loads, &cluster, Some(&current), &options).unwrap();
            prop_assert!(check_assignment(loads.len(), &cluster, &plan.nodes).is_ok());
            let before = max_over_mean(&loads, &current);
            prop_assert_eq!(plan.current_max_over_mean, Some(before));
            prop_assert!((plan.max_over_mean - max_over_mean(&loads, &plan.nodes)).abs() < 1e-9);
            // Never worse, and only moves for a gain of at least the threshold.
            prop_assert!(plan.max_over_mean <= before + 1e-9);
            if plan.moves() {
                prop_assert!(before - plan.max_over_mean >= threshold - 1e-9);
            } else {
                prop_assert_eq!(&plan.nodes, &current);
            }
            // Planning again from the plan moves nothing more.
            let again = plan_layer(&loads, &cluster, Some(&plan.nodes), &options).unwrap();
            prop_assert!(!again.moves() || again.max_over_mean < plan.max_over_mean - threshold + 1e-9);
        }

        #[test]
        fn plans_never_overfill_tiers_and_never_get_worse(
            (loads, cluster, threshold) in layer_case(),
            resident in prop::collection::vec(0usize..8, 6),
            seed in any::<u64>(),
        ) {
            // The same cases, with some slots of each node buffered.
            let cluster: Vec<PlanNode> = cluster
                .iter()
                .zip(&resident)
                .map(|(node, &resident)| PlanNode { resident_slots: resident.min(node.slots), ..*node })
                .collect();
            let options = PlanOptions { threshold, ..PlanOptions::default() };
            let fresh = plan_layer(&loads, &cluster, None, &options).unwrap();
            prop_assert!(check_assignment(loads.len(), &cluster, &fresh.nodes).is_ok());
            let mut current: Assignment = vec![Vec::new(); cluster.len()];
            for expert in 0..loads.len() as u32 {
                let mut node = (seed as usize + expert as usize) % cluster.len();
                while current[node].len() >= cluster[node].slots {
                    node = (node + 1) % cluster.len();
                }
                current[node].push(expert);
            }
            let plan = plan_layer(&loads, &cluster, Some(&current), &options).unwrap();
            prop_assert!(check_assignment(loads.len(), &cluster, &plan.nodes).is_ok());
            let tiered = |nodes: &[Vec<u32>]| tiered_max_over_mean(&loads, &cluster, nodes, DEFAULT_BUFFERED_LOAD_FACTOR);
            let before = tiered(&current);
            prop_assert_eq!(plan.current_max_over_mean, Some(before));
            prop_assert!((plan.max_over_mean - tiered(&plan.nodes)).abs() < 1e-9);
            prop_assert!(plan.max_over_mean <= before + 1e-9);
            prop_assert!(plan.max_over_mean >= max_over_mean(&loads, &plan.nodes) - 1e-9);
            if plan.moves() {
                prop_assert!(before - plan.max_over_mean >= threshold - 1e-9);
            }
        }

        #[test]
        fn equal_loads_in_a_full_balance_yield_no_moves(
            node_count in 1usize..6,
            per_node in 1usize..8,
            spare in 0usize..4,
        ) {
            let experts = node_count * per_node;
            let loads = vec![42.0; experts];
            let cluster = nodes(node_count, per_node + spare, 2);
            let current: Assignment = (0..node_count)
                .map(|node| (0..experts as u32).filter(|expert| *expert as usize % node_count == node).collect())
                .collect();
            let plan = plan_layer(&loads, &cluster, Some(&current), &PlanOptions::default()).unwrap();
            prop_assert!(!plan.moves());
            prop_assert_eq!(plan.nodes, current);
        }
    }
}
