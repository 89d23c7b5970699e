//! `--wait`: following a change in the placement until it has taken
//! effect, with a progress bar on standard error.
//!
//! The coordinators' admin API has no progress stream for a change; moectl
//! reads the placement (`ShowPlacement`) every [`POLL_INTERVAL`] while the
//! change runs and counts the replicas that have reached their state.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use moemesh_client::{ClientError, CoordinatorClient};
use moemesh_proto::v1::{ReplicaState, ShowPlacementResponse};
use tokio::time::Instant;

/// How often the placement is read while waiting.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// The limit on one placement read, so that a coordinator that stops
/// answering cannot hold a wait past its timeout.
const POLL_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// The pause before a call that failed for want of a coordinator is made again.
pub const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// `--wait`, `--no-wait` and `--timeout`, shared by the commands that
/// change the placement.
#[derive(clap::Args, Debug)]
pub struct WaitArgs {
    /// Block until the change has taken effect (replicas ready, moves
    /// finished, the node empty), with a progress bar on standard error
    /// when it is a terminal and the output is a table.
    #[arg(long, overrides_with = "no_wait")]
    pub wait: bool,
    /// Do not wait (the default); undoes an earlier --wait.
    #[arg(long, overrides_with = "wait")]
    pub no_wait: bool,
    /// With --wait: give up after this many seconds and exit non-zero.
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 600,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub timeout: u64,
}

impl WaitArgs {
    /// When waiting gives up.
    pub fn deadline(&self) -> Instant {
        Instant::now() + Duration::from_secs(self.timeout)
    }
}

/// A progress bar on standard error, cleared when dropped so that the
/// outcome (or the error) prints on a clean line.
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// A bar that reads `prefix [====>   ] done/total (elapsed) message`,
    /// the message cut to the terminal's width;
    /// hidden unless `visible`.
    pub fn new(visible: bool, prefix: impl Into<String>) -> Self {
        if !visible {
            return Self {
                bar: ProgressBar::hidden(),
            };
        }
        let style = ProgressStyle::with_template(
            "{spinner} {prefix} [{bar:20}] {pos}/{len} ({elapsed}) {wide_msg}",
        )
        .expect("a valid progress template")
        .progress_chars("=> ");
        let bar = ProgressBar::new(0)
            .with_style(style)
            .with_prefix(prefix.into());
        bar.enable_steady_tick(Duration::from_millis(120));
        Self { bar }
    }

    /// Shows `done` of `total`, and what is happening now.
    pub fn set(&self, done: u64, total: u64, message: impl Into<String>) {
        self.bar.set_length(total);
        self.bar.set_position(done.min(total));
        self.bar.set_message(message.into());
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}

/// Whether a call failed for want of a coordinator (none reachable, none
/// with a leader), so that making it again later may succeed.
pub fn is_transient(error: &ClientError) -> bool {
    matches!(
        error,
        ClientError::Connect { .. } | ClientError::Unavailable(_)
    )
}

/// A second client of the same coordinators for reading the placement
/// while `admin` makes a long call.
pub fn placement_reader(admin: &CoordinatorClient) -> CoordinatorClient {
    admin.clone().with_call_timeout(POLL_CALL_TIMEOUT)
}

/// Awaits `call`, running `poll` every [`POLL_INTERVAL`] meanwhile (to
/// move a progress bar). Returns None when `deadline` passes first; the
/// call is then dropped, which cancels it on the coordinator.
pub async fn poll_while<T>(
    deadline: Instant,
    call: impl Future<Output = T>,
    mut poll: impl AsyncFnMut(),
) -> Option<T> {
    let call = tokio::time::timeout_at(deadline, call);
    tokio::pin!(call);
    loop {
        tokio::select! {
            result = &mut call => return result.ok(),
            () = tokio::time::sleep(POLL_INTERVAL) => poll().await,
        }
    }
}

/// Replicas in `placement`, and how many of them serve.
pub fn ready_count(placement: &ShowPlacementResponse) -> (u64, u64) {
    let replicas = placement.experts.iter().flat_map(|expert| &expert.replicas);
    replicas.fold((0, 0), |(ready, total), replica| {
        let serves = replica.state() == ReplicaState::Ready;
        (ready + u64::from(serves), total + 1)
    })
}

/// The nodes with replicas that do not serve yet, and how many each has:
/// `expert-0 (12), expert-3 (4)`.
pub fn not_ready_by_node(placement: &ShowPlacementResponse) -> String {
    let mut counts = std::collections::BTreeMap::<&str, u64>::new();
    let replicas = placement.experts.iter().flat_map(|expert| &expert.replicas);
    for replica in replicas.filter(|replica| replica.state() != ReplicaState::Ready) {
        *counts.entry(&replica.node).or_default() += 1;
    }
    let nodes: Vec<String> = counts
        .into_iter()
        .map(|(node, count)| format!("{node} ({count})"))
        .collect();
    nodes.join(", ")
}

/// Replicas `node` holds in `placement`, in any state.
pub fn held_by(placement: &ShowPlacementResponse, node: &str) -> u64 {
    let replicas = placement.experts.iter().flat_map(|expert| &expert.replicas);
    replicas.filter(|replica| replica.node == node).count() as u64
}

/// The state of `node`'s replica of `layer`'s `expert` of `model`; None
/// when it holds none.
pub fn replica_state(
    placement: &ShowPlacementResponse,
    model: &str,
    layer: u32,
    expert: u32,
    node: &str,
) -> Option<ReplicaState> {
    placement
        .experts
        .iter()
        .filter(|entry| entry.model == model && entry.layer == layer && entry.expert == expert)
        .flat_map(|entry| &entry.replicas)
        .find(|replica| replica.node == node)
        .map(|replica| replica.state())
}

#[cfg(test)]
mod tests {
    use moemesh_proto::v1::{ExpertPlacement, ReplicaInfo};

    use super::*;

    fn replica(node: &str, state: ReplicaState) -> ReplicaInfo {
        ReplicaInfo {
            node: node.into(),
            state: state.into(),
        }
    }

    fn placement() -> ShowPlacementResponse {
        let expert = |expert, replicas| ExpertPlacement {
            model: "m".into(),
            layer: 1,
            expert,
            replicas,
        };
        ShowPlacementResponse {
            epoch: 7,
            experts: vec![
                expert(
                    0,
                    vec![
                        replica("a", ReplicaState::Ready),
                        replica("b", ReplicaState::Loading),
                    ],
                ),
                expert(
                    1,
                    vec![
                        replica("b", ReplicaState::Loading),
                        replica("c", ReplicaState::Draining),
                    ],
                ),
            ],
        }
    }

    #[test]
    fn counts_follow_replica_states_and_nodes() {
        let placement = placement();
        assert_eq!(ready_count(&placement), (1, 4));
        assert_eq!(not_ready_by_node(&placement), "b (2), c (1)");
        assert_eq!(held_by(&placement, "b"), 2);
        assert_eq!(held_by(&placement, "nobody"), 0);
        assert_eq!(
            replica_state(&placement, "m", 1, 1, "c"),
            Some(ReplicaState::Draining)
        );
        assert_eq!(replica_state(&placement, "m", 1, 1, "a"), None);
        assert_eq!(replica_state(&placement, "other", 1, 0, "a"), None);
    }

    #[test]
    fn transient_errors_are_those_of_reaching_a_coordinator() {
        assert!(is_transient(&ClientError::Unavailable("no leader".into())));
        assert!(is_transient(&ClientError::Connect {
            address: "http://x".into(),
            message: "refused".into(),
        }));
        assert!(!is_transient(&ClientError::Refused("unknown node".into())));
    }

    #[tokio::test(start_paused = true)]
    async fn polling_stops_at_the_deadline_and_runs_while_the_call_does() {
        let mut polls = 0;
        let deadline = Instant::now() + Duration::from_secs(3);
        let never = std::future::pending::<()>();
        let outcome = poll_while(deadline, never, async || polls += 1).await;
        assert_eq!(outcome, None);
        assert!(polls >= 1, "{polls}");

        let answer = async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            42
        };
        let later = Instant::now() + Duration::from_secs(3600);
        assert_eq!(poll_while(later, answer, async || {}).await, Some(42));
    }
}
