//! Placement streams (`AdminService.WatchPlacement`): a snapshot, or only
//! what changed since the revision the watcher has, then what changes as
//! commands are applied.
//!
//! One task per stream. It wakes when the applied state changes, looks up
//! in the [`PlacementHistory`] which nodes and experts changed since the
//! revision it last sent, and sends them as the current state has them.
//! While the watcher reads slowly, the task waits on its one-message
//! channel holding only the update it built (never a state), and the next
//! update folds every change made meanwhile: a slow watcher costs no one
//! else anything and the coordinator's memory stays bounded.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use moemesh_proto::placement::update_wire_bytes;
use moemesh_proto::v1::{PlacementDelta, PlacementUpdate, placement_update};
use tokio::sync::{mpsc, watch};
use tonic::Status;

use crate::history::{PlacementHistory, Touched};
use crate::metrics::CoordinatorMetrics;
use crate::placement::{expert_placement, node_info, placement_snapshot};
use crate::state::ClusterState;

/// How long a watcher's revision may stay ahead of this coordinator's (a
/// lagging follower catching up) before the watcher is sent a snapshot of
/// what this coordinator has instead (its revision came from another
/// cluster, or was made up).
const AHEAD_PATIENCE: Duration = Duration::from_secs(1);

/// What a stream follows, and where it is.
pub struct PlacementStream {
    /// Only this model (all when empty).
    pub model: String,
    /// The revision the watcher has; None: it needs a snapshot.
    pub sent_revision: Option<u64>,
    /// The epoch of the last update sent; None when unknown.
    pub sent_epoch: Option<u64>,
}

impl PlacementStream {
    /// A stream of `model` for a watcher that has `since_revision`.
    pub fn new(model: String, since_revision: Option<u64>) -> Self {
        Self {
            model,
            sent_revision: since_revision,
            sent_epoch: None,
        }
    }

    /// Whether the watcher has a revision `state` has not reached.
    fn is_ahead_of(&self, state: &ClusterState) -> bool {
        self.sent_revision
            .is_some_and(|have| have > state.applied_commands)
    }

    /// The update that brings the watcher to `state`, if it needs one, and
    /// notes it as sent.
    pub fn next_update(
        &mut self,
        state: &ClusterState,
        history: &Mutex<PlacementHistory>,
    ) -> Option<PlacementUpdate> {
        let revision = state.applied_commands;
        let update = match self.sent_revision {
            // Ahead of this coordinator (it will catch up).
            Some(have) if have > revision => return None,
            // Up to date. A stream's first update still comes (an empty
            // delta when the watcher resumes at this revision): it tells
            // the watcher the stream is live and where this coordinator is.
            Some(have) if have == revision && self.sent_epoch.is_some() => return None,
            Some(have) => {
                let touched = history
                    .lock()
                    .expect("the history lock is never poisoned")
                    .touched_between(have, revision);
                match touched {
                    Some(touched) => self.delta(state, &touched),
                    None => Some(self.snapshot(state)),
                }
            }
            None => Some(self.snapshot(state)),
        };
        self.sent_revision = Some(revision);
        self.sent_epoch = Some(state.epoch);
        update
    }

    fn snapshot(&self, state: &ClusterState) -> PlacementUpdate {
        PlacementUpdate {
            update: Some(placement_update::Update::Snapshot(placement_snapshot(
                state,
                &self.model,
                None,
            ))),
        }
    }

    /// The touched nodes and experts of this stream's model as `state` has
    /// them; None when none of them is the stream's and the epoch is the
    /// one the watcher has.
    fn delta(&self, state: &ClusterState, touched: &Touched) -> Option<PlacementUpdate> {
        let nodes: Vec<_> = touched
            .nodes
            .iter()
            .filter_map(|id| state.nodes.get(id))
            .map(node_info)
            .collect();
        let experts: Vec<_> = touched
            .experts
            .iter()
            .filter(|key| self.model.is_empty() || key.model == self.model)
            .map(|key| {
                let replicas = state.replicas.get(key).map_or(&[][..], Vec::as_slice);
                let mut placement = expert_placement(key, replicas);
                if !self.model.is_empty() {
                    // The watcher knows the model it asked for.
                    placement.model.clear();
                }
                placement
            })
            .collect();
        if nodes.is_empty() && experts.is_empty() && self.sent_epoch == Some(state.epoch) {
            return None;
        }
        Some(PlacementUpdate {
            update: Some(placement_update::Update::Delta(PlacementDelta {
                epoch: state.epoch,
                revision: state.applied_commands,
                nodes,
                experts,
            })),
        })
    }
}

/// Counts a stream among the open ones for as long as it lives.
struct OpenStream(CoordinatorMetrics);

impl OpenStream {
    fn new(metrics: CoordinatorMetrics) -> Self {
        metrics.count_placement_watcher(true);
        Self(metrics)
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.count_placement_watcher(false);
    }
}

/// Sends the updates of `stream` on `update_tx` whenever the applied state
/// changes, until the client or the server goes away; counts them in
/// `metrics`.
pub async fn run_placement_stream(
    mut stream: PlacementStream,
    mut applied: watch::Receiver<Arc<ClusterState>>,
    history: Arc<Mutex<PlacementHistory>>,
    mut closing: watch::Receiver<bool>,
    update_tx: mpsc::Sender<Result<PlacementUpdate, Status>>,
    metrics: CoordinatorMetrics,
) {
    let open = OpenStream::new(metrics);
    let mut ahead_until = None;
    loop {
        // The state is let go before waiting to send.
        let update = {
            let state = Arc::clone(&applied.borrow_and_update());
            if stream.is_ahead_of(&state) {
                ahead_until.get_or_insert_with(|| tokio::time::Instant::now() + AHEAD_PATIENCE);
                None
            } else {
                ahead_until = None;
                stream.next_update(&state, &history)
            }
        };
        if let Some(update) = update {
            let snapshot = matches!(update.update, Some(placement_update::Update::Snapshot(_)));
            open.0
                .count_placement_update(snapshot, update_wire_bytes(&update));
            tokio::select! {
                sent = update_tx.send(Ok(update)) => if sent.is_err() { return },
                _ = closing.wait_for(|closing| *closing) => return,
            }
        }
        tokio::select! {
            changed = applied.changed() => if changed.is_err() { return },
            _ = update_tx.closed() => return,
            _ = closing.wait_for(|closing| *closing) => return,
            _ = sleep_until(ahead_until) => {
                // Still ahead: start the watcher over from this state.
                stream.sent_revision = None;
                applied.mark_changed();
            }
        }
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
#[path = "watch_tests.rs"]
mod tests;
