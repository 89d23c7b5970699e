//! moemesh-client: the Rust SDK for moemesh routers ([`Client`]) and
//! coordinators ([`CoordinatorClient`]).
//!
//! - [`router`]: [`Client`], forwards through a router, with deadlines and
//!   backoff when the cluster is overloaded.
//! - [`coordinator`]: [`CoordinatorClient`], one client for the coordinator
//!   group that moves to another coordinator when one fails, and follows
//!   the placement as a stream; [`admin`] has the operators' calls and
//!   [`membership`] the calls of expert nodes and routers.
//! - [`npy`]: `.npy` matrices for tools that read and write activations.
//!
//! ```no_run
//! # async fn example() -> Result<(), moemesh_client::ClientError> {
//! let mut client = moemesh_client::Client::connect("http://127.0.0.1:50051").await?;
//! let hidden = vec![0.5f32; 2 * 4096]; // two tokens of a hidden size 4096 model
//! let output = client.forward_f32("", 1, &hidden, 4096).await?;
//! assert_eq!(output.len(), hidden.len());
//! # Ok(()) }
//! ```

pub mod admin;
pub mod coordinator;
pub mod membership;
pub mod npy;
pub mod router;
mod tls_args;

pub use coordinator::CoordinatorClient;
pub use moemesh_proto::DEFAULT_DEADLINE;
pub use moemesh_proto::tls::TlsConfig;
pub use router::{Client, Timed};
pub use tls_args::TlsArgs;

use tonic::Code;

/// Errors the SDK returns.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The router address is not a valid URL, or the router cannot be reached.
    #[error("cannot connect to {address}: {message}")]
    Connect { address: String, message: String },
    /// The request was refused as malformed: wrong shape, dtype, values, model or layer.
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    /// The cluster is overloaded; retry later.
    #[error("overloaded: {0}")]
    Overloaded(String),
    /// A node needed for the request is unavailable.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The cluster refused a change that cannot be made in its current state.
    #[error("refused: {0}")]
    Refused(String),
    /// Any other failure the router reported.
    #[error("{code:?}: {message}")]
    Other { code: Code, message: String },
    /// The router replied with something that is not a valid tensor.
    #[error("bad reply from router: {0}")]
    BadReply(String),
}

impl From<tonic::Status> for ClientError {
    fn from(status: tonic::Status) -> Self {
        let message = status.message().to_string();
        match status.code() {
            Code::InvalidArgument => Self::InvalidArgument(message),
            Code::ResourceExhausted => Self::Overloaded(message),
            Code::Unavailable => Self::Unavailable(message),
            Code::FailedPrecondition => Self::Refused(message),
            code => Self::Other { code, message },
        }
    }
}
