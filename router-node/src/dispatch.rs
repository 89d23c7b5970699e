//! Choosing among an expert's replicas, splitting a routed batch into one
//! share per expert node, and summing the nodes' answers back into one
//! output row per token, in expert order. No I/O: [`crate::fanout`] sends
//! the shares.

use std::collections::BTreeMap;

use moemesh_core::model::gating::Routing;
use moemesh_core::model::placement::token_hash;
use moemesh_proto::v1::ExpertRows;

/// What sending a token to one more node is worth, in token-expert pairs
/// of load: a node already receiving the token wins unless it is busier
/// than the other candidate by more than this.
pub const AFFINITY_PAIRS: u64 = 64;

/// Chooses among an expert's replicas by outstanding work: of two
/// candidates drawn from the token's own hash ("power of two choices"),
/// the node with fewer token-expert pairs in flight (this router's other
/// requests, plus what this batch already gave it), a node that already
/// receives the token counting [`AFFINITY_PAIRS`] less (and joining the
/// candidates); on a tie, one in the router's own topology group.
#[derive(Debug, Clone)]
pub struct ReplicaPicker {
    /// Per node: pairs in flight when the batch started, plus the batch's own.
    load: Vec<u64>,
    /// Per node: whether it is in the router's topology group.
    local: Vec<bool>,
}

impl ReplicaPicker {
    /// `in_flight[n]`: node `n`'s outstanding pairs; `local[n]`: in the
    /// router's topology group.
    pub fn new(in_flight: Vec<u64>, local: Vec<bool>) -> Self {
        debug_assert_eq!(in_flight.len(), local.len());
        Self {
            load: in_flight,
            local,
        }
    }

    /// Node count.
    pub fn nodes(&self) -> usize {
        self.load.len()
    }

    /// Picks the node for `expert` of the token `row` among `owners`, and
    /// counts the pair against it; `has_token(n)` says whether node `n`
    /// already receives this token.
    /// With `follow_token` (the shared expert, which every token needs) a
    /// node already receiving the token is taken whenever one holds the
    /// expert, as expert-parallel servers run shared experts where the
    /// token is.
    fn pick(
        &mut self,
        row: &[f32],
        expert: u32,
        owners: &[usize],
        follow_token: bool,
        has_token: impl Fn(usize) -> bool,
    ) -> usize {
        let receiving = owners
            .iter()
            .copied()
            .filter(|&node| has_token(node))
            .min_by_key(|&node| (self.load[node], !self.local[node]));
        let node = match (owners.len(), receiving) {
            (_, Some(node)) if follow_token => node,
            (1, _) => owners[0],
            (count, _) => {
                let hash = token_hash(row, expert);
                let first = (hash % count as u64) as usize;
                let step = 1 + ((hash / count as u64) % (count as u64 - 1)) as usize;
                let (a, b) = (owners[first], owners[(first + step) % count]);
                // Sending the token to one more node costs a row of bytes
                // and a share of a call: count it as AFFINITY_PAIRS of load.
                let cost = |node: usize| {
                    self.load[node] + if has_token(node) { 0 } else { AFFINITY_PAIRS }
                };
                let key = |node: usize| (cost(node), !self.local[node]);
                // The best node already receiving the token is a candidate too.
                [a, b]
                    .into_iter()
                    .chain(receiving)
                    .min_by_key(|&node| key(node))
                    .expect("two candidates at least")
            }
        };
        self.load[node] += 1;
        node
    }
}

/// The share of a batch that goes to one expert node.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct NodeBatch {
    /// Tokens of the batch this node needs, ascending; row `i` of the
    /// request is token `tokens[i]`.
    pub tokens: Vec<u32>,
    /// Per expert on this node, ascending: (rows, weights).
    pub experts: BTreeMap<u32, (Vec<u32>, Vec<f32>)>,
}

impl NodeBatch {
    /// The experts in wire form, by ascending id (the order the node
    /// answers in).
    pub fn expert_rows(&self) -> Vec<ExpertRows> {
        self.experts
            .iter()
            .map(|(&expert, (rows, weights))| ExpertRows {
                expert,
                rows: rows.clone(),
                weights: weights.clone(),
            })
            .collect()
    }

    /// Token-expert pairs in this batch: the rows the node answers with.
    pub fn pairs(&self) -> usize {
        self.experts.values().map(|(rows, _)| rows.len()).sum()
    }

    /// The batch's pairs again, grouped by ascending token: what another
    /// node must compute when this one fails.
    pub fn to_pairs(&self) -> Vec<Pair> {
        let mut pairs: Vec<Pair> = self
            .experts
            .iter()
            .flat_map(|(&expert, (rows, weights))| {
                rows.iter().zip(weights).map(move |(&row, &weight)| Pair {
                    token: self.tokens[row as usize],
                    expert,
                    weight,
                })
            })
            .collect();
        pairs.sort_by_key(|pair| (pair.token, pair.expert));
        pairs
    }
}

/// One token's need of one expert.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pair {
    pub token: u32,
    pub expert: u32,
    pub weight: f32,
}

/// The pairs of `routing`, token by token, each token's routed experts in
/// order and then the shared expert (`shared_expert`) if the model has one.
/// Zero experts (LongCat-Flash's, ids from `routed_experts` on) are not
/// pairs: no node computes them ([`moemesh_core::compute::add_zero_experts`]).
pub fn routing_pairs(
    routing: &Routing,
    shared_expert: Option<u32>,
    routed_experts: usize,
) -> Vec<Pair> {
    let mut pairs = Vec::with_capacity(routing.experts.len() + routing.tokens());
    for token in 0..routing.tokens() {
        let shared = shared_expert
            .zip(routing.shared_weights.as_ref())
            .map(|(expert, weights)| (expert, weights[token]));
        let routed = routing
            .token(token)
            .filter(|&(expert, _)| (expert as usize) < routed_experts);
        for (expert, weight) in routed.chain(shared) {
            pairs.push(Pair {
                token: token as u32,
                expert,
                weight,
            });
        }
    }
    pairs
}

/// Assigns every (token, expert) pair of `routing` to a replica's node and
/// groups the pairs per node, each token sent once to each node it needs.
///
/// `replicas[e]` lists the node indices holding expert `e` (shared last);
/// `picker` chooses among them by outstanding work. Replicas compute the
/// same bits, so the choice never changes a token's output. Returns the
/// experts that were needed but have no replica, if any.
pub fn split_by_node(
    routing: &Routing,
    hidden: &[f32],
    hidden_size: usize,
    replicas: &[Vec<usize>],
    picker: &mut ReplicaPicker,
) -> Result<Vec<NodeBatch>, Vec<u32>> {
    let splitter = PairSplitter::new(routing, hidden, hidden_size, replicas);
    let pairs = routing_pairs(routing, splitter.shared_expert, splitter.routed_experts());
    let every_node = vec![false; picker.nodes()];
    let choice = ReplicaChoice {
        excluded: &every_node,
        avoided_nodes: &every_node,
        avoided_replicas: &[],
    };
    splitter.split(&pairs, picker, choice)
}

/// Which replicas a split may choose for a pair.
#[derive(Debug, Clone, Copy)]
pub struct ReplicaChoice<'a> {
    /// Per node: never chosen (it failed earlier in the forward).
    pub excluded: &'a [bool],
    /// Per node: chosen only for an expert no other allowed node holds
    /// (it failed lately).
    pub avoided_nodes: &'a [bool],
    /// (node, expert): chosen only when no other allowed node holds the
    /// expert (the node said lately that it does not hold it).
    pub avoided_replicas: &'a [(usize, u32)],
}

impl ReplicaChoice<'_> {
    /// Whether `node` is a first choice for `expert`.
    fn prefers(&self, node: usize, expert: u32) -> bool {
        !self.avoided_nodes[node] && !self.avoided_replicas.contains(&(node, expert))
    }
}

/// What splitting one routed batch of a layer by node needs besides the
/// pairs: the batch's token rows and the nodes holding each expert.
#[derive(Debug, Clone, Copy)]
pub struct PairSplitter<'a> {
    /// The batch's token rows, `hidden_size` values each.
    pub hidden: &'a [f32],
    pub hidden_size: usize,
    /// `replicas[e]`: the node indices holding expert `e`, shared last.
    pub replicas: &'a [Vec<usize>],
    /// The shared expert's id when the routing has one.
    pub shared_expert: Option<u32>,
}

impl<'a> PairSplitter<'a> {
    /// A splitter for `routing` of the rows `hidden` over `replicas`.
    pub fn new(
        routing: &Routing,
        hidden: &'a [f32],
        hidden_size: usize,
        replicas: &'a [Vec<usize>],
    ) -> Self {
        let shared_expert = routing
            .shared_weights
            .as_ref()
            .map(|_| (replicas.len() - 1) as u32);
        Self {
            hidden,
            hidden_size,
            replicas,
            shared_expert,
        }
    }

    /// The routed experts the placement holds (the shared expert aside).
    pub fn routed_experts(&self) -> usize {
        self.replicas.len() - usize::from(self.shared_expert.is_some())
    }

    /// [`split_by_node`] for `pairs` (grouped by ascending token), each
    /// pair on a replica `choice` allows, a preferred one where there is.
    pub fn split(
        &self,
        pairs: &[Pair],
        picker: &mut ReplicaPicker,
        choice: ReplicaChoice<'_>,
    ) -> Result<Vec<NodeBatch>, Vec<u32>> {
        let hidden_size = self.hidden_size;
        let mut unplaced = Vec::new();
        let mut batches = vec![NodeBatch::default(); picker.nodes()];
        let mut owners = Vec::new();
        for &Pair {
            token,
            expert,
            weight,
        } in pairs
        {
            let row =
                &self.hidden[token as usize * hidden_size..(token as usize + 1) * hidden_size];
            owners.clear();
            owners.extend(
                self.replicas[expert as usize]
                    .iter()
                    .copied()
                    .filter(|&node| !choice.excluded[node]),
            );
            if owners.is_empty() {
                if !unplaced.contains(&expert) {
                    unplaced.push(expert);
                }
                continue;
            }
            if owners.iter().any(|&node| choice.prefers(node, expert)) {
                owners.retain(|&node| choice.prefers(node, expert));
            }
            let follow_token = Some(expert) == self.shared_expert;
            let node = picker.pick(row, expert, &owners, follow_token, |node| {
                batches[node].tokens.last() == Some(&token)
            });
            let batch = &mut batches[node];
            if batch.tokens.last() != Some(&token) {
                batch.tokens.push(token);
            }
            let request_row = (batch.tokens.len() - 1) as u32;
            let (rows, weights) = batch.experts.entry(expert).or_default();
            rows.push(request_row);
            weights.push(weight);
        }
        if unplaced.is_empty() {
            Ok(batches)
        } else {
            unplaced.sort_unstable();
            Err(unplaced)
        }
    }
}

/// Adds the nodes' weighted expert rows (`replies[i]` answers
/// `batches[i]`: per expert by ascending id, its rows in order) into the
/// output rows of their tokens. Each token's contributions are added in
/// ascending expert order, the order the in-process layer sums in, so the
/// output is the same bits whichever replicas served the token.
pub fn add_expert_rows(
    output: &mut [f32],
    hidden_size: usize,
    batches: &[&NodeBatch],
    replies: &[&[f32]],
) {
    // (expert, batch, first row of the expert in that batch's reply)
    let mut items = Vec::new();
    for (index, batch) in batches.iter().enumerate() {
        let mut offset = 0;
        for (&expert, (rows, _)) in &batch.experts {
            items.push((expert, index, offset));
            offset += rows.len();
        }
    }
    items.sort_unstable();
    for (expert, index, offset) in items {
        let batch = batches[index];
        let (rows, _) = &batch.experts[&expert];
        let reply = replies[index];
        for (pair, &request_row) in rows.iter().enumerate() {
            let token = batch.tokens[request_row as usize] as usize;
            let value = &reply[(offset + pair) * hidden_size..(offset + pair + 1) * hidden_size];
            for (sum, value) in output[token * hidden_size..(token + 1) * hidden_size]
                .iter_mut()
                .zip(value)
            {
                *sum += value;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn picker(nodes: usize) -> ReplicaPicker {
        ReplicaPicker::new(vec![0; nodes], vec![false; nodes])
    }

    /// `tokens` one-expert tokens all routed to expert 0.
    fn to_expert_zero(tokens: usize) -> (Routing, Vec<f32>) {
        let routing = Routing {
            top_k: 1,
            experts: vec![0; tokens],
            weights: vec![1.0; tokens],
            shared_weights: None,
        };
        let hidden = (0..tokens).map(|token| token as f32 * 0.37).collect();
        (routing, hidden)
    }

    #[test]
    fn a_hot_expert_spreads_evenly_over_its_replicas() {
        let (routing, hidden) = to_expert_zero(400);
        let replicas = vec![vec![0, 1, 2, 3]];
        let batches = split_by_node(&routing, &hidden, 1, &replicas, &mut picker(4)).unwrap();
        for batch in &batches {
            let rows = batch.tokens.len();
            assert!((90..=110).contains(&rows), "uneven: {rows} of 400");
        }
    }

    #[test]
    fn busy_nodes_get_less_and_local_nodes_win_ties() {
        let (routing, hidden) = to_expert_zero(100);
        let replicas = vec![vec![0, 1]];
        // Node 0 has 60 pairs in flight: it gets only what evens the load.
        let mut busy = ReplicaPicker::new(vec![60, 0], vec![false, false]);
        let batches = split_by_node(&routing, &hidden, 1, &replicas, &mut busy).unwrap();
        assert!(batches[0].tokens.len() <= 25, "{}", batches[0].tokens.len());
        assert!(batches[1].tokens.len() >= 75);
        // Equal load: the router's own topology group takes the first pick.
        let (routing, hidden) = to_expert_zero(1);
        let mut local_second = ReplicaPicker::new(vec![0, 0], vec![false, true]);
        let batches = split_by_node(&routing, &hidden, 1, &replicas, &mut local_second).unwrap();
        assert_eq!(batches[1].tokens, vec![0]);
    }

    #[test]
    fn a_token_joins_a_node_it_already_goes_to_when_loads_tie() {
        // One token, experts 0 and 1, each on both nodes: both pairs land on
        // one node, so the token is sent once.
        let routing = Routing {
            top_k: 2,
            experts: vec![0, 1],
            weights: vec![0.5, 0.5],
            shared_weights: None,
        };
        let replicas = vec![vec![0, 1], vec![0, 1]];
        let mut tied = ReplicaPicker::new(vec![5, 4], vec![false, false]);
        let batches = split_by_node(&routing, &[0.25, 0.5], 2, &replicas, &mut tied).unwrap();
        let busy: Vec<usize> = batches.iter().map(|batch| batch.tokens.len()).collect();
        assert_eq!(busy, vec![0, 1], "{busy:?}");
    }

    #[test]
    fn a_token_goes_once_to_each_node_it_needs() {
        // 2 tokens, top-2 of 3 experts plus a shared expert (id 3).
        let routing = Routing {
            top_k: 2,
            experts: vec![0, 1, 1, 2],
            weights: vec![0.6, 0.4, 0.7, 0.3],
            shared_weights: Some(vec![0.5, 0.25]),
        };
        // Node 0 holds experts 0 and 1, node 1 holds expert 2 and the shared one.
        let replicas = vec![vec![0], vec![0], vec![1], vec![1]];
        let hidden = [1.0, 2.0, 3.0, 4.0];
        let batches = split_by_node(&routing, &hidden, 2, &replicas, &mut picker(2)).unwrap();
        assert_eq!(batches[0].tokens, vec![0, 1]);
        assert_eq!(batches[0].experts[&0], (vec![0], vec![0.6]));
        assert_eq!(batches[0].experts[&1], (vec![0, 1], vec![0.4, 0.7]));
        assert_eq!(batches[1].tokens, vec![0, 1]);
        assert_eq!(batches[1].experts[&2], (vec![1], vec![0.3]));
        assert_eq!(batches[1].experts[&3], (vec![0, 1], vec![0.5, 0.25]));

        // Node 0 answers expert 0 (token 0), then expert 1 (tokens 0, 1);
        // node 1 expert 2 (token 1), then the shared expert (tokens 0, 1).
        let mut output = vec![0.0; 4];
        let node_0 = [1.0, 1.0, 2.0, 2.0, 3.0, 3.0];
        let node_1 = [10.0, 10.0, 20.0, 20.0, 30.0, 30.0];
        assert_eq!((batches[0].pairs(), batches[1].pairs()), (3, 3));
        add_expert_rows(
            &mut output,
            2,
            &[&batches[0], &batches[1]],
            &[&node_0, &node_1],
        );
        assert_eq!(
            output,
            vec![1.0 + 2.0 + 20.0, 23.0, 3.0 + 10.0 + 30.0, 43.0]
        );
    }

    #[test]
    fn experts_without_a_replica_are_named() {
        let routing = Routing {
            top_k: 2,
            experts: vec![0, 2, 1, 2],
            weights: vec![0.5; 4],
            shared_weights: None,
        };
        let replicas = vec![vec![0], vec![], vec![]];
        assert_eq!(
            split_by_node(&routing, &[1.0, 2.0], 1, &replicas, &mut picker(1)),
            Err(vec![1, 2])
        );
    }

    #[test]
    fn nodes_without_work_get_an_empty_batch() {
        let routing = Routing {
            top_k: 1,
            experts: vec![0],
            weights: vec![1.0],
            shared_weights: None,
        };
        let batches =
            split_by_node(&routing, &[1.0], 1, &[vec![1], vec![0]], &mut picker(3)).unwrap();
        assert!(batches[0].tokens.is_empty() && batches[2].tokens.is_empty());
        assert_eq!(batches[1].tokens, vec![0]);
    }

    #[test]
    fn avoided_replicas_serve_only_experts_no_other_allowed_node_holds() {
        // Expert 0 on nodes 0 and 1, expert 1 on node 1 alone, expert 2 on
        // nodes 1 and 2; one token needs each.
        let routing = Routing {
            top_k: 3,
            experts: vec![0, 1, 2],
            weights: vec![0.5, 0.25, 0.25],
            shared_weights: None,
        };
        let replicas = vec![vec![0, 1], vec![1], vec![1, 2]];
        let splitter = PairSplitter::new(&routing, &[1.0], 1, &replicas);
        let pairs = routing_pairs(&routing, None, replicas.len());
        let experts_per_node = |choice: ReplicaChoice<'_>| {
            splitter
                .split(&pairs, &mut picker(3), choice)
                .map(|batches| {
                    batches
                        .iter()
                        .map(|batch| batch.experts.keys().copied().collect::<Vec<_>>())
                        .collect::<Vec<_>>()
                })
        };
        // Node 1 said it does not hold experts 1 and 2: expert 2 goes to
        // node 2, expert 1 stays on node 1, its only replica.
        let none = [false; 3];
        let stale = ReplicaChoice {
            excluded: &none,
            avoided_nodes: &none,
            avoided_replicas: &[(1, 1), (1, 2)],
        };
        let batches = experts_per_node(stale).unwrap();
        assert_eq!(batches[2], vec![2]);
        assert!(batches[1].contains(&1) && !batches[1].contains(&2));
        // Node 1 failed lately: it serves only expert 1.
        let failed_lately = ReplicaChoice {
            excluded: &none,
            avoided_nodes: &[false, true, false],
            avoided_replicas: &[],
        };
        assert_eq!(
            experts_per_node(failed_lately).unwrap(),
            vec![vec![0], vec![1], vec![2]]
        );
        // Node 1 failed in this forward: expert 1 has no replica left.
        let failed_now = ReplicaChoice {
            excluded: &[false, true, false],
            avoided_nodes: &none,
            avoided_replicas: &[],
        };
        assert_eq!(experts_per_node(failed_now), Err(vec![1]));
    }
}
