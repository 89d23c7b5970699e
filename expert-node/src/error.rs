use moemesh_core::CoreError;
use moemesh_proto::codec::CodecError;

/// Errors of an expert node; each maps to one gRPC status code.
#[derive(Debug, thiserror::Error)]
pub enum ExpertNodeError {
    /// The request is malformed, names a layer or expert the model does not
    /// have, asks for more than a node computes at once, or holds values
    /// that overflow f32. Sending it again, anywhere, fails the same way.
    #[error("{0}")]
    InvalidArgument(String),
    /// The request names experts of the model that this node does not hold
    /// (any longer): the caller's placement is stale, and another replica
    /// may hold them. The message starts with `not held: layer L expert E`
    /// and names each missing expert as `expert E`, which routers match on.
    #[error("not held: layer {layer} {}; {detail}", name_experts(.experts))]
    NotHeld {
        layer: usize,
        /// The missing experts, ascending; never empty.
        experts: Vec<u32>,
        /// What this node holds of the layer instead.
        detail: String,
    },
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

/// `expert 2, expert 5`: each expert named the way routers look for it.
fn name_experts(experts: &[u32]) -> String {
    let names: Vec<String> = experts
        .iter()
        .map(|expert| format!("expert {expert}"))
        .collect();
    names.join(", ")
}

/// Result alias of the expert node.
pub type ExpertNodeResult<T> = Result<T, ExpertNodeError>;

impl From<ExpertNodeError> for tonic::Status {
    fn from(error: ExpertNodeError) -> Self {
        let message = error.to_string();
        match error {
            ExpertNodeError::InvalidArgument(_) => Self::invalid_argument(message),
            ExpertNodeError::NotHeld { .. } => Self::failed_precondition(message),
            ExpertNodeError::Overloaded(_) => Self::resource_exhausted(message),
            ExpertNodeError::Codec(_) | ExpertNodeError::Core(CoreError::NotFound(_)) => {
                Self::invalid_argument(message)
            }
            ExpertNodeError::Core(_) | ExpertNodeError::Internal(_) => Self::internal(message),
            ExpertNodeError::Unavailable(_) => Self::unavailable(message),
        }
    }
}
