use moemesh_core::CoreError;
use moemesh_proto::codec::CodecError;

/// Errors of a router node; each maps to one gRPC status code.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// The request is malformed or names an unknown model or layer.
    #[error("{0}")]
    InvalidArgument(String),
    /// An expert node needed for the request could not be reached.
    #[error("{0}")]
    Unavailable(String),
    /// The router has as many forwards in progress as it admits, or an
    /// expert node refused the work because its queue was full.
    #[error("{0}")]
    Overloaded(String),
    /// The forward's deadline passed before every expert node answered.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// A message on the way exceeds a size limit (an expert node's reply
    /// over the router's message limit); a smaller batch fits.
    #[error("{0}")]
    OutOfRange(String),
    /// A tensor in the request is missing or malformed.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The checkpoint, config or placement could not be loaded.
    #[error(transparent)]
    Core(#[from] CoreError),
    /// A bug or a failure of the runtime, or an expert node misbehaving.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Result alias of the router node.
pub type RouterResult<T> = Result<T, RouterError>;

impl From<RouterError> for tonic::Status {
    fn from(error: RouterError) -> Self {
        let message = error.to_string();
        match error {
            RouterError::InvalidArgument(_)
            | RouterError::Codec(_)
            | RouterError::Core(CoreError::NotFound(_)) => Self::invalid_argument(message),
            RouterError::Unavailable(_) => Self::unavailable(message),
            RouterError::Overloaded(_) => Self::resource_exhausted(message),
            RouterError::DeadlineExceeded(_) => Self::deadline_exceeded(message),
            RouterError::OutOfRange(_) => Self::out_of_range(message),
            RouterError::Core(_) | RouterError::Internal(_) => Self::internal(message),
        }
    }
}
