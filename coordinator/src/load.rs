//! The load window: how many tokens routers sent each expert (the load),
//! and how busy each expert node was (its work), over the last minute or so.
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

use moemesh_proto::v1::{LayerLoad, NodeWork};

/// One router's cumulative counts at one moment: per layer, per expert.
type Counts = BTreeMap<u32, Vec<u64>>;

/// A router's cumulative dispatch totals: tokens, (token, node) sends, bytes.
type Dispatch = [u64; 3];

/// A router's samples, oldest first.
type RouterSamples = VecDeque<(Instant, (Counts, Dispatch))>;

/// Cumulative work counters of one expert node at one moment.
#[derive(Debug, Clone, Copy)]
struct NodeSample {
    at: Instant,
    busy_micros: u64,
    pairs: u64,
}

#[derive(Default)]
struct NodeSamples {
    samples: VecDeque<NodeSample>,
    queue_depth: u64,
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
    nodes: Mutex<HashMap<String, NodeSamples>>,
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

    /// Records an expert node's work counters.
    pub fn record_node(&self, node: &str, queue_depth: u64, busy_micros: u64, pairs: u64) {
        let now = Instant::now();
        let start = self.window_start(now);
        let mut nodes = self.nodes.lock().expect("load tracker");
        let entry = nodes.entry(node.to_string()).or_default();
        entry.queue_depth = queue_depth;
        entry.samples.push_back(NodeSample {
            at: now,
            busy_micros,
            pairs,
        });
        while entry.samples.len() > 1 && entry.samples[1].at <= start {
            entry.samples.pop_front();
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

    /// Each node's queue depth, busy share and throughput over the window.
    pub fn node_work(&self) -> Vec<NodeWork> {
        let now = Instant::now();
        let start = self.window_start(now);
        let mut nodes = self.nodes.lock().expect("load tracker");
        nodes.retain(|_, entry| entry.samples.back().is_some_and(|sample| sample.at > start));
        let mut work: Vec<NodeWork> = nodes
            .iter()
            .map(|(node, entry)| {
                let (first, last) = (entry.samples.front(), entry.samples.back());
                let (busy_fraction, pairs_per_second) = match (first, last) {
                    (Some(first), Some(last)) if last.at > first.at => {
                        let seconds = last.at.duration_since(first.at).as_secs_f64();
                        (
                            (last.busy_micros.saturating_sub(first.busy_micros) as f64
                                / 1e6
                                / seconds)
                                .min(1.0),
                            last.pairs.saturating_sub(first.pairs) as f64 / seconds,
                        )
                    }
                    _ => (0.0, 0.0),
                };
                NodeWork {
                    node: node.clone(),
                    queue_depth: entry.queue_depth,
                    busy_fraction,
                    pairs_per_second,
                }
            })
            .collect();
        work.sort_by(|a, b| a.node.cmp(&b.node));
        work
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

    #[test]
    fn nodes_report_busy_share_and_throughput() {
        let tracker = LoadTracker::new(Duration::from_secs(60));
        tracker.record_node("n1", 0, 0, 0);
        std::thread::sleep(Duration::from_millis(100));
        tracker.record_node("n1", 3, 50_000, 1000);
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
}
