//! One expert node's call: the `ComputeRequest` carrying the node's share of
//! a batch, sent with its share of the forward's deadline, the node's
//! reported compute time, and what a failure means for that share: retry it
//! on another replica, or fail the forward.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use moemesh_proto::codec::{decode_rows, encode_rows};
use moemesh_proto::v1::ComputeRequest;
use tonic::{Code, Request, Status};

use crate::RouterError;
use crate::dispatch::NodeBatch;
use crate::table::NodeLink;

/// What a failed node call means for the node's share of the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The node did not answer: it is down, unreachable or too slow for
    /// the attempt's share of the deadline (a transport error,
    /// UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED, UNKNOWN, ABORTED). The
    /// share goes to another replica, and the node is avoided for a while.
    Unreachable,
    /// The node refused the work because its queue is full
    /// (RESOURCE_EXHAUSTED). The share goes to another replica; the node is
    /// healthy and stays in use.
    Overloaded,
    /// The node does not hold an expert the routing table lists it for: it
    /// restarted empty under the same id, or dropped the expert before the
    /// router saw the new epoch (FAILED_PRECONDITION, or INVALID_ARGUMENT
    /// saying "not held"). The share goes to another replica; the node is
    /// alive and keeps serving the experts it holds.
    StaleReplica,
    /// The request itself failed: the node found it bad (INVALID_ARGUMENT),
    /// a reply exceeds a message size limit (OUT_OF_RANGE, or
    /// RESOURCE_EXHAUSTED from a size check), the node failed computing it
    /// (INTERNAL from the node itself) or answered malformed rows. Every
    /// replica computes the same bits, so another would fail the same way:
    /// the forward fails at once with the code the client sees, and the
    /// node stays healthy.
    Rejected(Code),
}

impl FailureKind {
    /// The kind of failure a node call's status stands for. An INTERNAL
    /// status that carries a source was made on this side from a broken
    /// connection (an HTTP/2 stream reset when the node died), not sent by
    /// the node: the node did not answer.
    pub fn of_status(status: &Status) -> Self {
        let message = status.message();
        match status.code() {
            Code::Internal if std::error::Error::source(status).is_some() => Self::Unreachable,
            Code::ResourceExhausted if is_size_limit(message) => Self::Rejected(Code::OutOfRange),
            Code::InvalidArgument if message.contains("not held") => Self::StaleReplica,
            code => Self::of_code(code),
        }
    }

    /// The kind of failure a node's gRPC status code stands for.
    pub fn of_code(code: Code) -> Self {
        match code {
            Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Unknown
            | Code::Aborted => Self::Unreachable,
            Code::ResourceExhausted => Self::Overloaded,
            Code::FailedPrecondition => Self::StaleReplica,
            Code::InvalidArgument | Code::OutOfRange => Self::Rejected(code),
            _ => Self::Rejected(Code::Internal),
        }
    }

    /// Whether the share may go to another replica: expert compute has no
    /// side effects, so a retry is safe whenever another node might answer.
    pub fn is_retryable(self) -> bool {
        !matches!(self, Self::Rejected(_))
    }
}

/// Whether `message` is tonic's refusal of a message over a size limit
/// (a compressed message that grows past the limit, or a body over 4 GiB),
/// which tonic reports as RESOURCE_EXHAUSTED although no queue is full.
fn is_size_limit(message: &str) -> bool {
    message.contains("size limit") || message.contains("more than 4GB")
}

/// A node call that failed.
#[derive(Debug)]
pub struct NodeFailure {
    pub kind: FailureKind,
    /// Names the node and what went wrong; the client reads it in the
    /// status message when the forward fails for it.
    pub message: String,
    /// For a stale replica: the experts of the share the node says it does
    /// not hold (all of them when it names none). Empty otherwise.
    pub missing_experts: Vec<u32>,
}

impl NodeFailure {
    /// A failure of `kind` that `message` explains.
    pub fn new(kind: FailureKind, message: String) -> Self {
        Self {
            kind,
            message,
            missing_experts: Vec::new(),
        }
    }
}

/// The experts of `sent` that a node's `message` names ("expert 3 of layer
/// 0 is not held here"); all of `sent` when it names none of them ("layer 0
/// is not held here").
pub fn missing_experts(message: &str, sent: &[u32]) -> Vec<u32> {
    let named: Vec<u32> = sent
        .iter()
        .copied()
        .filter(|&expert| {
            let name = format!("expert {expert}");
            message.match_indices(&name).any(|(at, _)| {
                !message[at + name.len()..].starts_with(|next: char| next.is_ascii_digit())
            })
        })
        .collect();
    if named.is_empty() {
        sent.to_vec()
    } else {
        named
    }
}

impl fmt::Display for NodeFailure {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.message)
    }
}

impl From<NodeFailure> for RouterError {
    fn from(failure: NodeFailure) -> Self {
        match failure.kind {
            FailureKind::Unreachable | FailureKind::StaleReplica => {
                RouterError::Unavailable(failure.message)
            }
            FailureKind::Overloaded => RouterError::Overloaded(failure.message),
            FailureKind::Rejected(Code::InvalidArgument) => {
                RouterError::InvalidArgument(failure.message)
            }
            FailureKind::Rejected(Code::OutOfRange) => RouterError::OutOfRange(failure.message),
            FailureKind::Rejected(_) => RouterError::Internal(failure.message),
        }
    }
}

/// A node's answer to its share.
#[derive(Debug)]
pub struct NodeAnswer {
    /// One weighted row per token-expert pair of the share: per expert by
    /// ascending id, its rows in request order.
    pub partials: Vec<f32>,
    /// The node's own compute time, in microseconds.
    pub compute_micros: u64,
}

/// One call to one expert node, built when the forward's round starts and
/// sent by [`NodeCall::send`].
pub struct NodeCall {
    link: NodeLink,
    request: ComputeRequest,
    /// Rows the node answers with: one per token-expert pair.
    pairs: usize,
    hidden_size: usize,
    /// How long this attempt may take: the node gets it as its
    /// `grpc-timeout`, and the call is abandoned when it passes.
    timeout: Duration,
}

impl NodeCall {
    /// A call that sends `link`'s node the share `batch` of layer `layer`
    /// of model `model`, its token rows taken from `hidden`, and waits for
    /// the answer at most `timeout`.
    pub fn new(
        link: &NodeLink,
        model: &str,
        layer: usize,
        hidden: &[f32],
        hidden_size: usize,
        batch: &NodeBatch,
        timeout: Duration,
    ) -> Self {
        let request = ComputeRequest {
            model: model.to_string(),
            layer: layer as u32,
            rows: Some(gather_rows(hidden, hidden_size, batch)),
            experts: batch.expert_rows(),
        };
        Self {
            link: link.clone(),
            request,
            pairs: batch.pairs(),
            hidden_size,
            timeout: timeout.max(Duration::from_millis(1)),
        }
    }

    /// Sends the share and returns the node's partial rows; the pairs count
    /// as the node's outstanding work until the call ends, however it ends.
    pub async fn send(self) -> Result<NodeAnswer, NodeFailure> {
        let Self {
            mut link,
            request,
            pairs,
            hidden_size,
            timeout,
        } = self;
        let _in_flight = InFlight::count(&link.in_flight, pairs as u64);
        let layer = request.layer;
        let experts: Vec<u32> = request.experts.iter().map(|rows| rows.expert).collect();
        let describe = |what: &str| {
            format!(
                "expert node {} ({}) failed layer {layer} experts {experts:?}: {what}",
                link.node.id, link.node.address
            )
        };
        let mut request = Request::new(request);
        request.set_timeout(timeout);
        // The channel enforces the timeout once connected; this also bounds
        // a connection attempt to a node that never answers.
        let response = match tokio::time::timeout(timeout, link.client.compute(request)).await {
            Ok(Ok(response)) => response.into_inner(),
            Ok(Err(status)) => {
                let kind = FailureKind::of_status(&status);
                let mut failure = NodeFailure::new(kind, describe(status.message()));
                match kind {
                    FailureKind::StaleReplica => {
                        failure.missing_experts = missing_experts(status.message(), &experts);
                    }
                    FailureKind::Rejected(Code::OutOfRange) => {
                        failure.message.push_str("; send fewer tokens per forward");
                    }
                    _ => {}
                }
                return Err(failure);
            }
            Err(_) => {
                let message = describe(&format!("no answer within {timeout:?}"));
                return Err(NodeFailure::new(FailureKind::Unreachable, message));
            }
        };
        let malformed =
            |message: String| NodeFailure::new(FailureKind::Rejected(Code::Internal), message);
        let partials = decode_rows(response.output.as_ref(), hidden_size).map_err(|error| {
            malformed(format!(
                "expert node {} sent a bad reply: {error}",
                link.node.id
            ))
        })?;
        if partials.rows != pairs {
            return Err(malformed(format!(
                "expert node {} returned {} rows for {pairs}",
                link.node.id, partials.rows
            )));
        }
        Ok(NodeAnswer {
            partials: partials.values,
            compute_micros: response.compute_micros,
        })
    }
}

/// Packs the rows of the batch's tokens into one f32 tensor.
fn gather_rows(hidden: &[f32], hidden_size: usize, batch: &NodeBatch) -> moemesh_proto::Tensor {
    encode_rows(hidden, hidden_size, &batch.tokens)
}

/// Token-expert pairs counted as outstanding at a node while a call to it
/// runs, however the call ends.
struct InFlight<'a> {
    counter: &'a AtomicU64,
    pairs: u64,
}

impl<'a> InFlight<'a> {
    fn count(counter: &'a AtomicU64, pairs: u64) -> Self {
        counter.fetch_add(pairs, Ordering::Relaxed);
        Self { counter, pairs }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.counter.fetch_sub(self.pairs, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_of_nodes_that_do_not_answer_or_refuse_are_retried_elsewhere() {
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::Unknown,
            Code::Cancelled,
            Code::Aborted,
        ] {
            assert_eq!(
                FailureKind::of_code(code),
                FailureKind::Unreachable,
                "{code:?}"
            );
        }
        assert_eq!(
            FailureKind::of_code(Code::ResourceExhausted),
            FailureKind::Overloaded
        );
        assert!(FailureKind::Unreachable.is_retryable());
        assert!(FailureKind::Overloaded.is_retryable());
    }

    #[test]
    fn a_node_without_the_expert_is_a_stale_replica_in_either_form() {
        let sent_today =
            Status::invalid_argument("expert 3 of layer 0 is not held here; held: {0, 1}");
        let sent_as_precondition = Status::failed_precondition("not held: layer 0 expert 3");
        for status in [sent_today, sent_as_precondition] {
            let kind = FailureKind::of_status(&status);
            assert_eq!(kind, FailureKind::StaleReplica, "{status:?}");
            assert!(kind.is_retryable());
        }
        let failure = NodeFailure::new(FailureKind::StaleReplica, "no replica left".into());
        assert_eq!(
            Status::from(RouterError::from(failure)).code(),
            Code::Unavailable
        );
    }

    #[test]
    fn a_stale_replica_names_the_experts_it_lacks_or_lacks_all() {
        let sent = [1, 3, 12];
        let one = "expert 3 of layer 0 is not held here; held: {0, 1}";
        assert_eq!(missing_experts(one, &sent), vec![3]);
        assert_eq!(
            missing_experts("not held: layer 0 expert 12", &sent),
            vec![12]
        );
        let layer = "layer 0 is not held here; this node holds layers []";
        assert_eq!(missing_experts(layer, &sent), vec![1, 3, 12]);
    }

    #[test]
    fn request_errors_fail_the_forward_with_their_code() {
        let cases = [
            (
                Status::invalid_argument("weight NaN"),
                Code::InvalidArgument,
            ),
            (
                Status::out_of_range(
                    "Error, decoded message length too large: found 300000000 bytes, \
                     the limit is: 268435456 bytes",
                ),
                Code::OutOfRange,
            ),
            (
                Status::resource_exhausted(
                    "Error decompressing: size limit, of 268435456 bytes, exceeded while \
                     decompressing message",
                ),
                Code::OutOfRange,
            ),
            (Status::internal("expert failed"), Code::Internal),
            (Status::permission_denied("routers only"), Code::Internal),
            (Status::unimplemented("no such service"), Code::Internal),
        ];
        for (status, client_code) in cases {
            let kind = FailureKind::of_status(&status);
            assert_eq!(kind, FailureKind::Rejected(client_code), "{status:?}");
            assert!(!kind.is_retryable());
            let failure = NodeFailure::new(kind, status.message().into());
            assert_eq!(Status::from(RouterError::from(failure)).code(), client_code);
        }
    }

    #[test]
    fn a_transport_error_counts_as_unreachable() {
        // tonic reports a refused or broken connection as UNAVAILABLE.
        let status = Status::from_error(Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "connection refused",
        )));
        assert_eq!(FailureKind::of_status(&status), FailureKind::Unreachable);
    }

    #[test]
    fn a_connection_broken_mid_call_counts_as_unreachable() {
        let mut broken = Status::internal("h2 protocol error: stream reset");
        broken.set_source(std::sync::Arc::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "connection reset",
        )));
        assert_eq!(FailureKind::of_status(&broken), FailureKind::Unreachable);
        // The same code sent by the node itself is a compute failure.
        let sent = Status::internal("expert failed");
        assert_eq!(
            FailureKind::of_status(&sent),
            FailureKind::Rejected(Code::Internal)
        );
    }

    #[test]
    fn failures_keep_their_message_and_map_to_the_matching_status() {
        let cases = [
            (
                FailureKind::Unreachable,
                "node down",
                Code::Unavailable,
                "node down",
            ),
            (
                FailureKind::Overloaded,
                "queue full",
                Code::ResourceExhausted,
                "queue full",
            ),
            (
                FailureKind::Rejected(Code::Internal),
                "bad rows",
                Code::Internal,
                "internal error: bad rows",
            ),
        ];
        for (kind, message, code, status_message) in cases {
            let failure = NodeFailure::new(kind, message.into());
            assert_eq!(failure.to_string(), message);
            let status = Status::from(RouterError::from(failure));
            assert_eq!((status.code(), status.message()), (code, status_message));
        }
    }

    #[test]
    fn a_batch_sends_each_of_its_tokens_rows_once_in_order() {
        let batch = NodeBatch {
            tokens: vec![0, 2],
            ..NodeBatch::default()
        };
        let hidden = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let tensor = gather_rows(&hidden, 2, &batch);
        let rows = decode_rows(Some(&tensor), 2).unwrap();
        assert_eq!((rows.rows, rows.values), (2, vec![1.0, 2.0, 5.0, 6.0]));
    }
}
