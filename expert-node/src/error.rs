use moemesh_core::CoreError;
use moemesh_proto::codec::CodecError;

/// Errors of an expert node; each maps to one gRPC status code.
#[derive(Debug, thiserror::Error)]
pub enum ExpertNodeError {
    /// The request is malformed or names something this node does not hold.
    #[error("{0}")]
    InvalidArgument(String),
    /// The work queue is full; the caller should try another replica.
    #[error("expert node overloaded: {0}")]
    Overloaded(String),
    /// A tensor in the request is missing or malformed.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The checkpoint or config could not be loaded.
    #[error(transparent)]
    Core(#[from] CoreError),
    /// The node is shutting down or its worker stopped.
    #[error("expert node unavailable: {0}")]
    Unavailable(String),
    /// A bug or a failure of the runtime.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Result alias of the expert node.
pub type ExpertNodeResult<T> = Result<T, ExpertNodeError>;

impl From<ExpertNodeError> for tonic::Status {
    fn from(error: ExpertNodeError) -> Self {
        let message = error.to_string();
        match error {
            ExpertNodeError::InvalidArgument(_) => Self::invalid_argument(message),
            ExpertNodeError::Overloaded(_) => Self::resource_exhausted(message),
            ExpertNodeError::Codec(_) | ExpertNodeError::Core(CoreError::NotFound(_)) => {
                Self::invalid_argument(message)
            }
            ExpertNodeError::Core(_) | ExpertNodeError::Internal(_) => Self::internal(message),
            ExpertNodeError::Unavailable(_) => Self::unavailable(message),
        }
    }
}
