//! What a router tells Prometheus: tokens and (token, expert) pairs routed
//! per layer, forwards by status code and their latency, forwards in
//! flight, activation bytes sent to expert nodes, and the placement epoch
//! it routes by. Labels take bounded values only (layers, status codes);
//! per-expert load goes to the coordinators' load window instead.

use std::time::Duration;

use moemesh_telemetry::GaugeGuard;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LayerLabels {
    layer: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    code: String,
}

/// A router's metric families. Cheap to clone: clones share the values.
#[derive(Clone, Debug)]
pub struct RouterMetrics {
    tokens: Family<LayerLabels, Counter>,
    pairs: Family<LayerLabels, Counter>,
    forwards: Family<CodeLabels, Counter>,
    forward_seconds: Histogram,
    in_flight: Gauge,
    bytes_sent: Counter,
    placement_epoch: Gauge,
}

impl Default for RouterMetrics {
    /// Metrics that count but are exported nowhere (tests, embedding).
    fn default() -> Self {
        Self {
            tokens: Family::default(),
            pairs: Family::default(),
            forwards: Family::default(),
            // 50 µs to about 26 s.
            forward_seconds: Histogram::new(exponential_buckets(0.00005, 2.0, 20)),
            in_flight: Gauge::default(),
            bytes_sent: Counter::default(),
            placement_epoch: Gauge::default(),
        }
    }
}

impl RouterMetrics {
    /// Registers every family into `registry` (a process's, prefixed `moemesh_`).
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "router_tokens",
            "Tokens routed, per MoE layer",
            metrics.tokens.clone(),
        );
        registry.register(
            "router_pairs",
            "(token, routed expert) pairs dispatched, per MoE layer",
            metrics.pairs.clone(),
        );
        registry.register(
            "router_forwards",
            "Forwards answered, by gRPC status code",
            metrics.forwards.clone(),
        );
        registry.register(
            "router_forward_seconds",
            "Time from a forward's arrival to its answer",
            metrics.forward_seconds.clone(),
        );
        registry.register(
            "router_in_flight",
            "Forwards in progress",
            metrics.in_flight.clone(),
        );
        registry.register(
            "router_bytes_sent",
            "Activation bytes sent to expert nodes",
            metrics.bytes_sent.clone(),
        );
        registry.register(
            "placement_epoch",
            "The placement epoch this process routes by",
            metrics.placement_epoch.clone(),
        );
        metrics
    }

    /// Counts `tokens` routed in `layer`, each to `pairs / tokens` experts.
    pub fn count_routed(&self, layer: usize, tokens: usize, pairs: usize) {
        let labels = LayerLabels {
            layer: layer as u32,
        };
        self.tokens.get_or_create(&labels).inc_by(tokens as u64);
        self.pairs.get_or_create(&labels).inc_by(pairs as u64);
    }

    /// Counts `bytes` of activations sent to expert nodes.
    pub fn count_bytes_sent(&self, bytes: usize) {
        self.bytes_sent.inc_by(bytes as u64);
    }

    /// Records the placement epoch now routed by.
    pub fn set_placement_epoch(&self, epoch: u64) {
        self.placement_epoch.set(epoch as i64);
    }

    /// Marks a forward in progress until the returned guard drops.
    pub fn start_forward(&self) -> GaugeGuard {
        GaugeGuard::raise(&self.in_flight)
    }

    /// Counts a finished forward: its status code and how long it took.
    pub fn finish_forward(&self, code: tonic::Code, elapsed: Duration) {
        self.forwards
            .get_or_create(&CodeLabels {
                code: moemesh_telemetry::code_label(code),
            })
            .inc();
        self.forward_seconds.observe(elapsed.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registered_router_exports_what_it_counted() {
        let mut registry = Registry::with_prefix("moemesh");
        let metrics = RouterMetrics::register(&mut registry);
        metrics.count_routed(3, 5, 10);
        metrics.count_bytes_sent(640);
        metrics.set_placement_epoch(7);
        {
            let _in_flight = metrics.start_forward();
            metrics.finish_forward(tonic::Code::Ok, Duration::from_millis(3));
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            "moemesh_router_tokens_total{layer=\"3\"} 5",
            "moemesh_router_pairs_total{layer=\"3\"} 10",
            "moemesh_router_forwards_total{code=\"ok\"} 1",
            "moemesh_router_forward_seconds_count 1",
            "moemesh_router_in_flight 0",
            "moemesh_router_bytes_sent_total 640",
            "moemesh_placement_epoch 7",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
