//! `--wait` for the placement changes: a bar that follows a move, a new
//! replica or a rebalance in the placement while the coordinators carry it
//! out, and `--timeout`.

use moemesh_client::{ClientError, CoordinatorClient};
use moemesh_proto::v1::{
    AddReplicaResponse, MoveReplicaResponse, RebalanceResponse, ReplicaState, ShowPlacementResponse,
};

use crate::wait::{Progress, WaitArgs, placement_reader, poll_while, replica_state};

/// One expert of a model, whose replicas a command changes.
#[derive(Clone, Copy)]
pub struct Replica<'a> {
    pub model: &'a str,
    pub layer: u32,
    pub expert: u32,
}

impl Replica<'_> {
    /// The state of this expert's replica on `node`, None when it has none.
    fn state_on(&self, placement: &ShowPlacementResponse, node: &str) -> Option<ReplicaState> {
        replica_state(placement, self.model, self.layer, self.expert, node)
    }

    fn describe(&self) -> String {
        format!("layer {} expert {}", self.layer, self.expert)
    }
}

/// The call's result, or an error saying it did not finish within the
/// timeout and what `after` is left in the cluster.
fn finished<T>(
    result: Option<Result<T, ClientError>>,
    wait: &WaitArgs,
    what: &str,
    after: &str,
) -> anyhow::Result<T> {
    match result {
        Some(result) => Ok(result?),
        None => anyhow::bail!(
            "{what} did not finish within {} s (--timeout); {after}",
            wait.timeout
        ),
    }
}

/// How far a move is: 0 until the new replica serves, 1 once it does, 2
/// once the old one drains, 3 once the old one is gone.
fn move_step(to: Option<ReplicaState>, from: Option<ReplicaState>) -> u64 {
    let new_serves = to == Some(ReplicaState::Ready);
    let old_leaves = matches!(from, None | Some(ReplicaState::Draining));
    u64::from(new_serves)
        + u64::from(new_serves && old_leaves)
        + u64::from(new_serves && from.is_none())
}

/// A line for a replica's state, for the bar.
fn state_name(state: Option<ReplicaState>) -> String {
    state.map_or("not placed yet".to_string(), |state| state.to_string())
}

/// Moves a replica from `nodes.0` to `nodes.1` with a bar of the move's
/// steps: new replica loading, serving, old one draining, gone.
pub async fn move_and_wait(
    admin: &mut CoordinatorClient,
    replica: Replica<'_>,
    (from, to): (&str, &str),
    wait: &WaitArgs,
    visible: bool,
) -> anyhow::Result<MoveReplicaResponse> {
    let deadline = wait.deadline();
    let mut reader = placement_reader(admin);
    let progress = Progress::new(visible, format!("moving {}", replica.describe()));
    progress.set(0, 3, format!("{from} -> {to}"));
    let show_progress = async || {
        if let Ok(placement) = reader
            .show_placement(replica.model, Some(replica.layer))
            .await
        {
            let on_to = replica.state_on(&placement, to);
            let on_from = replica.state_on(&placement, from);
            let message = format!(
                "{to}: {}, {from}: {}",
                state_name(on_to),
                state_name(on_from)
            );
            progress.set(move_step(on_to, on_from), 3, message);
        }
    };
    let call = admin.move_replica(replica.model, replica.layer, replica.expert, from, to);
    let result = poll_while(deadline, call, show_progress).await;
    let after = format!(
        "the new replica on {to} may still be loading and the old one on {from} stay; see \
         `moectl placement show --layer {}`",
        replica.layer
    );
    finished(
        result,
        wait,
        &format!("the move of {}", replica.describe()),
        &after,
    )
}

/// Adds a replica on `node` with a bar that completes when it serves.
pub async fn replicate_and_wait(
    admin: &mut CoordinatorClient,
    replica: Replica<'_>,
    node: &str,
    wait: &WaitArgs,
    visible: bool,
) -> anyhow::Result<AddReplicaResponse> {
    let deadline = wait.deadline();
    let mut reader = placement_reader(admin);
    let progress = Progress::new(visible, format!("adding {} on {node}", replica.describe()));
    progress.set(0, 1, "placing");
    let show_progress = async || {
        if let Ok(placement) = reader
            .show_placement(replica.model, Some(replica.layer))
            .await
        {
            let state = replica.state_on(&placement, node);
            let serves = state == Some(ReplicaState::Ready);
            progress.set(u64::from(serves), 1, state_name(state));
        }
    };
    let call = admin.add_replica(replica.model, replica.layer, replica.expert, node);
    let result = poll_while(deadline, call, show_progress).await;
    let after = format!("the replica on {node} stays placed and may still be loading");
    finished(
        result,
        wait,
        &format!("adding {}", replica.describe()),
        &after,
    )
}

/// One replica a rebalance plans to add (`adds`) or drop.
struct PlannedChange {
    layer: u32,
    expert: u32,
    node: String,
    adds: bool,
}

impl PlannedChange {
    /// Whether the placement shows the change made: an added replica
    /// serving, a dropped one gone.
    fn is_done(&self, placement: &ShowPlacementResponse, model: &str) -> bool {
        let state = replica_state(placement, model, self.layer, self.expert, &self.node);
        if self.adds {
            state == Some(ReplicaState::Ready)
        } else {
            state.is_none()
        }
    }
}

/// Every replica `plan` adds or drops.
fn planned_changes(plan: &RebalanceResponse) -> Vec<PlannedChange> {
    let mut changes = Vec::new();
    for layer in &plan.layers {
        for (moves, adds) in [(&layer.added, true), (&layer.removed, false)] {
            changes.extend(moves.iter().map(|change| PlannedChange {
                layer: layer.layer,
                expert: change.expert,
                node: change.node.clone(),
                adds,
            }));
        }
    }
    changes
}

/// Rebalances `model` with a bar of replicas added and dropped. A dry run
/// first sizes the bar; the rebalance plans again from load a moment
/// newer, so the bar may end before it fills.
pub async fn rebalance_and_wait(
    admin: &mut CoordinatorClient,
    model: &str,
    wait: &WaitArgs,
    visible: bool,
) -> anyhow::Result<RebalanceResponse> {
    let deadline = wait.deadline();
    let plan = admin.rebalance(model, true).await?;
    let changes = planned_changes(&plan);
    let total = changes.len() as u64;
    let mut reader = placement_reader(admin);
    let progress = Progress::new(visible, format!("rebalancing {}", plan.model));
    progress.set(0, total, "replicas added or dropped");
    let show_progress = async || {
        if let Ok(placement) = reader.show_placement(&plan.model, None).await {
            let done = changes
                .iter()
                .filter(|change| change.is_done(&placement, &plan.model));
            progress.set(done.count() as u64, total, "replicas added or dropped");
        }
    };
    let result = poll_while(deadline, admin.rebalance(model, false), show_progress).await;
    let after = "it stopped where it was: replicas added so far stay; see `moectl placement show`";
    finished(
        result,
        wait,
        &format!("the rebalance of {}", plan.model),
        after,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use ReplicaState::{Draining, Loading, Ready};

    #[test]
    fn a_move_counts_its_steps_from_the_two_replicas() {
        assert_eq!(move_step(None, Some(Ready)), 0);
        assert_eq!(move_step(Some(Loading), Some(Ready)), 0);
        assert_eq!(move_step(Some(Ready), Some(Ready)), 1);
        assert_eq!(move_step(Some(Ready), Some(Draining)), 2);
        assert_eq!(move_step(Some(Ready), None), 3);
    }
}
