//! What an expert node tells Prometheus: Compute calls by status code and
//! their latency (whole call and compute alone), token rows and
//! token-expert pairs computed, the work queue and calls in flight, tensor
//! bytes in and out, Expert Buffering's hits and misses, the experts
//! resident and the placement epoch the node follows. Labels take bounded
//! values only (status codes); per-expert load goes to the coordinators
//! through heartbeats and `Info`, not to label sets.

use std::time::{Duration, Instant};

use moemesh_core::compute::buffering::BufferCounters;
use moemesh_telemetry::GaugeGuard;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    code: String,
}

/// An expert node's metric families. Cheap to clone: clones share the values.
#[derive(Clone, Debug)]
pub struct ExpertMetrics {
    requests: Family<CodeLabels, Counter>,
    tokens: Counter,
    pairs: Counter,
    compute_seconds: Histogram,
    request_seconds: Histogram,
    queue_depth: Gauge,
    in_flight: Gauge,
    bytes_sent: Counter,
    bytes_received: Counter,
    buffer_hits: Counter,
    buffer_misses: Counter,
    resident_experts: Gauge,
    placement_epoch: Gauge,
}

/// 100 µs to about 52 s.
fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 20))
}

impl Default for ExpertMetrics {
    /// Metrics that count but are exported nowhere (tests, in-process nodes).
    fn default() -> Self {
        Self {
            requests: Family::default(),
            tokens: Counter::default(),
            pairs: Counter::default(),
            compute_seconds: seconds_histogram(),
            request_seconds: seconds_histogram(),
            queue_depth: Gauge::default(),
            in_flight: Gauge::default(),
            bytes_sent: Counter::default(),
            bytes_received: Counter::default(),
            buffer_hits: Counter::default(),
            buffer_misses: Counter::default(),
            resident_experts: Gauge::default(),
            placement_epoch: Gauge::default(),
        }
    }
}

impl ExpertMetrics {
    /// Registers every family into `registry` (a process's, prefixed `moemesh_`).
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "expert_requests",
            "Compute calls answered, by gRPC status code",
            metrics.requests.clone(),
        );
        registry.register(
            "expert_tokens",
            "Token rows computed",
            metrics.tokens.clone(),
        );
        registry.register(
            "expert_pairs",
            "Token-expert pairs computed",
            metrics.pairs.clone(),
        );
        registry.register(
            "expert_compute_seconds",
            "Time the device worker spent on one Compute call, from taking it off the queue to its result",
            metrics.compute_seconds.clone(),
        );
        registry.register(
            "expert_request_seconds",
            "Time from a Compute call's arrival to its answer, queueing included",
            metrics.request_seconds.clone(),
        );
        registry.register(
            "expert_queue_depth",
            "Compute calls admitted and waiting for the device worker",
            metrics.queue_depth.clone(),
        );
        registry.register(
            "expert_in_flight",
            "Compute calls in progress, queued or computing",
            metrics.in_flight.clone(),
        );
        registry.register(
            "expert_bytes_sent",
            "Bytes of output tensors sent in Compute answers",
            metrics.bytes_sent.clone(),
        );
        registry.register(
            "expert_bytes_received",
            "Bytes of input tensors received in Compute calls",
            metrics.bytes_received.clone(),
        );
        registry.register(
            "expert_buffer_hits",
            "Experts a Compute call needed that were resident",
            metrics.buffer_hits.clone(),
        );
        registry.register(
            "expert_buffer_misses",
            "Experts a Compute call needed that were not resident (paged in, streamed or computed where they wait)",
            metrics.buffer_misses.clone(),
        );
        registry.register(
            "expert_resident_experts",
            "Experts whose weights are resident on the compute device",
            metrics.resident_experts.clone(),
        );
        registry.register(
            "placement_epoch",
            "The placement epoch this node follows",
            metrics.placement_epoch.clone(),
        );
        metrics
    }

    /// Marks a Compute call in progress from now until the returned guard
    /// finishes or drops.
    pub fn start_request(&self) -> ComputeCall {
        self.in_flight.inc();
        ComputeCall {
            metrics: self.clone(),
            started: Instant::now(),
            finished: false,
        }
    }

    /// Counts a finished Compute call: its status code and how long it took.
    fn finish_request(&self, code: tonic::Code, elapsed: Duration) {
        self.in_flight.dec();
        self.requests
            .get_or_create(&CodeLabels {
                code: moemesh_telemetry::code_label(code),
            })
            .inc();
        self.request_seconds.observe(elapsed.as_secs_f64());
    }

    /// Counts a call admitted to the work queue until the returned guard
    /// drops: when the worker takes it up, or when it is refused or
    /// abandoned before.
    pub fn enqueue(&self) -> Queued {
        GaugeGuard::raise(&self.queue_depth)
    }

    /// Records the time the worker spent on one call, whether or not its
    /// result was good.
    pub fn observe_compute(&self, elapsed: Duration) {
        self.compute_seconds.observe(elapsed.as_secs_f64());
    }

    /// Counts the token rows and token-expert pairs of one call computed.
    pub fn count_computed(&self, tokens: usize, pairs: usize) {
        self.tokens.inc_by(tokens as u64);
        self.pairs.inc_by(pairs as u64);
    }

    /// Counts `bytes` of output tensors answered.
    pub fn count_bytes_sent(&self, bytes: usize) {
        self.bytes_sent.inc_by(bytes as u64);
    }

    /// Counts `bytes` of input tensors received.
    pub fn count_bytes_received(&self, bytes: usize) {
        self.bytes_received.inc_by(bytes as u64);
    }

    /// Counts the hits and misses Expert Buffering made between `before`
    /// and `now` (its cumulative counts), and records the experts resident.
    pub fn record_buffering(
        &self,
        before: BufferCounters,
        now: BufferCounters,
        resident_experts: usize,
    ) {
        self.buffer_hits
            .inc_by(now.hits.saturating_sub(before.hits));
        self.buffer_misses
            .inc_by(now.misses.saturating_sub(before.misses));
        self.resident_experts.set(resident_experts as i64);
    }

    /// Records the placement epoch the node now follows.
    pub fn set_placement_epoch(&self, epoch: u64) {
        self.placement_epoch.set(epoch as i64);
    }
}

/// A Compute call counted in flight. [`ComputeCall::finish`] counts it
/// under its status code; one dropped unfinished (its caller went away and
/// tonic dropped the handler) counts as `cancelled`.
#[derive(Debug)]
pub struct ComputeCall {
    metrics: ExpertMetrics,
    started: Instant,
    finished: bool,
}

impl ComputeCall {
    /// Counts the call answered with `code`.
    pub fn finish(mut self, code: tonic::Code) {
        self.finished = true;
        self.metrics.finish_request(code, self.started.elapsed());
    }
}

impl Drop for ComputeCall {
    fn drop(&mut self) {
        if !self.finished {
            self.metrics
                .finish_request(tonic::Code::Cancelled, self.started.elapsed());
        }
    }
}

/// A Compute call counted in the queue; dropping it counts it out.
pub type Queued = GaugeGuard;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registered_node_exports_what_it_counted() {
        let mut registry = Registry::with_prefix("moemesh");
        let metrics = ExpertMetrics::register(&mut registry);
        let call = metrics.start_request();
        let queued = metrics.enqueue();
        metrics.count_bytes_received(512);
        drop(queued);
        metrics.observe_compute(Duration::from_millis(2));
        metrics.count_computed(4, 8);
        metrics.count_bytes_sent(2048);
        call.finish(tonic::Code::Ok);
        // A call whose caller left before its answer.
        drop(metrics.start_request());
        let before = BufferCounters {
            hits: 5,
            misses: 1,
            ..Default::default()
        };
        let now = BufferCounters {
            hits: 9,
            misses: 3,
            ..Default::default()
        };
        metrics.record_buffering(before, now, 6);
        metrics.set_placement_epoch(12);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            "moemesh_expert_requests_total{code=\"ok\"} 1",
            "moemesh_expert_requests_total{code=\"cancelled\"} 1",
            "moemesh_expert_tokens_total 4",
            "moemesh_expert_pairs_total 8",
            "moemesh_expert_compute_seconds_count 1",
            "moemesh_expert_request_seconds_count 2",
            "moemesh_expert_queue_depth 0",
            "moemesh_expert_in_flight 0",
            "moemesh_expert_bytes_sent_total 2048",
            "moemesh_expert_bytes_received_total 512",
            "moemesh_expert_buffer_hits_total 4",
            "moemesh_expert_buffer_misses_total 2",
            "moemesh_expert_resident_experts 6",
            "moemesh_placement_epoch 12",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
