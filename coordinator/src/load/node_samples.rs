//! The expert nodes' side of the load window: their heartbeats' samples,
//! what a node did between two of them, and the counts of its one-hop
//! clients.

use std::time::Instant;

use moemesh_proto::v1::{ExpertTokens, HeartbeatRequest, NodeWork};

use super::Counts;

/// An expert node's heartbeat (its queue now, its cumulative work and
/// Expert Buffering counters) and when it arrived.
#[derive(Debug, Clone)]
pub(super) struct NodeSample {
    pub(super) at: Instant,
    pub(super) heartbeat: HeartbeatRequest,
}

/// The cumulative counters of a heartbeat, for telling growth from a restart.
fn node_counters(heartbeat: &HeartbeatRequest) -> [u64; 6] {
    [
        heartbeat.busy_micros,
        heartbeat.pairs,
        heartbeat.buffer_hits,
        heartbeat.buffer_misses,
        heartbeat.bytes_paged_in,
        heartbeat.host_fallbacks,
    ]
}

/// Whether any cumulative counter of `newer` is below `older`'s.
pub(super) fn went_backwards(older: &HeartbeatRequest, newer: &HeartbeatRequest) -> bool {
    node_counters(newer)
        .iter()
        .zip(node_counters(older))
        .any(|(now, then)| *now < then)
}

/// A node's work between its oldest sample in the window and its newest:
/// rates over that span (0 until it spans any time), the queue and the
/// cumulative counts as of the newest. Samples before a restart are gone
/// (see [`super::LoadTracker::record_node`]); growth saturates all the same.
pub(super) fn window_work(node: &str, first: &NodeSample, last: &NodeSample) -> NodeWork {
    let (oldest, newest) = (&first.heartbeat, &last.heartbeat);
    let seconds = last.at.duration_since(first.at).as_secs_f64();
    let growth =
        |counter: fn(&HeartbeatRequest) -> u64| counter(newest).saturating_sub(counter(oldest));
    let per_second = |counter: fn(&HeartbeatRequest) -> u64| {
        if seconds > 0.0 {
            growth(counter) as f64 / seconds
        } else {
            0.0
        }
    };
    let (hits, misses) = (
        growth(|heartbeat| heartbeat.buffer_hits),
        growth(|heartbeat| heartbeat.buffer_misses),
    );
    NodeWork {
        node: node.to_string(),
        queue_depth: newest.queue_depth,
        busy_fraction: (per_second(|heartbeat| heartbeat.busy_micros) / 1e6).min(1.0),
        pairs_per_second: per_second(|heartbeat| heartbeat.pairs),
        device: String::new(),
        // No lookup in the window: nothing missed.
        buffer_hit_rate: if hits.saturating_add(misses) == 0 {
            1.0
        } else {
            hits as f64 / (hits as f64 + misses as f64)
        },
        bytes_paged_in_per_second: per_second(|heartbeat| heartbeat.bytes_paged_in),
        host_fallbacks_per_second: per_second(|heartbeat| heartbeat.host_fallbacks),
        buffer_hits: newest.buffer_hits,
        buffer_misses: newest.buffer_misses,
        bytes_paged_in: newest.bytes_paged_in,
        host_fallbacks: newest.host_fallbacks,
    }
}

/// A heartbeat's per-expert counts of its one-hop clients as a router
/// reports them, a vector per layer, with at most `limit` counters in all:
/// no expert id, however large, makes one longer.
pub(super) fn dense_counts(experts: &[ExpertTokens], limit: usize) -> Counts {
    let mut layers = Counts::new();
    let mut room = limit;
    for count in experts {
        let index = count.expert as usize;
        let tokens = layers.entry(count.layer).or_default();
        if index >= tokens.len() {
            let grown = index + 1 - tokens.len();
            if grown > room {
                continue;
            }
            room -= grown;
            tokens.resize(index + 1, 0);
        }
        tokens[index] = tokens[index].saturating_add(count.tokens);
    }
    layers.retain(|_, tokens| !tokens.is_empty());
    layers
}
