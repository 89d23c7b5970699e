//! The coordinator's errors, and the one place each becomes a gRPC status.

use tonic::Status;

use crate::placement::PlacementError;

/// Errors of the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// The durable store failed; the coordinator cannot go on safely.
    #[error("storage failure: {0}")]
    Storage(String),
    /// Raft refused the operation (for example, a broken invariant).
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    /// No leader is known right now (an election is running); retry.
    #[error("no leader is known yet; retry shortly{}", leader_hint(*.0))]
    NoLeader(Option<u64>),
    /// The proposal was not seen to commit within its deadline. It may
    /// still commit: retry with the same request id, which commits at most once.
    #[error(
        "proposal {request_id} was not committed within {timeout_ms} ms; its outcome is unknown, retry with the same request id"
    )]
    ProposalTimedOut { request_id: String, timeout_ms: u64 },
    /// The leader changed while the proposal was in flight. It may still
    /// commit: retry with the same request id, which commits at most once.
    #[error(
        "the leader changed while proposal {request_id} was in flight; its outcome is unknown, retry with the same request id"
    )]
    LeaderChanged { request_id: String },
    /// A linearizable read could not be confirmed by a quorum in time.
    #[error("read was not confirmed by a quorum within {0} ms")]
    ReadTimedOut(u64),
    /// The command was applied and refused by the state machine.
    #[error("{0}")]
    Rejected(String),
    /// The coordinator is shutting down.
    #[error("coordinator is shutting down")]
    ShuttingDown,
}

fn leader_hint(leader: Option<u64>) -> String {
    leader
        .map(|id| format!(" (last leader: coordinator {id})"))
        .unwrap_or_default()
}

/// Result alias of the coordinator.
pub type CoordinatorResult<T> = Result<T, CoordinatorError>;

impl From<CoordinatorError> for Status {
    fn from(error: CoordinatorError) -> Self {
        let message = error.to_string();
        match error {
            CoordinatorError::NoLeader(_)
            | CoordinatorError::LeaderChanged { .. }
            | CoordinatorError::ShuttingDown => Status::unavailable(message),
            CoordinatorError::ProposalTimedOut { .. } | CoordinatorError::ReadTimedOut(_) => {
                Status::deadline_exceeded(message)
            }
            CoordinatorError::Rejected(_) => Status::failed_precondition(message),
            CoordinatorError::Storage(_) | CoordinatorError::Raft(_) => Status::internal(message),
        }
    }
}

impl From<PlacementError> for Status {
    fn from(error: PlacementError) -> Self {
        let message = error.to_string();
        match error {
            PlacementError::UnreadableConfig(_)
            | PlacementError::NoModelId
            | PlacementError::MissingModel
            | PlacementError::SeveralModels(_) => Status::invalid_argument(message),
            PlacementError::UnknownModel { .. } => Status::not_found(message),
            PlacementError::NoModelLoaded | PlacementError::NoRoom(_) => {
                Status::failed_precondition(message)
            }
        }
    }
}
