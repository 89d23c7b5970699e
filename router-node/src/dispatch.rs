//! Splitting a routed batch into one request per expert node, and summing
//! the nodes' partial rows back into one output row per token.

use std::collections::BTreeMap;

use moemesh_core::gating::Routing;
use moemesh_core::placement::replica_for_token;
use moemesh_proto::v1::ExpertRows;

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
    /// Moves the experts out in wire form, by ascending id; the tokens
    /// stay for combining the reply.
    pub fn take_expert_rows(&mut self) -> Vec<ExpertRows> {
        std::mem::take(&mut self.experts)
            .into_iter()
            .map(|(expert, (rows, weights))| ExpertRows {
                expert,
                rows,
                weights,
            })
            .collect()
    }
}

/// Assigns every (token, expert) pair of `routing` to a replica's node and
/// groups the pairs per node, each token sent once to each node it needs.
///
/// `replicas[e]` lists the node indices holding expert `e` (shared last);
/// the replica is chosen from the token's own values, so a token's
/// dispatch never depends on the rest of its batch. Returns the experts
/// that were needed but have no replica, if any.
pub fn split_by_node(
    routing: &Routing,
    hidden: &[f32],
    hidden_size: usize,
    replicas: &[Vec<usize>],
    node_count: usize,
) -> Result<Vec<NodeBatch>, Vec<u32>> {
    let mut unplaced = Vec::new();
    let mut batches = vec![NodeBatch::default(); node_count];
    let shared_expert = routing
        .shared_weights
        .as_ref()
        .map(|_| (replicas.len() - 1) as u32);
    for token in 0..routing.tokens() {
        let row = &hidden[token * hidden_size..(token + 1) * hidden_size];
        let shared = shared_expert
            .zip(routing.shared_weights.as_ref())
            .map(|(expert, weights)| (expert, weights[token]));
        for (expert, weight) in routing.token(token).chain(shared) {
            let owners = &replicas[expert as usize];
            if owners.is_empty() {
                if !unplaced.contains(&expert) {
                    unplaced.push(expert);
                }
                continue;
            }
            let node = owners[replica_for_token(row, expert, owners.len())];
            let batch = &mut batches[node];
            if batch.tokens.last() != Some(&(token as u32)) {
                batch.tokens.push(token as u32);
            }
            let request_row = (batch.tokens.len() - 1) as u32;
            let (rows, weights) = batch.experts.entry(expert).or_default();
            rows.push(request_row);
            weights.push(weight);
        }
    }
    if unplaced.is_empty() {
        Ok(batches)
    } else {
        unplaced.sort_unstable();
        Err(unplaced)
    }
}

/// Adds one node's partial rows (`[batch.tokens.len(), hidden]`) into the
/// output rows of its tokens. Callers add nodes in a fixed order.
pub fn add_partials(output: &mut [f32], hidden_size: usize, batch: &NodeBatch, partials: &[f32]) {
    for (&token, partial) in batch.tokens.iter().zip(partials.chunks_exact(hidden_size)) {
        let token = token as usize;
        for (sum, value) in output[token * hidden_size..(token + 1) * hidden_size]
            .iter_mut()
            .zip(partial)
        {
            *sum += value;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let batches = split_by_node(&routing, &hidden, 2, &replicas, 2).unwrap();
        assert_eq!(batches[0].tokens, vec![0, 1]);
        assert_eq!(batches[0].experts[&0], (vec![0], vec![0.6]));
        assert_eq!(batches[0].experts[&1], (vec![0, 1], vec![0.4, 0.7]));
        assert_eq!(batches[1].tokens, vec![0, 1]);
        assert_eq!(batches[1].experts[&2], (vec![1], vec![0.3]));
        assert_eq!(batches[1].experts[&3], (vec![0, 1], vec![0.5, 0.25]));

        let mut output = vec![0.0; 4];
        add_partials(&mut output, 2, &batches[0], &[1.0, 1.0, 2.0, 2.0]);
        add_partials(&mut output, 2, &batches[1], &[10.0, 10.0, 20.0, 20.0]);
        assert_eq!(output, vec![11.0, 11.0, 22.0, 22.0]);
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
            split_by_node(&routing, &[1.0, 2.0], 1, &replicas, 1),
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
        let batches = split_by_node(&routing, &[1.0], 1, &[vec![1], vec![0]], 3).unwrap();
        assert!(batches[0].tokens.is_empty() && batches[2].tokens.is_empty());
        assert_eq!(batches[1].tokens, vec![0]);
    }
}
