//! The load window: how many tokens routers sent each expert (the load),
//! and how busy each expert node was and how often its experts were not
//! resident (its work and Expert Buffering), over the last minute or so.
//!
//! Soft state, in memory: routers and nodes report cumulative counters
//! every second or so, and the window is the difference between the newest
//! sample and the oldest one still inside it. Every coordinator keeps what
//! it hears; followers also hand reports to the leader, whose window the
//! rebalancer plans with. Nothing here goes through Raft: losing it loses
//! a minute of statistics, not placement.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use moemesh_proto::v1::{HeartbeatRequest, LayerLoad, NodeWork};

/// One router's cumulative counts at one moment: per layer, per expert.
type Counts = BTreeMap<u32, Vec<u64>>;

/// A router's cumulative dispatch totals: tokens, (token, node) sends, bytes.
type Dispatch = [u64; 3];

/// A router's samples, oldest first.
type RouterSamples = VecDeque<(Instant, (Counts, Dispatch))>;

/// An expert node's heartbeat (its queue now, its cumulative work and
/// Expert Buffering counters) and when it arrived.
#[derive(Debug, Clone)]
struct NodeSample {
    at: Instant,
    heartbeat: HeartbeatRequest,
}

/// The tokens routed to each expert of a model within the window.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerLoads {
    /// How many seconds the counts cover (less than the window while it fills).
    pub seconds: f64,
    pub layers: Vec<LayerLoad>,
}

/// Over the window, per token routed: the first routing level's figures.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DispatchPerToken {
    /// Expert nodes a token reached, on average.
    pub nodes: f64,
    /// Activation bytes sent to expert nodes.
    pub bytes: f64,
}

/// The load window of one coordinator.
pub struct LoadTracker {
    window: Duration,
    /// Per (model, router): samples, oldest first.
    routers: Mutex<HashMap<(String, String), RouterSamples>>,
    /// Per node, its heartbeats, oldest first.
    nodes: Mutex<HashMap<String, VecDeque<NodeSample>>>,
}

/// Drops samples that can no longer bound the window: keeps every sample
/// inside it and the newest one before it (the window's baseline).
fn trim<T>(samples: &mut VecDeque<(Instant, T)>, start: Instant) {
    while samples.len() > 1 && samples[1].0 <= start {
        samples.pop_front();
    }
}

impl LoadTracker {
    /// Keeps samples for `window`.
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            routers: Mutex::new(HashMap::new()),
            nodes: Mutex::new(HashMap::new()),
        }
    }

    fn window_start(&self, now: Instant) -> Instant {
        now.checked_sub(self.window).unwrap_or(now)
    }

    /// Records a router's cumulative counts for `model`, and its dispatch
    /// totals (tokens, (token, node) sends, bytes sent).
    pub fn record_router(
        &self,
        model: &str,
        router: &str,
        layers: &[LayerLoad],
        dispatch: Dispatch,
    ) {
        let now = Instant::now();
        let counts: Counts = layers
            .iter()
            .map(|layer| (layer.layer, layer.tokens.clone()))
            .collect();
        let mut routers = self.routers.lock().expect("load tracker");
        let samples = routers
            .entry((model.to_string(), router.to_string()))
            .or_default();
        samples.push_back((now, (counts, dispatch)));
        trim(samples, self.window_start(now));
    }

    /// Records an expert node's heartbeat.
    pub fn record_node(&self, heartbeat: &HeartbeatRequest) {
        let now = Instant::now();
        let start = self.window_start(now);
        let mut nodes = self.nodes.lock().expect("load tracker");
        let samples = nodes.entry(heartbeat.node.clone()).or_default();
        samples.push_back(NodeSample {
            at: now,
            heartbeat: heartbeat.clone(),
        });
        while samples.len() > 1 && samples[1].at <= start {
            samples.pop_front();
        }
    }

    /// Tokens per layer and expert within the window, summed over the
    /// routers that reported for `model`, and the seconds the counts cover.
    pub fn layer_loads(&self, model: &str) -> LayerLoads {
        let (seconds, layers, _) = self.sums(model);
        LayerLoads { seconds, layers }
    }

    /// How `model`'s tokens were dispatched over the window.
    pub fn dispatch(&self, model: &str) -> DispatchPerToken {
        let (_, _, [tokens, sends, bytes]) = self.sums(model);
        if tokens == 0 {
            return DispatchPerToken::default();
        }
        DispatchPerToken {
            nodes: sends as f64 / tokens as f64,
            bytes: bytes as f64 / tokens as f64,
        }
    }

    /// The window's sums for `model`: seconds covered, tokens per layer and
    /// expert, dispatch totals.
    fn sums(&self, model: &str) -> (f64, Vec<LayerLoad>, Dispatch) {
        let now = Instant::now();
        let start = self.window_start(now);
        let mut routers = self.routers.lock().expect("load tracker");
        // A router silent for a whole window has stopped: forget it.
        routers.retain(|_, samples| samples.back().is_some_and(|(at, _)| *at > start));
        let mut totals: Counts = BTreeMap::new();
        let mut dispatch: Dispatch = [0; 3];
        let mut covered = 0f64;
        for ((router_model, _), samples) in routers.iter_mut() {
            if router_model != model {
                continue;
            }
            trim(samples, start);
            let (Some((first_at, (first, first_dispatch))), Some((last_at, (last, last_dispatch)))) =
                (samples.front(), samples.back())
            else {
                continue;
            };
            covered = covered.max(last_at.duration_since(*first_at).as_secs_f64());
            for (total, (now, then)) in dispatch
                .iter_mut()
                .zip(last_dispatch.iter().zip(first_dispatch))
            {
                *total += now.saturating_sub(*then);
            }
            for (&layer, tokens) in last {
                let before = first.get(&layer);
                let total = totals.entry(layer).or_default();
                if total.len() < tokens.len() {
                    total.resize(tokens.len(), 0);
                }
                for (expert, &count) in tokens.iter().enumerate() {
                    let base = before
                        .and_then(|before| before.get(expert))
                        .copied()
                        .unwrap_or(0);
                    // A counter that went backwards belongs to a restarted router.
                    total[expert] += count.saturating_sub(base);
                }
            }
        }
        let layers = totals
            .into_iter()
            .map(|(layer, tokens)| LayerLoad { layer, tokens })
            .collect();
        (covered, layers, dispatch)
    }

    /// Each node's queue depth, busy share, throughput and Expert
    /// Buffering over the window, by node id; the device is left for the
    /// caller, who knows the nodes.
    pub fn node_work(&self) -> Vec<NodeWork> {
        let now = Instant::now();
        let start = self.window_start(now);
        let mut nodes = self.nodes.lock().expect("load tracker");
        nodes.retain(|_, samples| samples.back().is_some_and(|sample| sample.at > start));
        let mut work: Vec<NodeWork> = nodes
            .iter()
            .filter_map(|(node, samples)| {
                let (first, last) = (samples.front()?, samples.back()?);
                Some(window_work(node, first, last))
            })
            .collect();
        work.sort_by(|a, b| a.node.cmp(&b.node));
        work
    }
}

/// A node's work between its oldest sample in the window and its newest:
/// rates over that span (0 until it spans any time), the queue and the
/// cumulative counts as of the newest. A counter that went backwards
/// belongs to a restarted node and adds nothing.
fn window_work(node: &str, first: &NodeSample, last: &NodeSample) -> NodeWork {
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
        buffer_hit_rate: if hits + misses == 0 {
            1.0
        } else {
            hits as f64 / (hits + misses) as f64
        },
        bytes_paged_in_per_second: per_second(|heartbeat| heartbeat.bytes_paged_in),
        host_fallbacks_per_second: per_second(|heartbeat| heartbeat.host_fallbacks),
        buffer_hits: newest.buffer_hits,
        buffer_misses: newest.buffer_misses,
        bytes_paged_in: newest.bytes_paged_in,
        host_fallbacks: newest.host_fallbacks,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(layer: u32, tokens: &[u64]) -> LayerLoad {
        LayerLoad {
            layer,
            tokens: tokens.to_vec(),
        }
    }

    #[test]
    fn the_window_sums_routers_differences() {
        let tracker = LoadTracker::new(Duration::from_secs(60));
        tracker.record_router("m", "r1", &[layer(0, &[10, 0, 5])], [10, 15, 150]);
        tracker.record_router("m", "r2", &[layer(0, &[100, 100, 100])], [0; 3]);
        tracker.record_router("other", "r3", &[layer(0, &[1, 1, 1])], [0; 3]);
        std::thread::sleep(Duration::from_millis(5));
        tracker.record_router(
            "m",
            "r1",
            &[layer(0, &[30, 4, 5]), layer(1, &[7])],
            [30, 45, 450],
        );
        tracker.record_router("m", "r2", &[layer(0, &[101, 110, 100])], [0; 3]);
        tracker.record_router("other", "r3", &[layer(0, &[9, 9, 9])], [0; 3]);
        let LayerLoads {
            seconds: covered,
            layers,
        } = tracker.layer_loads("m");
        assert!(covered > 0.0);
        assert_eq!(layers, vec![layer(0, &[21, 14, 0]), layer(1, &[7])]);
        // r1 sent 20 tokens 30 times (1.5 nodes each), 300 bytes.
        assert_eq!(
            tracker.dispatch("m"),
            DispatchPerToken {
                nodes: 1.5,
                bytes: 15.0
            }
        );
        // A restarted router (counters back to low values) adds nothing negative.
        tracker.record_router("m", "r2", &[layer(0, &[1, 1, 1])], [0; 3]);
        let layers = tracker.layer_loads("m").layers;
        assert_eq!(layers[0].tokens, vec![20, 4, 0]);
    }

    #[test]
    fn old_samples_and_silent_routers_leave_the_window() {
        let tracker = LoadTracker::new(Duration::from_millis(600));
        tracker.record_router("m", "r1", &[layer(0, &[0, 0])], [0; 3]);
        tracker.record_router("m", "r1", &[layer(0, &[10, 0])], [0; 3]);
        std::thread::sleep(Duration::from_millis(700));
        tracker.record_router("m", "r1", &[layer(0, &[10, 3])], [0; 3]);
        // The baseline is now the newest sample before the window: [10, 0].
        assert_eq!(tracker.layer_loads("m").layers, vec![layer(0, &[0, 3])]);
        std::thread::sleep(Duration::from_millis(700));
        assert!(tracker.layer_loads("m").layers.is_empty());
    }

    fn work(node: &str, queue_depth: u64, busy_micros: u64, pairs: u64) -> HeartbeatRequest {
        HeartbeatRequest {
            node: node.into(),
            queue_depth,
            busy_micros,
            pairs,
            ..HeartbeatRequest::default()
        }
    }

    #[test]
    fn nodes_report_busy_share_and_throughput() {
        let tracker = LoadTracker::new(Duration::from_secs(60));
        tracker.record_node(&work("n1", 0, 0, 0));
        std::thread::sleep(Duration::from_millis(100));
        tracker.record_node(&work("n1", 3, 50_000, 1000));
        let work = tracker.node_work();
        assert_eq!(work.len(), 1);
        assert_eq!(work[0].queue_depth, 3);
        // 50 ms of work in at least 100 ms.
        assert!(
            work[0].busy_fraction > 0.0 && work[0].busy_fraction <= 0.5,
            "{}",
            work[0].busy_fraction
        );
        assert!(work[0].pairs_per_second > 1000.0 && work[0].pairs_per_second <= 10_000.0);
    }

    #[test]
    fn nodes_report_expert_buffering_over_the_window() {
        let tracker = LoadTracker::new(Duration::from_secs(60));
        let buffering = |hits, misses, bytes_paged_in, host_fallbacks| HeartbeatRequest {
            buffer_hits: hits,
            buffer_misses: misses,
            bytes_paged_in,
            host_fallbacks,
            ..work("gpu", 0, 0, 0)
        };
        tracker.record_node(&buffering(100, 20, 1 << 20, 5));
        tracker.record_node(&work("cpu", 0, 0, 0));
        std::thread::sleep(Duration::from_millis(100));
        tracker.record_node(&buffering(190, 30, 3 << 20, 9));
        tracker.record_node(&work("cpu", 0, 10, 10));
        let work = tracker.node_work();
        let (cpu, gpu) = (&work[0], &work[1]);
        // 90 hits and 10 misses in the window, whatever came before.
        assert!((gpu.buffer_hit_rate - 0.9).abs() < 1e-9, "{gpu:?}");
        // 2 MiB and 4 fallbacks in at least 100 ms.
        let seconds = (2 << 20) as f64 / gpu.bytes_paged_in_per_second;
        assert!((0.1..1.0).contains(&seconds), "{gpu:?}");
        assert!((gpu.host_fallbacks_per_second * seconds - 4.0).abs() < 1e-6);
        assert_eq!(
            (
                gpu.buffer_hits,
                gpu.buffer_misses,
                gpu.bytes_paged_in,
                gpu.host_fallbacks
            ),
            (190, 30, 3 << 20, 9)
        );
        // A node that looked nothing up missed nothing.
        assert_eq!(cpu.buffer_hit_rate, 1.0);
        assert_eq!(cpu.bytes_paged_in_per_second, 0.0);
        assert_eq!(cpu.host_fallbacks_per_second, 0.0);
        // A restarted node's counters start over without going negative.
        tracker.record_node(&buffering(5, 0, 0, 0));
        let restarted = &tracker.node_work()[1];
        assert_eq!(restarted.buffer_hit_rate, 1.0);
        assert_eq!(restarted.bytes_paged_in_per_second, 0.0);
    }
}
