//! The rebalancer: plans each MoE layer of a model from the load window
//! (`moemesh_core::model::placement::planner`) and carries the plan out
//! through the move protocol, so serving never pauses.
//!
//! Order of work: every new replica is added and loaded first (a bounded
//! number at a time), then the replicas the plan drops are drained, given
//! the drain grace for routers to leave them, and removed. So an expert
//! never has fewer serving replicas than the plan gives it. Every move and
//! its outcome is logged and counted; a failed move is reported, never
//! dropped silently. A rebalance cut short leaves no replica draining for
//! long: the leader's membership monitor finishes what it drained.
//!
//! A [`Rebalancer`] runs one rebalance at a time, on an operator's request
//! or from [`periodic_rebalance_task`] on the leader. `planning` gives
//! the planner its view of the nodes: slots from their memory and buffer
//! bytes, of which those their memory keeps resident.

mod planning;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use moemesh_core::model::placement::planner::DEFAULT_BUFFERED_LOAD_FACTOR;

use crate::CoordinatorResult;
use crate::load::LoadTracker;
use crate::membership::{add_replica, remove_drained};
use crate::metrics::{CoordinatorMetrics, MoveOutcome, RebalanceRun};
use crate::node::RaftHandle;
use crate::state::{Command, ExpertKey};
use planning::{ModelPlanning, window_loads};

/// What the rebalancer may do.
#[derive(Debug, Clone, Copy)]
pub struct RebalanceOptions {
    /// The least gain in max/mean node load worth moving experts for.
    pub threshold: f64,
    /// Extra replicas per layer, as a share of its experts (DeepSeek's
    /// serving used 32 redundant experts for 256): hot experts get them.
    pub redundant_fraction: f64,
    /// New replicas loading at once.
    pub concurrent_moves: usize,
    /// How long routers get to leave a drained replica before removal.
    pub drain_grace: Duration,
    /// How much more load on an expert beyond a node's resident slots
    /// counts than on a resident one (the planner's `buffered_load_factor`).
    pub buffered_load_factor: f64,
}

impl Default for RebalanceOptions {
    fn default() -> Self {
        Self {
            threshold: 0.05,
            redundant_fraction: 0.25,
            concurrent_moves: 2,
            drain_grace: crate::membership::DRAIN_GRACE,
            buffered_load_factor: DEFAULT_BUFFERED_LOAD_FACTOR,
        }
    }
}

/// One layer's plan, as carried out (or as it would be, in a dry run).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerOutcome {
    pub layer: usize,
    /// Busiest node's load over the mean, now and under the plan.
    pub before: f64,
    pub after: f64,
    /// (node, expert) replicas the plan adds and drops.
    pub added: Vec<(String, u32)>,
    pub removed: Vec<(String, u32)>,
}

/// What a rebalance did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RebalanceOutcome {
    pub layers: Vec<LayerOutcome>,
    /// Seconds of load the plan was made from.
    pub window_seconds: f64,
    pub moves_done: u64,
    pub moves_failed: u64,
    /// One line per failed move.
    pub errors: Vec<String>,
}

/// Moves done and failed since the coordinator started, across rebalances.
#[derive(Debug, Default)]
pub struct RebalanceCounters {
    pub runs: AtomicU64,
    pub moves_done: AtomicU64,
    pub moves_failed: AtomicU64,
    /// The same, and runs by outcome, for Prometheus.
    pub metrics: CoordinatorMetrics,
}

impl RebalanceOutcome {
    fn record_done(&mut self, counters: &RebalanceCounters) {
        self.moves_done += 1;
        counters.moves_done.fetch_add(1, Ordering::Relaxed);
        counters.metrics.count_move(MoveOutcome::Done);
    }

    fn record_failure(&mut self, counters: &RebalanceCounters, error: String) {
        self.moves_failed += 1;
        counters.moves_failed.fetch_add(1, Ordering::Relaxed);
        counters.metrics.count_move(MoveOutcome::Failed);
        self.errors.push(error);
    }

    /// How the run that produced this outcome ended, for the metrics.
    fn run_outcome(&self) -> RebalanceRun {
        if !self.errors.is_empty() || self.moves_failed > 0 {
            RebalanceRun::Failed
        } else if self.moves_done > 0 {
            RebalanceRun::Moved
        } else {
            RebalanceRun::NothingToDo
        }
    }

    /// Layers whose plan adds or drops replicas.
    fn layers_changed(&self) -> usize {
        self.layers
            .iter()
            .filter(|layer| !layer.added.is_empty() || !layer.removed.is_empty())
            .count()
    }
}

/// What a rebalance needs, cloneable into the periodic task.
#[derive(Clone)]
pub struct Rebalancer {
    raft: RaftHandle,
    /// The load window routers and nodes report into; plans come from it.
    load: Arc<LoadTracker>,
    options: RebalanceOptions,
    counters: Arc<RebalanceCounters>,
    /// Held while a rebalance runs: one at a time.
    running: Arc<tokio::sync::Mutex<()>>,
}

impl Rebalancer {
    /// A rebalancer that also counts its runs and moves in `metrics`.
    pub fn new(
        raft: RaftHandle,
        load: Arc<LoadTracker>,
        options: RebalanceOptions,
        metrics: CoordinatorMetrics,
    ) -> Self {
        let counters = RebalanceCounters {
            metrics,
            ..RebalanceCounters::default()
        };
        Self {
            raft,
            load,
            options,
            counters: Arc::new(counters),
            running: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// Runs, moves done and moves failed since the coordinator started.
    pub fn counters(&self) -> &RebalanceCounters {
        &self.counters
    }

    /// Rebalances `model` (see [`rebalance`]) once no other rebalance runs.
    pub async fn rebalance_model(
        &self,
        model: &str,
        dry_run: bool,
    ) -> CoordinatorResult<RebalanceOutcome> {
        let _one_at_a_time = self.running.lock().await;
        let result = rebalance(
            &self.raft,
            &self.load,
            model,
            &self.options,
            dry_run,
            &self.counters,
        )
        .await;
        if !dry_run {
            let run = match &result {
                Ok(outcome) => outcome.run_outcome(),
                Err(_) => RebalanceRun::Failed,
            };
            self.counters.metrics.count_rebalance(run);
        }
        result
    }
}

/// On the leader, rebalances every model each `interval`.
pub async fn periodic_rebalance_task(rebalancer: Rebalancer, interval: Duration) {
    let mut ticks = tokio::time::interval(interval);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let Ok(status) = rebalancer.raft.status().await else {
            return;
        };
        if status.leader_id != Some(status.id) {
            continue;
        }
        let Ok(state) = rebalancer.raft.read().await else {
            continue;
        };
        for model in state.models.keys() {
            match rebalancer.rebalance_model(model, false).await {
                Ok(outcome) => tracing::info!(
                    model,
                    layers_changed = outcome.layers_changed(),
                    moves_done = outcome.moves_done,
                    moves_failed = outcome.moves_failed,
                    "periodic rebalance"
                ),
                Err(error) => tracing::warn!(model, %error, "periodic rebalance failed"),
            }
        }
    }
}

/// Plans every MoE layer of `model` from the load window; with `dry_run`
/// stops there, otherwise carries the plans out.
pub async fn rebalance(
    raft: &RaftHandle,
    load: &LoadTracker,
    model: &str,
    options: &RebalanceOptions,
    dry_run: bool,
    counters: &RebalanceCounters,
) -> CoordinatorResult<RebalanceOutcome> {
    let state = raft.read().await?;
    let planning = ModelPlanning::new(&state, model)?;
    let window = load.layer_loads(model);
    let mut outcome = RebalanceOutcome {
        window_seconds: window.seconds,
        ..RebalanceOutcome::default()
    };
    let experts = planning.config.experts_per_layer();
    for layer in planning.config.moe_layers() {
        let Some(loads) = window_loads(&window.layers, layer, experts) else {
            continue;
        };
        match planning.plan_layer(layer, &loads, options) {
            Ok(Some(layer_outcome)) => {
                tracing::info!(
                    model,
                    layer,
                    before = layer_outcome.before,
                    after = layer_outcome.after,
                    added = layer_outcome.added.len(),
                    removed = layer_outcome.removed.len(),
                    dry_run,
                    "rebalance plan"
                );
                outcome.layers.push(layer_outcome);
            }
            Ok(None) => {}
            Err(error) => outcome.errors.push(format!("layer {layer}: {error}")),
        }
    }
    if dry_run {
        return Ok(outcome);
    }
    counters.runs.fetch_add(1, Ordering::Relaxed);
    let moves = PlannedMoves {
        raft,
        model,
        epoch: state.epoch,
        counters,
    };
    moves.carry_out(options, &mut outcome).await;
    Ok(outcome)
}

/// Carries out the plans of one rebalance; request ids derive from the
/// epoch it planned at, so a retried rebalance of the same plan applies once.
struct PlannedMoves<'a> {
    raft: &'a RaftHandle,
    model: &'a str,
    epoch: u64,
    counters: &'a RebalanceCounters,
}

impl PlannedMoves<'_> {
    /// Adds every new replica (a few at a time, each waiting until it
    /// serves), then drains and removes the dropped ones.
    async fn carry_out(&self, options: &RebalanceOptions, outcome: &mut RebalanceOutcome) {
        let additions = self.replicas(outcome, |layer| &layer.added);
        let failed_experts = self
            .add_replicas(additions, options.concurrent_moves, outcome)
            .await;
        // Drop replicas only of experts whose new replicas all arrived, so a
        // failed addition never leaves an expert short.
        let mut removals = self.replicas(outcome, |layer| &layer.removed);
        removals.retain(|(key, _)| !failed_experts.contains(key));
        let drained = self.drain_replicas(removals, outcome).await;
        if drained.is_empty() {
            return;
        }
        tokio::time::sleep(options.drain_grace).await;
        self.remove_replicas(drained, outcome).await;
    }

    /// The (expert, node) replicas `side` of each layer's outcome names.
    fn replicas(
        &self,
        outcome: &RebalanceOutcome,
        side: impl Fn(&LayerOutcome) -> &Vec<(String, u32)>,
    ) -> Vec<(ExpertKey, String)> {
        outcome
            .layers
            .iter()
            .flat_map(|layer| {
                side(layer).iter().map(move |(node, expert)| {
                    let key = ExpertKey {
                        model: self.model.to_string(),
                        layer: layer.layer,
                        expert: *expert,
                    };
                    (key, node.clone())
                })
            })
            .collect()
    }

    /// Adds the replicas, `concurrent` at a time; returns the experts
    /// whose addition failed.
    async fn add_replicas(
        &self,
        additions: Vec<(ExpertKey, String)>,
        concurrent: usize,
        outcome: &mut RebalanceOutcome,
    ) -> BTreeSet<ExpertKey> {
        let (raft, epoch) = (self.raft, self.epoch);
        let results: Vec<(ExpertKey, String, CoordinatorResult<u64>)> =
            futures::stream::iter(additions)
                .map(|(key, node)| async move {
                    let request_id = format!("rebalance/{epoch}/add/{key}/{node}");
                    tracing::info!(%key, %node, reason = "rebalance", "adding a replica");
                    let result = add_replica(raft, &request_id, key.clone(), &node).await;
                    (key, node, result)
                })
                .buffer_unordered(concurrent.max(1))
                .collect()
                .await;
        let mut failed_experts = BTreeSet::new();
        for (key, node, result) in results {
            match result {
                Ok(_) => {
                    outcome.record_done(self.counters);
                    tracing::info!(%key, %node, "replica added");
                }
                Err(error) => {
                    tracing::warn!(%key, %node, %error, "adding a replica failed");
                    let line = format!("add {key} on {node}: {error}");
                    outcome.record_failure(self.counters, line);
                    failed_experts.insert(key);
                }
            }
        }
        failed_experts
    }

    /// Drains the replicas so routers leave them; returns those drained.
    async fn drain_replicas(
        &self,
        removals: Vec<(ExpertKey, String)>,
        outcome: &mut RebalanceOutcome,
    ) -> Vec<(ExpertKey, String)> {
        let mut drained = Vec::new();
        for (key, node) in removals {
            let request_id = format!("rebalance/{}/drain/{key}/{node}", self.epoch);
            let command = Command::DrainReplica {
                key: key.clone(),
                node: node.clone(),
            };
            match self.raft.propose_applied(request_id, command).await {
                Ok(_) => drained.push((key, node)),
                Err(error) => {
                    tracing::warn!(%key, %node, %error, "draining a replica failed");
                    let line = format!("drain {key} on {node}: {error}");
                    outcome.record_failure(self.counters, line);
                }
            }
        }
        drained
    }

    /// Removes drained replicas, once routers have had time to leave them.
    async fn remove_replicas(
        &self,
        drained: Vec<(ExpertKey, String)>,
        outcome: &mut RebalanceOutcome,
    ) {
        for (key, node) in drained {
            let request_id = format!("rebalance/{}/remove/{key}/{node}", self.epoch);
            match remove_drained(self.raft, request_id, key.clone(), &node).await {
                Ok(_) => {
                    outcome.record_done(self.counters);
                    tracing::info!(%key, %node, reason = "rebalance", "replica removed");
                }
                Err(error) => {
                    tracing::warn!(%key, %node, %error, "removing a replica failed");
                    let line = format!("remove {key} on {node}: {error}");
                    outcome.record_failure(self.counters, line);
                }
            }
        }
    }
}
