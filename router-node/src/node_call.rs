//! One expert node's call: the `ComputeRequest` carrying the node's share of
//! a batch, sent with what is left of the forward's deadline, the node's
//! reported compute time, and what a failure means for that share: retry it
//! on another replica, or fail the forward.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use moemesh_proto::codec::{WireDtype, decode_rows, encode};
use moemesh_proto::v1::ComputeRequest;
use tonic::{Code, Request, Status};

use crate::RouterError;
use crate::dispatch::NodeBatch;
use crate::table::NodeLink;

/// What a failed node call means for the node's share of the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The node did not answer: it is down, unreachable or too slow
    /// (UNAVAILABLE, DEADLINE_EXCEEDED, a transport error, or any code not
    /// named below). The share goes to another replica, and the node is
    /// avoided for a while.
    Unreachable,
    /// The node refused the work because its queue is full
    /// (RESOURCE_EXHAUSTED). The share goes to another replica; the node is
    /// healthy and stays in use.
    Overloaded,
    /// The node found the request bad or failed computing it
    /// (INVALID_ARGUMENT, INTERNAL from the node itself), or answered with
    /// malformed rows. Every replica computes the same bits, so the forward
    /// fails.
    Final,
}

impl FailureKind {
    /// The kind of failure a node call's status stands for. An INTERNAL
    /// status that carries a source was made on this side from a broken
    /// connection (an HTTP/2 stream reset when the node died), not sent by
    /// the node: the node did not answer.
    pub fn of_status(status: &Status) -> Self {
        if status.code() == Code::Internal && std::error::Error::source(status).is_some() {
            return Self::Unreachable;
        }
        Self::of_code(status.code())
    }

    /// The kind of failure a node's gRPC status code stands for.
    pub fn of_code(code: Code) -> Self {
        match code {
            Code::ResourceExhausted => Self::Overloaded,
            Code::InvalidArgument | Code::Internal => Self::Final,
            _ => Self::Unreachable,
        }
    }

    /// Whether the share may go to another replica: expert compute has no
    /// side effects, so a retry is safe whenever another node might answer.
    pub fn is_retryable(self) -> bool {
        self != Self::Final
    }
}

/// A node call that failed.
#[derive(Debug)]
pub struct NodeFailure {
    pub kind: FailureKind,
    /// Names the node and what went wrong; the client reads it in the
    /// status message when the forward fails for it.
    pub message: String,
}

impl fmt::Display for NodeFailure {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.message)
    }
}

impl From<NodeFailure> for RouterError {
    fn from(failure: NodeFailure) -> Self {
        match failure.kind {
            FailureKind::Unreachable => RouterError::Unavailable(failure.message),
            FailureKind::Overloaded => RouterError::Overloaded(failure.message),
            FailureKind::Final => RouterError::Internal(failure.message),
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
    /// What was left of the forward's deadline when the call was built; the
    /// node gets it as its `grpc-timeout`.
    timeout: Duration,
}

impl NodeCall {
    /// A call that sends `link`'s node the share `batch` of layer `layer`
    /// of model `model`, its token rows taken from `hidden`.
    pub fn new(
        link: &NodeLink,
        model: &str,
        layer: usize,
        hidden: &[f32],
        hidden_size: usize,
        batch: &NodeBatch,
        deadline: Instant,
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
            timeout: deadline.saturating_duration_since(Instant::now()),
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
        let describe = |status: &Status| {
            format!(
                "expert node {} ({}) failed layer {layer} experts {experts:?}: {}",
                link.node.id,
                link.node.address,
                status.message()
            )
        };
        let mut request = Request::new(request);
        request.set_timeout(timeout.max(Duration::from_millis(1)));
        let response = link
            .client
            .compute(request)
            .await
            .map_err(|status| NodeFailure {
                kind: FailureKind::of_status(&status),
                message: describe(&status),
            })?
            .into_inner();
        let malformed = |message: String| NodeFailure {
            kind: FailureKind::Final,
            message,
        };
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
    let mut values = Vec::with_capacity(batch.tokens.len() * hidden_size);
    for &token in &batch.tokens {
        let token = token as usize;
        values.extend_from_slice(&hidden[token * hidden_size..(token + 1) * hidden_size]);
    }
    encode(&values, &[batch.tokens.len(), hidden_size], WireDtype::F32)
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
            Code::NotFound,
            Code::FailedPrecondition,
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
    fn bad_requests_and_compute_failures_fail_the_forward() {
        for code in [Code::InvalidArgument, Code::Internal] {
            assert_eq!(FailureKind::of_code(code), FailureKind::Final, "{code:?}");
        }
        assert!(!FailureKind::Final.is_retryable());
    }

    #[test]
    fn a_transport_error_counts_as_unreachable() {
        // tonic reports a refused or broken connection as UNAVAILABLE.
        let status = Status::from_error(Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "connection refused",
        )));
        assert_eq!(
            FailureKind::of_code(status.code()),
            FailureKind::Unreachable
        );
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
        assert_eq!(FailureKind::of_status(&sent), FailureKind::Final);
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
                FailureKind::Final,
                "bad rows",
                Code::Internal,
                "internal error: bad rows",
            ),
        ];
        for (kind, message, code, status_message) in cases {
            let failure = NodeFailure {
                kind,
                message: message.into(),
            };
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
