//! The rebalancer: plans each MoE layer of a model from the load window
//! (`moemesh_core::planner`) and carries the plan out through the move
//! protocol, so serving never pauses.
//!
//! Order of work: every new replica is added and loaded first (a bounded
//! number at a time), then the replicas the plan drops are drained, given
//! the drain grace for routers to leave them, and removed. So an expert
//! never has fewer serving replicas than the plan gives it. Every move and
//! its outcome is logged and counted; a failed move is reported, never
//! dropped silently.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use moemesh_core::config::ModelConfig;
use moemesh_core::planner::{PlanNode, PlanOptions, plan_layer};

use crate::load::LoadTracker;
use crate::membership::{add_replica, propose_applied};
use crate::node::RaftHandle;
use crate::state::{ClusterState, Command, ExpertKey, NodeStatus, ReplicaState};
use crate::{CoordinatorError, CoordinatorResult};

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
}

impl Default for RebalanceOptions {
    fn default() -> Self {
        Self {
            threshold: 0.05,
            redundant_fraction: 0.25,
            concurrent_moves: 2,
            drain_grace: crate::membership::DRAIN_GRACE,
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
}

/// Bytes of one expert's weights in f32, as placement counts them.
fn expert_bytes(config: &ModelConfig, expert: u32) -> u64 {
    (3 * config.hidden_size * config.intermediate_size_of(expert) * size_of::<f32>()) as u64
}

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
    let record = state
        .models
        .get(model)
        .ok_or_else(|| CoordinatorError::Rejected(format!("no model {model:?}")))?;
    let config =
        ModelConfig::from_dir(std::path::Path::new(&record.checkpoint)).map_err(|error| {
            CoordinatorError::Rejected(format!(
                "cannot read {model}'s config at {}: {error}",
                record.checkpoint
            ))
        })?;
    let mut configs = BTreeMap::new();
    for (id, other) in &state.models {
        if let Ok(config) = ModelConfig::from_dir(std::path::Path::new(&other.checkpoint)) {
            configs.insert(id.clone(), config);
        }
    }
    configs.insert(model.to_string(), config.clone());
    let (window_seconds, window) = load.layer_loads(model);
    let mut outcome = RebalanceOutcome {
        window_seconds,
        ..RebalanceOutcome::default()
    };
    let nodes: Vec<&crate::state::NodeRecord> = state
        .nodes
        .values()
        .filter(|node| node.status == NodeStatus::Ready)
        .collect();
    if nodes.is_empty() {
        return Err(CoordinatorError::Rejected("no ready expert node".into()));
    }
    let groups: BTreeMap<&str, usize> = nodes
        .iter()
        .map(|node| node.group.as_str())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .enumerate()
        .map(|(index, group)| (group, index))
        .collect();
    let used = used_bytes(&state, &configs);
    let experts = config.experts_per_layer();
    let layers = config.moe_layers();
    let routing_groups = config.group_limit.map(|limit| limit.groups);
    for &layer in &layers {
        let loads: Vec<f64> = match window.iter().find(|entry| entry.layer as usize == layer) {
            Some(entry) if entry.tokens.iter().any(|&tokens| tokens > 0) => {
                let mut loads: Vec<f64> =
                    entry.tokens.iter().map(|&tokens| tokens as f64).collect();
                loads.resize(experts, 0.0);
                loads
            }
            // No traffic on this layer in the window: nothing to balance.
            _ => continue,
        };
        // The layer's replicas now (loading or ready; draining ones are on their way out).
        let current: Vec<Vec<u32>> = nodes
            .iter()
            .map(|node| {
                (0..experts as u32)
                    .filter(|&expert| {
                        let key = ExpertKey {
                            model: model.to_string(),
                            layer,
                            expert,
                        };
                        state.replicas.get(&key).is_some_and(|replicas| {
                            replicas.iter().any(|replica| {
                                replica.node == node.id && replica.state != ReplicaState::Draining
                            })
                        })
                    })
                    .collect()
            })
            .collect();
        if current.iter().map(Vec::len).sum::<usize>() == 0 {
            continue;
        }
        // Slots: what the node holds of this layer now, plus its free
        // memory shared out over the model's layers.
        let typical_bytes = expert_bytes(&config, 0).max(1);
        let plan_nodes: Vec<PlanNode> = nodes
            .iter()
            .zip(&current)
            .map(|(node, held)| {
                let free = node
                    .memory_bytes
                    .saturating_sub(used.get(&node.id).copied().unwrap_or(0));
                let spare = (free / typical_bytes) as usize / layers.len().max(1);
                PlanNode {
                    slots: held.len() + spare,
                    group: groups[node.group.as_str()],
                }
            })
            .collect();
        let options_for_layer = PlanOptions {
            threshold: options.threshold,
            routing_groups,
            max_extra_replicas: Some((experts as f64 * options.redundant_fraction).ceil() as usize),
        };
        let plan = match plan_layer(&loads, &plan_nodes, Some(&current), &options_for_layer) {
            Ok(plan) => plan,
            Err(error) => {
                outcome.errors.push(format!("layer {layer}: {error}"));
                continue;
            }
        };
        let mut added = Vec::new();
        let mut removed = Vec::new();
        for ((node, now), planned) in nodes.iter().zip(&current).zip(&plan.nodes) {
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
        tracing::info!(
            model,
            layer,
            before = plan.current_max_over_mean.unwrap_or(plan.max_over_mean),
            after = plan.max_over_mean,
            added = added.len(),
            removed = removed.len(),
            dry_run,
            "rebalance plan"
        );
        outcome.layers.push(LayerOutcome {
            layer,
            before: plan.current_max_over_mean.unwrap_or(plan.max_over_mean),
            after: plan.max_over_mean,
            added,
            removed,
        });
    }
    if dry_run {
        return Ok(outcome);
    }
    counters.runs.fetch_add(1, Ordering::Relaxed);
    let epoch = state.epoch;
    carry_out(raft, model, epoch, options, &mut outcome, counters).await;
    Ok(outcome)
}

/// Adds every new replica (a few at a time, each waiting until it
/// serves), then drains and removes the dropped ones.
async fn carry_out(
    raft: &RaftHandle,
    model: &str,
    epoch: u64,
    options: &RebalanceOptions,
    outcome: &mut RebalanceOutcome,
    counters: &RebalanceCounters,
) {
    let key = |layer: usize, expert: u32| ExpertKey {
        model: model.to_string(),
        layer,
        expert,
    };
    let additions: Vec<(ExpertKey, String)> = outcome
        .layers
        .iter()
        .flat_map(|layer| {
            layer
                .added
                .iter()
                .map(move |(node, expert)| (key(layer.layer, *expert), node.clone()))
        })
        .collect();
    let results: Vec<(ExpertKey, String, CoordinatorResult<u64>)> =
        futures::stream::iter(additions)
            .map(|(key, node)| async move {
                let request_id = format!("rebalance/{epoch}/add/{key}/{node}");
                tracing::info!(%key, %node, reason = "rebalance", "adding a replica");
                let result = add_replica(raft, &request_id, key.clone(), &node).await;
                (key, node, result)
            })
            .buffer_unordered(options.concurrent_moves.max(1))
            .collect()
            .await;
    let mut failed_experts = BTreeSet::new();
    for (key, node, result) in results {
        match result {
            Ok(_) => {
                outcome.moves_done += 1;
                counters.moves_done.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%key, %node, "replica added");
            }
            Err(error) => {
                outcome.moves_failed += 1;
                counters.moves_failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%key, %node, %error, "adding a replica failed");
                outcome.errors.push(format!("add {key} on {node}: {error}"));
                failed_experts.insert(key);
            }
        }
    }
    // Drop replicas only of experts whose new replicas all arrived, so a
    // failed addition never leaves an expert short.
    let removals: Vec<(ExpertKey, String)> = outcome
        .layers
        .iter()
        .flat_map(|layer| {
            layer
                .removed
                .iter()
                .map(move |(node, expert)| (key(layer.layer, *expert), node.clone()))
        })
        .filter(|(key, _)| !failed_experts.contains(key))
        .collect();
    let mut drained = Vec::new();
    for (key, node) in removals {
        let request_id = format!("rebalance/{epoch}/drain/{key}/{node}");
        let command = Command::DrainReplica {
            key: key.clone(),
            node: node.clone(),
        };
        match propose_applied(raft, request_id, command).await {
            Ok(_) => drained.push((key, node)),
            Err(error) => {
                outcome.moves_failed += 1;
                counters.moves_failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%key, %node, %error, "draining a replica failed");
                outcome
                    .errors
                    .push(format!("drain {key} on {node}: {error}"));
            }
        }
    }
    if drained.is_empty() {
        return;
    }
    tokio::time::sleep(options.drain_grace).await;
    for (key, node) in drained {
        let request_id = format!("rebalance/{epoch}/remove/{key}/{node}");
        let command = Command::RemoveReplica {
            key: key.clone(),
            node: node.clone(),
        };
        match propose_applied(raft, request_id, command).await {
            Ok(_) => {
                outcome.moves_done += 1;
                counters.moves_done.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%key, %node, reason = "rebalance", "replica removed");
            }
            Err(error) => {
                outcome.moves_failed += 1;
                counters.moves_failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%key, %node, %error, "removing a replica failed");
                outcome
                    .errors
                    .push(format!("remove {key} on {node}: {error}"));
            }
        }
    }
}
