//! The fan-out: one forward's routed batch split by expert node, every
//! node's share sent at once, and the answers gathered. The share of a node
//! that does not answer or refuses the work is split again over other
//! replicas of its experts, never a node that failed in this forward, for
//! at most [`MAX_RETRIES`] more rounds and while the deadline allows: expert
//! compute has no side effects, so a retry is always safe. The answers are
//! summed per token in ascending expert order, so the output is the same
//! bits whichever replicas served it and in whichever round.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use moemesh_core::model::gating::Routing;
use tokio::sync::watch;

use crate::dispatch::{
    NodeBatch, Pair, PairSplitter, ReplicaPicker, add_expert_rows, routing_pairs,
};
use crate::health::{NodeHealth, recently_failed};
use crate::node_call::{FailureKind, NodeAnswer, NodeCall, NodeFailure};
use crate::table::RoutingTable;
use crate::{RouterError, RouterResult};

/// What a forward of one layer gives back.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LayerOutput {
    /// One output row per token, row-major.
    pub rows: Vec<f32>,
    /// The slowest expert node's compute time: the rest of the latency is
    /// dispatch.
    pub slowest_compute_micros: u64,
}

/// Rounds of retries of failed shares after the first try, at most.
const MAX_RETRIES: usize = 3;

/// What every forward of a router uses to reach the expert nodes.
pub struct ExpertFanOut {
    /// The model id every `ComputeRequest` names.
    model_id: String,
    /// This router's topology group: replicas there win ties. Empty: none.
    group: String,
    /// The current routing table; a placement file sets it once, the
    /// coordinators' placement stream replaces it at every epoch.
    table_rx: watch::Receiver<Arc<RoutingTable>>,
    /// Which nodes failed lately, and who hears of it.
    health: NodeHealth,
}

impl ExpertFanOut {
    /// A fan-out for the forwards of `model_id` by a router in topology
    /// group `group`, routing by the tables `table_rx` receives.
    pub fn new(
        model_id: String,
        group: String,
        table_rx: watch::Receiver<Arc<RoutingTable>>,
        health: NodeHealth,
    ) -> Self {
        Self {
            model_id,
            group,
            table_rx,
            health,
        }
    }

    /// Starts a forward of `layer` on the current routing table, which the
    /// forward keeps to its end whatever epochs come meanwhile, taking each
    /// node's outstanding work and health as they are now.
    pub fn start(&self, layer: usize, hidden_size: usize) -> LayerFanOut {
        let table = self.table_rx.borrow().clone();
        let picker = ReplicaPicker::new(
            table
                .links
                .iter()
                .map(|link| link.in_flight.load(Ordering::Relaxed))
                .collect(),
            table
                .links
                .iter()
                .map(|link| !self.group.is_empty() && link.group == self.group)
                .collect(),
        );
        let avoided = recently_failed(&table.links);
        LayerFanOut {
            table,
            layer,
            hidden_size,
            picker,
            avoided,
            shared_expert: None,
        }
    }
}

/// One forward's fan-out of one layer over the routing table it started
/// with: [`LayerFanOut::split`] once, then [`LayerFanOut::run`].
pub struct LayerFanOut {
    table: Arc<RoutingTable>,
    layer: usize,
    hidden_size: usize,
    /// Chooses among replicas; counts what this forward gave each node.
    picker: ReplicaPicker,
    /// Per node: failed lately when the forward started, so left out while
    /// another replica can serve.
    avoided: Vec<bool>,
    /// The shared expert's id when the model has one; set by `split`.
    shared_expert: Option<u32>,
}

impl LayerFanOut {
    /// Splits `routing` of the rows `hidden` into one share per node,
    /// leaving out nodes that failed lately unless that leaves an expert
    /// without a replica. CPU work: large batches run it off the async
    /// workers.
    pub fn split(&mut self, routing: &Routing, hidden: &[f32]) -> RouterResult<Vec<NodeBatch>> {
        let Some(replicas) = self.table.placement.replicas(self.layer) else {
            return Err(self.no_live_replica(routing.experts.clone()));
        };
        let splitter = PairSplitter::new(routing, hidden, self.hidden_size, replicas);
        self.shared_expert = splitter.shared_expert;
        let pairs = routing_pairs(routing, splitter.shared_expert);
        let mut trial = self.picker.clone();
        let batches = match splitter.split(&pairs, &mut trial, &self.avoided) {
            Ok(batches) => {
                self.picker = trial;
                Ok(batches)
            }
            Err(_) => splitter.split(&pairs, &mut self.picker, &vec![false; self.avoided.len()]),
        };
        batches.map_err(|experts| self.no_live_replica(experts))
    }

    /// Sends every node its share of `batches` (rows taken from `hidden`)
    /// at once and gathers the answers, retrying failed shares elsewhere
    /// until `deadline`.
    pub async fn run(
        mut self,
        fanout: &ExpertFanOut,
        hidden: &[f32],
        batches: Vec<NodeBatch>,
        deadline: Instant,
    ) -> RouterResult<LayerOutput> {
        let mut failed = vec![false; self.table.links.len()];
        let mut pending = busy_batches(batches);
        let mut answered: Vec<(NodeBatch, Vec<f32>)> = Vec::new();
        let mut slowest_compute = 0;
        for attempt in 0.. {
            let results = self.send_all(fanout, hidden, &pending, deadline).await;
            let mut retry = Vec::new();
            let mut last_failure = None;
            for ((node, batch), result) in std::mem::take(&mut pending).into_iter().zip(results) {
                match result {
                    Ok(answer) => {
                        slowest_compute = slowest_compute.max(answer.compute_micros);
                        answered.push((batch, answer.partials));
                    }
                    Err(failure) if failure.kind.is_retryable() => {
                        failed[node] = true;
                        if failure.kind == FailureKind::Unreachable {
                            let link = &self.table.links[node];
                            fanout.health.mark_unreachable(link, &failure.message);
                            tracing::warn!(node = %link.node.id, error = %failure, "expert node failed; retrying its share elsewhere");
                        }
                        retry.extend(batch.to_pairs());
                        last_failure = Some(failure);
                    }
                    Err(failure) => return Err(failure.into()),
                }
            }
            let Some(last_failure) = last_failure else {
                break;
            };
            if Instant::now() >= deadline {
                return Err(RouterError::DeadlineExceeded(format!(
                    "the deadline passed before every expert node answered; last failure: {last_failure}"
                )));
            }
            if attempt >= MAX_RETRIES {
                return Err(last_failure.into());
            }
            retry.sort_by_key(|pair| (pair.token, pair.expert));
            pending = busy_batches(self.resplit(&retry, hidden, &failed, last_failure)?);
        }
        Ok(LayerOutput {
            rows: combine(&answered, hidden.len(), self.hidden_size),
            slowest_compute_micros: slowest_compute,
        })
    }

    /// Sends every pending share at once; the results come back in the
    /// order of `pending`.
    async fn send_all(
        &self,
        fanout: &ExpertFanOut,
        hidden: &[f32],
        pending: &[(usize, NodeBatch)],
        deadline: Instant,
    ) -> Vec<Result<NodeAnswer, NodeFailure>> {
        let calls: Vec<NodeCall> = pending
            .iter()
            .map(|(node, batch)| {
                NodeCall::new(
                    &self.table.links[*node],
                    &fanout.model_id,
                    self.layer,
                    hidden,
                    self.hidden_size,
                    batch,
                    deadline,
                )
            })
            .collect();
        futures::future::join_all(calls.into_iter().map(NodeCall::send)).await
    }

    /// Splits the pairs of failed shares over the other replicas of their
    /// experts, never a node marked in `failed`; `last_failure` explains
    /// the error when some expert has no such replica left.
    fn resplit(
        &mut self,
        retry: &[Pair],
        hidden: &[f32],
        failed: &[bool],
        last_failure: NodeFailure,
    ) -> RouterResult<Vec<NodeBatch>> {
        let Some(replicas) = self.table.placement.replicas(self.layer) else {
            return Err(self.no_live_replica(retry.iter().map(|pair| pair.expert).collect()));
        };
        let splitter = PairSplitter {
            hidden,
            hidden_size: self.hidden_size,
            replicas,
            shared_expert: self.shared_expert,
        };
        splitter.split(retry, &mut self.picker, failed).map_err(|experts| {
            let overloaded = last_failure.kind == FailureKind::Overloaded;
            let reason = if overloaded {
                "every replica is overloaded"
            } else {
                "no live replica left"
            };
            let message = format!(
                "layer {} experts {experts:?}: {reason} (placement epoch {}); last failure: {last_failure}",
                self.layer, self.table.epoch
            );
            if overloaded {
                RouterError::Overloaded(message)
            } else {
                RouterError::Unavailable(message)
            }
        })
    }

    /// The error for experts of this layer that no usable node holds.
    fn no_live_replica(&self, mut experts: Vec<u32>) -> RouterError {
        experts.sort_unstable();
        experts.dedup();
        RouterError::Unavailable(format!(
            "no live replica of layer {} experts {experts:?} (placement epoch {})",
            self.layer, self.table.epoch
        ))
    }
}

/// The batches that have work, with their node index.
fn busy_batches(batches: Vec<NodeBatch>) -> Vec<(usize, NodeBatch)> {
    batches
        .into_iter()
        .enumerate()
        .filter(|(_, batch)| !batch.tokens.is_empty())
        .collect()
}

/// Sums the answered shares into `output_len` values of token rows, each
/// token's experts in ascending id order whatever round answered them.
fn combine(answered: &[(NodeBatch, Vec<f32>)], output_len: usize, hidden_size: usize) -> Vec<f32> {
    let mut output = vec![0f32; output_len];
    let batches: Vec<&NodeBatch> = answered.iter().map(|(batch, _)| batch).collect();
    let replies: Vec<&[f32]> = answered.iter().map(|(_, reply)| reply.as_slice()).collect();
    add_expert_rows(&mut output, hidden_size, &batches, &replies);
    output
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use moemesh_core::model::placement::{NodeEntry, Placement};
    use moemesh_proto::tls::TlsConfig;

    use super::*;
    use crate::health::{UNHEALTHY_FOR_MS, health_clock};

    /// A share of one token (token 0) for `experts`, each weighted 1.
    fn share(experts: &[u32]) -> NodeBatch {
        NodeBatch {
            tokens: vec![0],
            experts: experts
                .iter()
                .map(|&expert| (expert, (vec![0], vec![1.0])))
                .collect::<BTreeMap<_, _>>(),
        }
    }

    #[test]
    fn answers_gathered_over_several_rounds_sum_as_in_one() {
        // Expert 0 + expert 1 first, then expert 2: the sum rounds the
        // other way when expert 2 comes first.
        let (big, small) = (1.0e8f32, 1.0f32);
        let in_one_round = combine(&[(share(&[0, 1, 2]), vec![big, small, -big])], 1, 1);
        let retried_first = [
            (share(&[2]), vec![-big]),
            (share(&[0]), vec![big]),
            (share(&[1]), vec![small]),
        ];
        let over_rounds = combine(&retried_first, 1, 1);
        assert_eq!(in_one_round[0].to_bits(), over_rounds[0].to_bits());
        assert_eq!(in_one_round, vec![(big + small) - big]);
    }

    #[test]
    fn only_nodes_with_work_are_called() {
        let busy = busy_batches(vec![
            NodeBatch::default(),
            share(&[1]),
            NodeBatch::default(),
        ]);
        let nodes: Vec<usize> = busy.iter().map(|(node, _)| *node).collect();
        assert_eq!(nodes, vec![1]);
    }

    /// A fan-out of layer 0 over three nodes: expert 0 on nodes 0 and 1,
    /// expert 1 on node 2 alone; `failed_lately` nodes failed a moment ago.
    fn expert_fan_out(failed_lately: &[usize]) -> ExpertFanOut {
        let nodes = (0..3)
            .map(|index| NodeEntry {
                id: format!("node-{index}"),
                address: format!("http://127.0.0.1:{}", index + 1),
            })
            .collect();
        let layers = HashMap::from([(0, vec![vec![0, 1], vec![2]])]);
        let placement = Placement::from_parts(nodes, layers);
        let table = RoutingTable::new(7, placement, &[], None, &TlsConfig::plaintext()).unwrap();
        for &node in failed_lately {
            let until = health_clock() + UNHEALTHY_FOR_MS;
            table.links[node]
                .unhealthy_until
                .store(until, Ordering::Relaxed);
        }
        let (_table_tx, table_rx) = watch::channel(Arc::new(table));
        ExpertFanOut::new(
            "model".into(),
            String::new(),
            table_rx,
            NodeHealth::without_coordinators(),
        )
    }

    fn fan_out(failed_lately: &[usize]) -> LayerFanOut {
        expert_fan_out(failed_lately).start(0, 1)
    }

    fn to_expert(expert: u32, tokens: usize) -> Routing {
        Routing {
            top_k: 1,
            experts: vec![expert; tokens],
            weights: vec![1.0; tokens],
            shared_weights: None,
        }
    }

    fn tokens_per_node(batches: &[NodeBatch]) -> Vec<usize> {
        batches.iter().map(|batch| batch.tokens.len()).collect()
    }

    #[tokio::test]
    async fn nodes_that_failed_lately_are_left_out_while_another_replica_serves() {
        let hidden: Vec<f32> = (0..50).map(|token| token as f32 * 0.37).collect();
        let mut healthy = fan_out(&[]);
        let spread = healthy.split(&to_expert(0, 50), &hidden).unwrap();
        assert!(
            tokens_per_node(&spread)[..2]
                .iter()
                .all(|&tokens| tokens > 0)
        );

        let mut one_failed = fan_out(&[0]);
        let batches = one_failed.split(&to_expert(0, 50), &hidden).unwrap();
        assert_eq!(tokens_per_node(&batches), vec![0, 50, 0]);
    }

    #[tokio::test]
    async fn a_node_that_failed_lately_still_serves_experts_nobody_else_holds() {
        let mut sole_owner_failed = fan_out(&[2]);
        let batches = sole_owner_failed
            .split(&to_expert(1, 2), &[0.5, 0.25])
            .unwrap();
        assert_eq!(tokens_per_node(&batches), vec![0, 0, 2]);
    }

    #[tokio::test]
    async fn a_layer_missing_from_the_table_names_its_experts() {
        let mut fanout = fan_out(&[]);
        fanout.layer = 3;
        let error = fanout.split(&to_expert(1, 2), &[0.5, 0.25]).unwrap_err();
        assert_eq!(
            error.to_string(),
            "no live replica of layer 3 experts [1] (placement epoch 7)"
        );
    }

    #[tokio::test]
    async fn a_forward_whose_deadline_passed_says_so_and_one_without_replicas_too() {
        // Nothing listens at the table's addresses: every call fails.
        let fanout = expert_fan_out(&[]);
        let hidden = [0.5, 0.25];
        let mut late = fanout.start(0, 1);
        let batches = late.split(&to_expert(1, 2), &hidden).unwrap();
        let error = late
            .run(&fanout, &hidden, batches, Instant::now())
            .await
            .unwrap_err();
        assert!(matches!(error, RouterError::DeadlineExceeded(_)), "{error}");

        let mut in_time = fanout.start(0, 1);
        let batches = in_time.split(&to_expert(1, 2), &hidden).unwrap();
        let deadline = Instant::now() + std::time::Duration::from_secs(30);
        let error = in_time
            .run(&fanout, &hidden, batches, deadline)
            .await
            .unwrap_err();
        assert!(matches!(error, RouterError::Unavailable(_)), "{error}");
    }
}
