//! How the planner packs replicas onto nodes: how many replicas each
//! expert gets, and which node takes each, largest share first, counting
//! replicas beyond a node's resident slots as buffered.

use std::collections::BTreeSet;

use super::{Assignment, PlanNode, PlanOptions};

/// Gives one more replica to the expert whose replicas carry the most
/// load each, among those whose replicas still fit on distinct nodes
/// within the slots; false when none can take one.
pub(super) fn add_replica(loads: &[f64], nodes: &[PlanNode], counts: &mut [usize]) -> bool {
    let mut by_share: Vec<usize> = (0..loads.len())
        .filter(|&expert| counts[expert] < nodes.len() && loads[expert] > 0.0)
        .collect();
    by_share.sort_by(|&a, &b| {
        let share = |expert: usize| loads[expert] / counts[expert] as f64;
        share(b).total_cmp(&share(a)).then(a.cmp(&b))
    });
    by_share.into_iter().any(|expert| {
        counts[expert] += 1;
        let fits = fits_on_distinct_nodes(counts, nodes);
        if !fits {
            counts[expert] -= 1;
        }
        fits
    })
}

/// Whether replicas in these counts can sit on distinct nodes within the
/// slots (the Gale-Ryser condition: the k largest counts together need at
/// most what k replicas per node can offer, for every k).
fn fits_on_distinct_nodes(counts: &[usize], nodes: &[PlanNode]) -> bool {
    let mut sorted = counts.to_vec();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    let mut needed = 0;
    sorted.iter().enumerate().all(|(index, &count)| {
        needed += count;
        let k = index + 1;
        needed <= nodes.iter().map(|node| node.slots.min(k)).sum::<usize>()
    })
}

/// An assignment that honours the counts whatever the loads: the experts
/// with most replicas first, each onto the nodes with most free slots
/// (the constructive side of the Gale-Ryser condition).
fn feasible_assignment(counts: &[usize], nodes: &[PlanNode]) -> Assignment {
    let mut order: Vec<usize> = (0..counts.len()).collect();
    order.sort_by(|&a, &b| counts[b].cmp(&counts[a]).then(a.cmp(&b)));
    let mut assignment: Assignment = vec![Vec::new(); nodes.len()];
    for expert in order {
        let mut by_room: Vec<usize> = (0..nodes.len()).collect();
        by_room.sort_by_key(|&node| {
            (
                std::cmp::Reverse(nodes[node].slots - assignment[node].len()),
                node,
            )
        });
        for &node in by_room.iter().take(counts[expert]) {
            assignment[node].push(expert as u32);
        }
    }
    assignment
}

/// Packs the replicas largest first, each onto the best node that has a
/// free slot and no replica of that expert yet.
pub(super) fn pack(
    loads: &[f64],
    replicas: &[usize],
    nodes: &[PlanNode],
    current: Option<&[Vec<u32>]>,
    options: &PlanOptions,
) -> Assignment {
    let total: f64 = loads.iter().sum();
    let mean = total / nodes.len() as f64;
    let mut packing = Packing {
        nodes,
        options,
        current,
        experts: loads.len(),
        target: mean * (1.0 + options.threshold / 2.0),
        assignment: vec![Vec::new(); nodes.len()],
        node_load: vec![0f64; nodes.len()],
        groups_on: vec![BTreeSet::new(); nodes.len()],
    };
    for (expert, share) in replica_shares_largest_first(loads, replicas) {
        let candidates: Vec<usize> = (0..nodes.len())
            .filter(|&node| {
                packing.assignment[node].len() < nodes[node].slots
                    && !packing.assignment[node].contains(&expert)
            })
            .collect();
        let node = match candidates.is_empty() {
            false => packing.best_node(&candidates, expert, share),
            // Every node with a free slot holds this expert already: move
            // another expert from a full node to such a node to make room.
            true => match make_room(
                &mut packing.assignment,
                &mut packing.node_load,
                loads,
                replicas,
                nodes,
                expert,
            ) {
                Some(node) => node,
                None => return sorted_per_node(feasible_assignment(replicas, nodes)),
            },
        };
        packing.place(node, expert, share);
    }
    sorted_per_node(packing.assignment)
}

/// A packing in progress: what each node holds and carries so far.
struct Packing<'a> {
    nodes: &'a [PlanNode],
    options: &'a PlanOptions,
    /// The placement now, whose replicas stay where they are when they fit.
    current: Option<&'a [Vec<u32>]>,
    /// Experts in the layer, to tell their routing groups.
    experts: usize,
    /// A node may go this far above the mean to keep a replica in place or
    /// a routing group together.
    target: f64,
    assignment: Assignment,
    /// Per node, the load of the replicas placed so far, those beyond its
    /// resident slots weighted by the buffered load factor.
    node_load: Vec<f64>,
    /// Per node, the routing groups of the experts it holds.
    groups_on: Vec<BTreeSet<usize>>,
}

impl Packing<'_> {
    fn group_of(&self, expert: u32) -> usize {
        self.options
            .routing_groups
            .map_or(0, |groups| expert as usize / (self.experts / groups))
    }

    fn held_now(&self, node: usize, expert: u32) -> bool {
        self.current
            .is_some_and(|current| current[node].contains(&expert))
    }

    /// What a replica of `share` placed on `node` adds beyond its share:
    /// nothing while the node has a resident slot free, else the extra
    /// weight of a buffered replica. Shares come largest first, so a
    /// node's first replicas are its hottest, the ones it keeps resident.
    fn buffered_extra(&self, node: usize, share: f64) -> f64 {
        if self.assignment[node].len() < self.nodes[node].resident_slots {
            0.0
        } else {
            share * (self.options.buffered_load_factor - 1.0)
        }
    }

    /// The best of `candidates` for a replica of `expert` with `share`.
    fn best_node(&self, candidates: &[usize], expert: u32, share: f64) -> usize {
        let load_after = |node: usize| self.node_load[node] + self.buffered_extra(node, share);
        let fits = |node: usize| load_after(node) + share <= self.target;
        let topology_taken = |node: usize| {
            (0..self.nodes.len()).any(|other| {
                other != node
                    && self.nodes[other].group == self.nodes[node].group
                    && self.assignment[other].contains(&expert)
            })
        };
        let group = self.group_of(expert);
        *candidates
            .iter()
            .min_by(|&&a, &&b| {
                // Within the target: keep it where it is, keep its routing
                // group together, spread over topology groups; then the
                // node least loaded once it holds the replica.
                let key = |node: usize| {
                    (
                        !fits(node),
                        !(fits(node) && self.held_now(node, expert)),
                        !(fits(node)
                            && self.options.routing_groups.is_some()
                            && self.groups_on[node].contains(&group)),
                        topology_taken(node),
                    )
                };
                key(a)
                    .cmp(&key(b))
                    .then(load_after(a).total_cmp(&load_after(b)))
                    .then(a.cmp(&b))
            })
            .expect("candidates is not empty")
    }

    fn place(&mut self, node: usize, expert: u32, share: f64) {
        let extra = self.buffered_extra(node, share);
        self.assignment[node].push(expert);
        self.node_load[node] += share;
        self.node_load[node] += extra;
        let group = self.group_of(expert);
        self.groups_on[node].insert(group);
    }
}

/// Every replica with its share of its expert's load, largest first; ties
/// by expert id, so the plan is deterministic.
fn replica_shares_largest_first(loads: &[f64], replicas: &[usize]) -> Vec<(u32, f64)> {
    let mut shares: Vec<(u32, f64)> = replicas
        .iter()
        .enumerate()
        .flat_map(|(expert, &count)| {
            std::iter::repeat_n((expert as u32, loads[expert] / count as f64), count)
        })
        .collect();
    shares.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    shares
}

/// `assignment` with each node's experts in ascending order.
fn sorted_per_node(mut assignment: Assignment) -> Assignment {
    for held in &mut assignment {
        held.sort_unstable();
    }
    assignment
}

/// Frees a slot for `expert` on a node that lacks it, by moving one of
/// that node's replicas to a node with a free slot; returns the node, or
/// None when no single move makes room.
fn make_room(
    assignment: &mut Assignment,
    node_load: &mut [f64],
    loads: &[f64],
    replicas: &[usize],
    nodes: &[PlanNode],
    expert: u32,
) -> Option<usize> {
    for full in 0..nodes.len() {
        if assignment[full].contains(&expert) || nodes[full].slots == 0 {
            continue;
        }
        for free in 0..nodes.len() {
            if assignment[free].len() >= nodes[free].slots {
                continue;
            }
            let movable = assignment[full]
                .iter()
                .position(|other| !assignment[free].contains(other));
            if let Some(position) = movable {
                let other = assignment[full].remove(position);
                let share = loads[other as usize] / replicas[other as usize] as f64;
                node_load[full] -= share;
                node_load[free] += share;
                assignment[free].push(other);
                return Some(full);
            }
        }
    }
    None
}
