//! The fan-out: one forward's routed batch split by expert node, every
//! node's share sent at once, and the answers gathered.
//!
//! The share of a node that does not answer, refuses the work or no longer
//! holds an expert (a stale replica) is split again over other replicas of
//! its experts, never a node that failed in this forward, for at most
//! [`MAX_RETRIES`] more rounds and while the deadline allows: expert
//! compute has no side effects, so a retry is always safe. An attempt that
//! another replica could take over gets half of what remains of the
//! deadline, so a node that hangs still leaves the retry time to answer. A
//! request error (a bad request, a reply over a size limit) fails the
//! forward at once and marks no node: another replica would fail it the
//! same way.
//!
//! The answers are summed per token in ascending expert order, so the
//! output is the same bits whichever replicas served it and in whichever
//! round.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use moemesh_core::model::gating::Routing;
use tokio::sync::watch;

use crate::dispatch::{
    NodeBatch, Pair, PairSplitter, ReplicaChoice, ReplicaPicker, add_expert_rows, routing_pairs,
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
    /// Which nodes failed lately and which replicas are stale, and who
    /// hears of it.
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
        let stale = self.health.stale_replicas(table.epoch, &table.links, layer);
        LayerFanOut {
            table,
            layer,
            hidden_size,
            picker,
            avoided,
            stale,
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
    /// (node, expert) of this layer whose node said lately that it does not
    /// hold the expert, so left out while another replica can serve.
    stale: Vec<(usize, u32)>,
    /// The shared expert's id when the model has one; set by `split`.
    shared_expert: Option<u32>,
}

/// A node's share that failed in one round of a forward.
struct FailedShare {
    /// The share's experts, ascending.
    experts: Vec<u32>,
    /// The share's pairs, to be split again over other replicas.
    pairs: Vec<Pair>,
    failure: NodeFailure,
}

impl LayerFanOut {
    /// Splits `routing` of the rows `hidden` into one share per node,
    /// leaving out nodes that failed lately and stale replicas wherever
    /// another replica holds the expert. CPU work: large batches run it
    /// off the async workers.
    pub fn split(&mut self, routing: &Routing, hidden: &[f32]) -> RouterResult<Vec<NodeBatch>> {
        let Some(replicas) = self.table.placement.replicas(self.layer) else {
            return Err(self.no_live_replica(routing.experts.clone()));
        };
        let splitter = PairSplitter::new(routing, hidden, self.hidden_size, replicas);
        self.shared_expert = splitter.shared_expert;
        let pairs = routing_pairs(routing, splitter.shared_expert, splitter.routed_experts());
        let none_failed = vec![false; self.avoided.len()];
        let choice = ReplicaChoice {
            excluded: &none_failed,
            avoided_nodes: &self.avoided,
            avoided_replicas: &self.stale,
        };
        splitter
            .split(&pairs, &mut self.picker, choice)
            .map_err(|experts| self.no_live_replica(experts))
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
        let mut attempt = 0;
        loop {
            let retries_left = attempt < MAX_RETRIES;
            let results = self
                .send_all(fanout, hidden, &pending, &failed, deadline, retries_left)
                .await;
            let mut failures = Vec::new();
            for ((node, batch), result) in std::mem::take(&mut pending).into_iter().zip(results) {
                match result {
                    Ok(answer) => {
                        slowest_compute = slowest_compute.max(answer.compute_micros);
                        answered.push((batch, answer.partials));
                    }
                    Err(failure) => {
                        self.note_failure(fanout, node, &failure);
                        failed[node] = true;
                        failures.push(FailedShare {
                            experts: batch.experts.keys().copied().collect(),
                            pairs: batch.to_pairs(),
                            failure,
                        });
                    }
                }
            }
            let Some(last) = failures.last() else {
                return Ok(LayerOutput {
                    rows: combine(&answered, hidden.len(), self.hidden_size),
                    slowest_compute_micros: slowest_compute,
                });
            };
            if let Some(rejected) = failures
                .iter()
                .position(|share| !share.failure.kind.is_retryable())
            {
                return Err(failures.swap_remove(rejected).failure.into());
            }
            if Instant::now() >= deadline {
                return Err(RouterError::DeadlineExceeded(format!(
                    "the deadline passed before every expert node answered; last failure: {}",
                    last.failure
                )));
            }
            if !retries_left {
                return Err(failures.swap_remove(failures.len() - 1).failure.into());
            }
            pending = busy_batches(self.resplit(hidden, &failed, failures)?);
            attempt += 1;
        }
    }

    /// Sends every pending share at once; the results come back in the
    /// order of `pending`. A share that another replica could take over if
    /// this attempt fails gets half of what remains of the deadline, any
    /// other share all of it.
    async fn send_all(
        &self,
        fanout: &ExpertFanOut,
        hidden: &[f32],
        pending: &[(usize, NodeBatch)],
        failed: &[bool],
        deadline: Instant,
        retries_left: bool,
    ) -> Vec<Result<NodeAnswer, NodeFailure>> {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let calls: Vec<NodeCall> = pending
            .iter()
            .map(|(node, batch)| {
                let retry_possible =
                    retries_left && self.another_replica_holds(*node, batch, failed);
                NodeCall::new(
                    &self.table.links[*node],
                    &fanout.model_id,
                    self.layer,
                    hidden,
                    self.hidden_size,
                    batch,
                    attempt_timeout(remaining, retry_possible),
                )
            })
            .collect();
        futures::future::join_all(calls.into_iter().map(NodeCall::send)).await
    }

    /// Whether every expert of `batch` has a replica other than `node`
    /// that has not failed in this forward.
    fn another_replica_holds(&self, node: usize, batch: &NodeBatch, failed: &[bool]) -> bool {
        let Some(replicas) = self.table.placement.replicas(self.layer) else {
            return false;
        };
        batch.experts.keys().all(|&expert| {
            replicas
                .get(expert as usize)
                .is_some_and(|owners| owners.iter().any(|&other| other != node && !failed[other]))
        })
    }

    /// Records what a node's failure says about the node: one that did not
    /// answer is avoided for a while, a stale replica's experts are avoided
    /// on it, and the coordinators hear of both. Overload and request
    /// errors say nothing against the node.
    fn note_failure(&self, fanout: &ExpertFanOut, node: usize, failure: &NodeFailure) {
        let link = &self.table.links[node];
        match failure.kind {
            FailureKind::Unreachable => {
                fanout.health.mark_unreachable(link, &failure.message);
                tracing::warn!(node = %link.node.id, error = %failure, "expert node failed; retrying its share elsewhere");
            }
            FailureKind::StaleReplica => {
                let missing = &failure.missing_experts;
                fanout
                    .health
                    .mark_stale(self.table.epoch, link, self.layer, missing);
                tracing::warn!(node = %link.node.id, layer = self.layer, experts = ?missing, error = %failure, "stale replica: expert node does not hold its experts; retrying its share elsewhere");
            }
            FailureKind::Overloaded => {
                tracing::debug!(node = %link.node.id, "expert node overloaded; retrying its share elsewhere");
            }
            FailureKind::Rejected(_) => {
                tracing::debug!(node = %link.node.id, error = %failure, "expert node rejected its share");
            }
        }
    }

    /// Splits the pairs of the `failures`' shares over the other replicas
    /// of their experts, never a node marked in `failed`.
    fn resplit(
        &mut self,
        hidden: &[f32],
        failed: &[bool],
        failures: Vec<FailedShare>,
    ) -> RouterResult<Vec<NodeBatch>> {
        let mut retry: Vec<Pair> = failures
            .iter()
            .flat_map(|share| share.pairs.iter().copied())
            .collect();
        retry.sort_by_key(|pair| (pair.token, pair.expert));
        let Some(replicas) = self.table.placement.replicas(self.layer) else {
            return Err(self.no_live_replica(retry.iter().map(|pair| pair.expert).collect()));
        };
        let splitter = PairSplitter {
            hidden,
            hidden_size: self.hidden_size,
            replicas,
            shared_expert: self.shared_expert,
        };
        let choice = ReplicaChoice {
            excluded: failed,
            avoided_nodes: &self.avoided,
            avoided_replicas: &self.stale,
        };
        splitter
            .split(&retry, &mut self.picker, choice)
            .map_err(|experts| self.no_replica_left(experts, failures))
    }

    /// The error for `experts` whose every replica failed in this forward,
    /// explained by the failure of a share that held them.
    fn no_replica_left(&self, experts: Vec<u32>, mut failures: Vec<FailedShare>) -> RouterError {
        let cause = failures
            .iter()
            .position(|share| share.experts.iter().any(|expert| experts.contains(expert)))
            .unwrap_or(failures.len() - 1);
        let cause = failures.swap_remove(cause).failure;
        let reason = match cause.kind {
            FailureKind::Overloaded => "every replica is overloaded",
            FailureKind::StaleReplica => "no other replica holds them",
            _ => "no live replica left",
        };
        let message = format!(
            "layer {} experts {experts:?}: {reason} (placement epoch {}); last failure: {cause}",
            self.layer, self.table.epoch
        );
        if cause.kind == FailureKind::Overloaded {
            RouterError::Overloaded(message)
        } else {
            RouterError::Unavailable(message)
        }
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

/// The part of what remains of a forward's deadline that one attempt at a
/// share gets: half when another replica could take the share over, so
/// that a node that hangs still leaves the retry as long as it had; all of
/// it when no retry could follow.
fn attempt_timeout(remaining: Duration, retry_possible: bool) -> Duration {
    if retry_possible {
        remaining / 2
    } else {
        remaining
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

    #[test]
    fn an_attempt_that_another_replica_could_take_over_gets_half_of_what_remains() {
        let remaining = Duration::from_secs(8);
        assert_eq!(attempt_timeout(remaining, true), Duration::from_secs(4));
        assert_eq!(attempt_timeout(remaining, false), remaining);
    }

    #[tokio::test]
    async fn an_attempt_is_short_only_where_another_live_replica_holds_every_expert() {
        let fanout = fan_out(&[]);
        let none_failed = [false; 3];
        // Expert 0 is on nodes 0 and 1; expert 1 on node 2 alone.
        assert!(fanout.another_replica_holds(0, &share(&[0]), &none_failed));
        assert!(!fanout.another_replica_holds(0, &share(&[0]), &[false, true, false]));
        assert!(!fanout.another_replica_holds(2, &share(&[1]), &none_failed));
        assert!(fanout.another_replica_holds(0, &share(&[0, 1]), &none_failed));
        assert!(!fanout.another_replica_holds(2, &share(&[0, 1]), &none_failed));
    }

    /// How a fake expert node answers `Compute`.
    #[derive(Clone, Copy)]
    enum FakeAnswer {
        /// Every requested row is ones.
        Ones,
        /// Fails with this status.
        Fails(tonic::Code, &'static str),
    }

    /// An expert node that answers every call the same way, counting calls.
    struct FakeNode {
        answer: FakeAnswer,
        calls: Arc<std::sync::atomic::AtomicUsize>,
    }

    #[tonic::async_trait]
    impl moemesh_proto::ExpertService for FakeNode {
        async fn compute(
            &self,
            request: tonic::Request<moemesh_proto::ComputeRequest>,
        ) -> Result<tonic::Response<moemesh_proto::ComputeResponse>, tonic::Status> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            let pairs = request
                .get_ref()
                .experts
                .iter()
                .map(|expert| expert.rows.len())
                .sum::<usize>();
            match self.answer {
                FakeAnswer::Ones => Ok(tonic::Response::new(moemesh_proto::ComputeResponse {
                    output: Some(moemesh_proto::codec::encode(
                        &vec![1.0; pairs],
                        &[pairs, 1],
                        moemesh_proto::codec::WireDtype::F32,
                    )),
                    compute_micros: 1,
                })),
                FakeAnswer::Fails(code, message) => Err(tonic::Status::new(code, message)),
            }
        }

        async fn info(
            &self,
            _request: tonic::Request<moemesh_proto::InfoRequest>,
        ) -> Result<tonic::Response<moemesh_proto::InfoResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("a fake expert node"))
        }
    }

    /// Serves one fake node per answer on 127.0.0.1 and returns a fan-out
    /// of layer 0, hidden size 1, whose expert 0 they all hold, with each
    /// node's call counter.
    async fn fake_replicas(
        answers: &[FakeAnswer],
        health: NodeHealth,
    ) -> (ExpertFanOut, Vec<Arc<std::sync::atomic::AtomicUsize>>) {
        let mut nodes = Vec::new();
        let mut calls = Vec::new();
        for (index, &answer) in answers.iter().enumerate() {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = format!("http://{}", listener.local_addr().unwrap());
            let counter = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let node = FakeNode {
                answer,
                calls: Arc::clone(&counter),
            };
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(moemesh_proto::ExpertServiceServer::new(node))
                    .serve_with_incoming(moemesh_proto::incoming_without_delay(listener)),
            );
            nodes.push(NodeEntry {
                id: format!("node-{index}"),
                address,
            });
            calls.push(counter);
        }
        let layers = HashMap::from([(0, vec![(0..answers.len()).collect()])]);
        let placement = Placement::from_parts(nodes, layers);
        let table = RoutingTable::new(3, placement, &[], None, &TlsConfig::plaintext()).unwrap();
        let (_table_tx, table_rx) = watch::channel(Arc::new(table));
        let fanout = ExpertFanOut::new("model".into(), String::new(), table_rx, health);
        (fanout, calls)
    }

    /// Forwards 50 tokens, all routed to expert 0 with weight 1.
    async fn forward_to_expert_zero(fanout: &ExpertFanOut) -> RouterResult<LayerOutput> {
        let hidden: Vec<f32> = (0..50).map(|token| token as f32 * 0.37).collect();
        let mut layer = fanout.start(0, 1);
        let batches = layer.split(&to_expert(0, 50), &hidden)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        layer.run(fanout, &hidden, batches, deadline).await
    }

    #[tokio::test]
    async fn a_stale_replicas_share_goes_to_another_replica_and_the_coordinators_hear() {
        for stale_answer in [
            FakeAnswer::Fails(tonic::Code::FailedPrecondition, "not held: layer 0"),
            FakeAnswer::Fails(
                tonic::Code::InvalidArgument,
                "expert 0 of layer 0 is not held here; held: {}",
            ),
        ] {
            let (reports_tx, mut reports_rx) = tokio::sync::mpsc::channel(8);
            let health = NodeHealth::with_reports(Some(reports_tx));
            let (fanout, calls) = fake_replicas(&[stale_answer, FakeAnswer::Ones], health).await;
            let output = forward_to_expert_zero(&fanout).await.unwrap();
            assert_eq!(output.rows, vec![1.0; 50]);
            assert_eq!(
                calls[0].load(Ordering::Relaxed),
                1,
                "the stale node had a share"
            );
            let report = reports_rx.try_recv().unwrap();
            assert_eq!(
                (report.node.as_str(), report.reason.as_str()),
                (
                    "node-0",
                    "stale replica: node does not hold layer 0 expert 0"
                )
            );
            // The node is alive: only its replica of expert 0 is avoided.
            let table = fanout.table_rx.borrow().clone();
            assert_eq!(recently_failed(&table.links), vec![false, false]);
            forward_to_expert_zero(&fanout).await.unwrap();
            assert_eq!(
                calls[0].load(Ordering::Relaxed),
                1,
                "the stale replica was called again"
            );
            assert!(reports_rx.try_recv().is_err(), "reported twice");
        }
    }

    #[tokio::test]
    async fn without_another_replica_a_stale_one_fails_the_forward_as_unavailable() {
        let stale = FakeAnswer::Fails(tonic::Code::FailedPrecondition, "not held: layer 0");
        let (fanout, _calls) = fake_replicas(&[stale], NodeHealth::without_coordinators()).await;
        let error = forward_to_expert_zero(&fanout).await.unwrap_err();
        let message = error.to_string();
        assert!(matches!(error, RouterError::Unavailable(_)), "{error:?}");
        assert!(
            message.starts_with("layer 0 experts [0]: no other replica holds them"),
            "{message}"
        );
        assert!(message.contains("not held"), "{message}");
    }

    #[tokio::test]
    async fn a_request_error_fails_the_forward_at_once_and_marks_no_node() {
        let too_large = "Error, decoded message length too large: found 300000000 bytes, \
                         the limit is: 268435456 bytes";
        let cases = [
            (tonic::Code::OutOfRange, too_large, tonic::Code::OutOfRange),
            (
                tonic::Code::InvalidArgument,
                "expert 0: routing weight NaN is not finite",
                tonic::Code::InvalidArgument,
            ),
            (
                tonic::Code::Internal,
                "expert failed",
                tonic::Code::Internal,
            ),
        ];
        for (code, message, client_code) in cases {
            let answers = [FakeAnswer::Fails(code, message), FakeAnswer::Ones];
            let (fanout, calls) = fake_replicas(&answers, NodeHealth::without_coordinators()).await;
            let error = forward_to_expert_zero(&fanout).await.unwrap_err();
            let status = tonic::Status::from(error);
            assert_eq!(status.code(), client_code, "{status:?}");
            assert!(status.message().contains(message), "{status:?}");
            assert_eq!(calls[0].load(Ordering::Relaxed), 1, "{code:?} was retried");
            let table = fanout.table_rx.borrow().clone();
            assert_eq!(recently_failed(&table.links), vec![false, false]);
        }
    }
}
