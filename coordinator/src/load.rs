//! The load window: how many tokens routers sent each expert (the load),
//! and how busy each expert node was and how often its experts were not
//! resident (its work and Expert Buffering), over the last minute or so.
//!
//! Soft state, in memory: routers and nodes report cumulative counters
//! every second or so. Every coordinator keeps what it hears; followers
//! also hand reports to the leader, whose window the rebalancer plans
//! with. Nothing here goes through Raft: losing it loses a minute of
//! statistics, not placement.
//!
//! One-hop clients, whose own reports a secured cluster refuses, reach the
//! window through the expert nodes: each node's heartbeat carries the
//! tokens such clients had it compute, counted as a report of its own into
//! the experts' load (not into the routers' dispatch figures).
//!
//! A router's report counts for what it adds to the router's previous one.
//! Those additions are summed per model into time slots (a sixteenth of the
//! window each), and the window is the sum of the slots inside it. What one
//! router can claim is bounded, so that no report, buggy or forged, steers
//! the rebalancer far: a report's tokens per expert are at most the tokens
//! it says it forwarded, and those at most [`LoadLimits::tokens_per_second`]
//! since its last report (a quiet router saves up ten seconds' worth).
//! Counters that go backwards mean a restarted sender: that report is a
//! fresh baseline. Arithmetic saturates. Memory is bounded too: at most
//! [`LoadLimits::routers`] routers, [`LoadLimits::models`] models and
//! [`LoadLimits::nodes`] nodes are tracked, each new one evicting the one
//! heard from longest ago, and whoever is silent for a whole window is
//! forgotten.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use moemesh_proto::v1::{HeartbeatRequest, LayerLoad, NodeWork};

use crate::metrics::CoordinatorMetrics;

mod node_samples;
use node_samples::{NodeSample, dense_counts, went_backwards, window_work};

/// Per layer, per expert: tokens (cumulative as reported, or added in a slot).
type Counts = BTreeMap<u32, Vec<u64>>;

/// A router's dispatch totals: tokens, (token, node) sends, bytes.
type Dispatch = [u64; 3];

/// Time slots per window: the window's granularity.
const SLOTS_PER_WINDOW: u32 = 16;

/// How many seconds of [`LoadLimits::tokens_per_second`] a quiet router saves up.
const SAVED_SECONDS: f64 = 10.0;

/// Activation bytes one (token, node) send may claim: a hidden state of
/// 256 Ki f32 values, far beyond any model's.
const MAX_BYTES_PER_SEND: u64 = 1 << 20;

/// Longest model or router name a report may carry.
const MAX_NAME_BYTES: usize = 256;

/// What the load window keeps at most, and what one router may claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadLimits {
    /// (model, router) pairs tracked at once.
    pub routers: usize,
    /// Models with a window at once.
    pub models: usize,
    /// Expert nodes whose heartbeats are kept at once.
    pub nodes: usize,
    /// Counters (experts over all layers) kept of one report; the rest are dropped.
    pub counters_per_report: usize,
    /// Tokens one router may claim per second; far beyond what one router forwards.
    pub tokens_per_second: u64,
}

impl Default for LoadLimits {
    fn default() -> Self {
        Self {
            routers: 256,
            models: 16,
            nodes: 4096,
            // DeepSeek-V3 has 61 layers of 257 experts: 15,677 counters.
            counters_per_report: 1 << 15,
            tokens_per_second: 10_000_000,
        }
    }
}

/// What the window keeps of one router: its last report, against which the
/// next is measured, and the tokens it may still claim.
#[derive(Debug)]
struct RouterState {
    counts: Counts,
    dispatch: Dispatch,
    heard_at: Instant,
    /// Refilled at [`LoadLimits::tokens_per_second`], up to [`SAVED_SECONDS`] of it.
    allowance: f64,
}

/// Tokens and dispatch added by the reports that arrived within one slot.
#[derive(Debug)]
struct Slot {
    started_at: Instant,
    last_at: Instant,
    counts: Counts,
    dispatch: Dispatch,
}

/// One model's slots, oldest first.
#[derive(Debug)]
struct ModelWindow {
    /// When the model's first report in the window arrived.
    since: Instant,
    last_at: Instant,
    slots: VecDeque<Slot>,
}

/// The reports' side of the window (routers', and nodes' for their
/// one-hop clients), under one lock.
#[derive(Debug, Default)]
struct RouterWindows {
    routers: HashMap<(String, String), RouterState>,
    /// By (model, node): what one-hop clients had each expert node compute.
    node_clients: HashMap<(String, String), RouterState>,
    models: HashMap<String, ModelWindow>,
}

/// Who speaks in a load report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reporter {
    /// A router, for the tokens it forwarded.
    Router,
    /// An expert node, for the tokens one-hop clients sent it: counted
    /// into the experts' load but not into the routers' dispatch figures
    /// (a token sent to two nodes is two of these tokens).
    NodeForClients,
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
    limits: LoadLimits,
    routers: Mutex<RouterWindows>,
    /// Per node, its heartbeats, oldest first.
    nodes: Mutex<HashMap<String, VecDeque<NodeSample>>>,
    metrics: CoordinatorMetrics,
}

/// Removes the entry `last_heard` finds oldest, making room for a new one.
fn evict_stalest<K: Clone + Eq + Hash, V>(
    map: &mut HashMap<K, V>,
    last_heard: impl Fn(&V) -> Instant,
) {
    let stalest = map
        .iter()
        .min_by_key(|(_, value)| last_heard(value))
        .map(|(key, _)| key.clone());
    if let Some(key) = stalest {
        map.remove(&key);
    }
}

/// Adds `more` into `total`, saturating, extending it to cover `more`.
fn add_counts(total: &mut Counts, more: &Counts) {
    for (&layer, tokens) in more {
        let sums = total.entry(layer).or_default();
        if sums.len() < tokens.len() {
            sums.resize(tokens.len(), 0);
        }
        for (sum, &count) in sums.iter_mut().zip(tokens) {
            *sum = sum.saturating_add(count);
        }
    }
}

fn add_dispatch(total: &mut Dispatch, more: &Dispatch) {
    for (sum, &count) in total.iter_mut().zip(more) {
        *sum = sum.saturating_add(count);
    }
}

/// A report's counts, keeping at most `limit` counters (earlier layers first).
fn bounded_counts(layers: &[LayerLoad], limit: usize) -> Counts {
    let mut room = limit;
    let mut counts = Counts::new();
    for layer in layers {
        if room == 0 {
            break;
        }
        let kept = &layer.tokens[..layer.tokens.len().min(room)];
        room -= kept.len();
        counts.insert(layer.layer, kept.to_vec());
    }
    counts
}

impl RouterState {
    fn new(counts: Counts, dispatch: Dispatch, now: Instant, limits: &LoadLimits) -> Self {
        Self {
            counts,
            dispatch,
            heard_at: now,
            allowance: limits.tokens_per_second as f64 * SAVED_SECONDS,
        }
    }

    /// Takes a new report; returns what it adds to the last one, clamped
    /// to what the router may claim, or None when a counter went backwards
    /// (a restart: the report is the new baseline).
    fn take_report(
        &mut self,
        counts: Counts,
        dispatch: Dispatch,
        now: Instant,
        limits: &LoadLimits,
    ) -> Option<(Counts, Dispatch)> {
        let rate = limits.tokens_per_second as f64;
        let elapsed = now.duration_since(self.heard_at).as_secs_f64();
        self.allowance = (self.allowance + rate * elapsed).min(rate * SAVED_SECONDS);
        self.heard_at = now;
        let previous_counts = std::mem::replace(&mut self.counts, counts);
        let previous_dispatch = std::mem::replace(&mut self.dispatch, dispatch);
        let went_backwards = dispatch
            .iter()
            .zip(&previous_dispatch)
            .any(|(now, then)| now < then)
            || self.counts.iter().any(|(layer, tokens)| {
                previous_counts
                    .get(layer)
                    .is_some_and(|before| tokens.iter().zip(before).any(|(now, then)| now < then))
            });
        if went_backwards {
            return None;
        }
        let grown = |index: usize| dispatch[index] - previous_dispatch[index];
        // Truncation toward zero keeps the claim within the allowance.
        let tokens = grown(0).min(self.allowance as u64);
        self.allowance -= tokens as f64;
        // A token reaches at most one node per expert of its layer.
        let widest_layer = self.counts.values().map(Vec::len).max().unwrap_or(0).max(1) as u64;
        let sends = grown(1).min(tokens.saturating_mul(widest_layer));
        let bytes = grown(2).min(sends.saturating_mul(MAX_BYTES_PER_SEND));
        // A token is routed to an expert at most once.
        let added = self
            .counts
            .iter()
            .map(|(&layer, now)| {
                let before = previous_counts.get(&layer);
                let added = now
                    .iter()
                    .enumerate()
                    .map(|(expert, &count)| {
                        let base = before.and_then(|before| before.get(expert)).copied();
                        (count - base.unwrap_or(0)).min(tokens)
                    })
                    .collect();
                (layer, added)
            })
            .collect();
        Some((added, [tokens, sends, bytes]))
    }
}

impl ModelWindow {
    /// Adds what one report added to the newest slot, or to a new slot
    /// once the newest is `slot_width` old.
    fn add(&mut self, now: Instant, slot_width: Duration, counts: &Counts, dispatch: &Dispatch) {
        let fits_newest = self
            .slots
            .back()
            .is_some_and(|slot| now.duration_since(slot.started_at) < slot_width);
        if !fits_newest {
            self.slots.push_back(Slot {
                started_at: now,
                last_at: now,
                counts: Counts::new(),
                dispatch: [0; 3],
            });
        }
        let slot = self.slots.back_mut().expect("a slot was just made");
        slot.last_at = now;
        add_counts(&mut slot.counts, counts);
        add_dispatch(&mut slot.dispatch, dispatch);
    }
}

impl RouterWindows {
    /// Forgets routers, models and slots last heard of before `start`.
    fn expire(&mut self, start: Instant) {
        self.routers.retain(|_, router| router.heard_at > start);
        self.node_clients.retain(|_, node| node.heard_at > start);
        self.models.retain(|_, model| model.last_at > start);
        for model in self.models.values_mut() {
            while model
                .slots
                .front()
                .is_some_and(|slot| slot.last_at <= start)
            {
                model.slots.pop_front();
            }
        }
    }

    /// `model`'s window, made (covering the time from `since`, evicting
    /// the stalest model when full) if it has none; marked as heard from
    /// `now`.
    fn model_window(
        &mut self,
        model: &str,
        since: Instant,
        now: Instant,
        limits: &LoadLimits,
    ) -> &mut ModelWindow {
        if !self.models.contains_key(model) {
            while self.models.len() >= limits.models.max(1) {
                evict_stalest(&mut self.models, |window| window.last_at);
            }
        }
        let window = self
            .models
            .entry(model.to_string())
            .or_insert_with(|| ModelWindow {
                since,
                last_at: now,
                slots: VecDeque::new(),
            });
        window.last_at = now;
        window
    }
}

impl LoadTracker {
    /// Keeps reports for `window`, within the default [`LoadLimits`].
    pub fn new(window: Duration) -> Self {
        Self::with_limits(window, LoadLimits::default())
    }

    /// Keeps reports for `window`, within `limits`.
    pub fn with_limits(window: Duration, limits: LoadLimits) -> Self {
        Self {
            window,
            limits,
            routers: Mutex::new(RouterWindows::default()),
            nodes: Mutex::new(HashMap::new()),
            metrics: CoordinatorMetrics::default(),
        }
    }

    /// Counts the tokens of the reports it takes in `metrics`.
    pub fn with_metrics(mut self, metrics: CoordinatorMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    fn window_start(&self, now: Instant) -> Instant {
        now.checked_sub(self.window).unwrap_or(now)
    }

    /// Records a router's cumulative counts for `model`, and its dispatch
    /// totals (tokens, (token, node) sends, bytes sent). A report naming a
    /// model or router longer than 256 bytes is dropped.
    pub fn record_router(
        &self,
        model: &str,
        router: &str,
        layers: &[LayerLoad],
        dispatch: Dispatch,
    ) {
        self.record_router_at(Instant::now(), model, router, layers, dispatch);
    }

    fn record_router_at(
        &self,
        now: Instant,
        model: &str,
        router: &str,
        layers: &[LayerLoad],
        dispatch: Dispatch,
    ) {
        let counts = bounded_counts(layers, self.limits.counters_per_report);
        self.record_report_at(now, model, (Reporter::Router, router), counts, dispatch);
    }

    /// A report of `reporter` (its kind and name) for `model`, its counts
    /// already bounded: what it adds to the reporter's last one goes into
    /// the model's window.
    fn record_report_at(
        &self,
        now: Instant,
        model: &str,
        (reporter, name): (Reporter, &str),
        counts: Counts,
        dispatch: Dispatch,
    ) {
        if model.len() > MAX_NAME_BYTES || name.len() > MAX_NAME_BYTES {
            tracing::warn!(
                model_bytes = model.len(),
                reporter_bytes = name.len(),
                limit = MAX_NAME_BYTES,
                "dropped a load report with an overlong name"
            );
            return;
        }
        let limits = &self.limits;
        let mut guard = self.routers.lock().expect("load tracker");
        let windows = &mut *guard;
        windows.expire(self.window_start(now));
        let (reporters, capacity) = match reporter {
            Reporter::Router => (&mut windows.routers, limits.routers),
            Reporter::NodeForClients => (&mut windows.node_clients, limits.nodes),
        };
        let key = (model.to_string(), name.to_string());
        // What this report adds covers the time since the reporter's last.
        let mut covers_since = now;
        let added = match reporters.get_mut(&key) {
            Some(state) => {
                covers_since = state.heard_at;
                state.take_report(counts, dispatch, now, limits)
            }
            None => {
                while reporters.len() >= capacity.max(1) {
                    evict_stalest(reporters, |state| state.heard_at);
                }
                reporters.insert(key, RouterState::new(counts, dispatch, now, limits));
                None
            }
        };
        if reporter == Reporter::NodeForClients {
            // Only tokens open a model's window here: every node reports,
            // whether clients call it or not.
            let Some((counts, _)) = added.filter(|(_, [tokens, ..])| *tokens > 0) else {
                return;
            };
            let window = windows.model_window(model, covers_since, now, limits);
            window.add(now, self.window / SLOTS_PER_WINDOW, &counts, &[0; 3]);
            return;
        }
        let window = windows.model_window(model, now, now, limits);
        if let Some((counts, dispatch)) = added {
            window.add(now, self.window / SLOTS_PER_WINDOW, &counts, &dispatch);
            self.metrics.count_reported_tokens(dispatch[0]);
        }
    }

    /// Records an expert node's heartbeat, and the load its one-hop
    /// clients put on it (a report of its own, as a router's).
    pub fn record_node(&self, heartbeat: &HeartbeatRequest) {
        self.record_node_at(Instant::now(), heartbeat);
    }

    fn record_node_at(&self, now: Instant, heartbeat: &HeartbeatRequest) {
        if !heartbeat.model.is_empty() {
            let dispatch = [heartbeat.client_tokens, 0, 0];
            let reporter = (Reporter::NodeForClients, heartbeat.node.as_str());
            let counts = dense_counts(&heartbeat.client_experts, self.limits.counters_per_report);
            self.record_report_at(now, &heartbeat.model, reporter, counts, dispatch);
        }
        let start = self.window_start(now);
        let mut nodes = self.nodes.lock().expect("load tracker");
        nodes.retain(|_, samples| samples.back().is_some_and(|sample| sample.at > start));
        if !nodes.contains_key(&heartbeat.node) {
            while nodes.len() >= self.limits.nodes.max(1) {
                evict_stalest(&mut nodes, |samples| {
                    samples.back().map_or(start, |sample| sample.at)
                });
            }
        }
        let samples = nodes.entry(heartbeat.node.clone()).or_default();
        if samples
            .back()
            .is_some_and(|newest| went_backwards(&newest.heartbeat, heartbeat))
        {
            // The node restarted: its counters start over from this heartbeat.
            samples.clear();
        }
        // A sample between two others less than a slot apart adds nothing.
        let slot_width = self.window / SLOTS_PER_WINDOW;
        if samples.len() >= 2 && now.duration_since(samples[samples.len() - 2].at) < slot_width {
            samples.pop_back();
        }
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
        self.layer_loads_at(Instant::now(), model)
    }

    fn layer_loads_at(&self, now: Instant, model: &str) -> LayerLoads {
        let (seconds, counts, _) = self.sums(now, model);
        let layers = counts
            .into_iter()
            .map(|(layer, tokens)| LayerLoad { layer, tokens })
            .collect();
        LayerLoads { seconds, layers }
    }

    /// How `model`'s tokens were dispatched over the window.
    pub fn dispatch(&self, model: &str) -> DispatchPerToken {
        let (_, _, [tokens, sends, bytes]) = self.sums(Instant::now(), model);
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
    fn sums(&self, now: Instant, model: &str) -> (f64, Counts, Dispatch) {
        let start = self.window_start(now);
        let mut windows = self.routers.lock().expect("load tracker");
        windows.expire(start);
        let mut counts = Counts::new();
        let mut dispatch: Dispatch = [0; 3];
        let Some(window) = windows.models.get(model) else {
            return (0.0, counts, dispatch);
        };
        for slot in &window.slots {
            add_counts(&mut counts, &slot.counts);
            add_dispatch(&mut dispatch, &slot.dispatch);
        }
        let covered = window.last_at.duration_since(window.since.max(start));
        (covered.as_secs_f64(), counts, dispatch)
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

#[cfg(test)]
mod tests {
    use moemesh_proto::v1::ExpertTokens;

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
        tracker.record_router("m", "r2", &[layer(0, &[100, 100, 100])], [100, 0, 0]);
        tracker.record_router("other", "r3", &[layer(0, &[1, 1, 1])], [0; 3]);
        std::thread::sleep(Duration::from_millis(5));
        tracker.record_router(
            "m",
            "r1",
            &[layer(0, &[30, 4, 5]), layer(1, &[7])],
            [30, 45, 450],
        );
        tracker.record_router("m", "r2", &[layer(0, &[101, 110, 100])], [110, 15, 150]);
        tracker.record_router("other", "r3", &[layer(0, &[9, 9, 9])], [8, 8, 8]);
        let LayerLoads {
            seconds: covered,
            layers,
        } = tracker.layer_loads("m");
        assert!(covered > 0.0);
        assert_eq!(layers, vec![layer(0, &[21, 14, 0]), layer(1, &[7])]);
        // 30 tokens sent 45 times (1.5 nodes each), 450 bytes.
        assert_eq!(
            tracker.dispatch("m"),
            DispatchPerToken {
                nodes: 1.5,
                bytes: 15.0
            }
        );
        // A restarted router (counters back to low values) starts over from
        // its next report; what it routed before stays counted.
        tracker.record_router("m", "r2", &[layer(0, &[1, 1, 1])], [1, 1, 1]);
        tracker.record_router("m", "r2", &[layer(0, &[3, 1, 1])], [3, 3, 3]);
        let layers = tracker.layer_loads("m").layers;
        assert_eq!(layers[0].tokens, vec![23, 14, 0]);
    }

    #[test]
    fn old_samples_and_silent_routers_leave_the_window() {
        let tracker = LoadTracker::new(Duration::from_secs(60));
        let start = Instant::now();
        let at = |seconds: u64| start + Duration::from_secs(seconds);
        tracker.record_router_at(at(0), "m", "r1", &[layer(0, &[0, 0])], [0; 3]);
        tracker.record_router_at(at(1), "m", "r1", &[layer(0, &[10, 0])], [10, 0, 0]);
        tracker.record_router_at(at(40), "m", "r1", &[layer(0, &[10, 3])], [13, 0, 0]);
        let loads = tracker.layer_loads_at(at(40), "m");
        assert_eq!(loads.layers, vec![layer(0, &[10, 3])]);
        assert_eq!(loads.seconds, 40.0);
        // A minute on, the first ten tokens were routed before the window.
        let loads = tracker.layer_loads_at(at(70), "m");
        assert_eq!(loads.layers, vec![layer(0, &[0, 3])]);
        assert_eq!(loads.seconds, 30.0);
        // A router silent for a whole window is forgotten; its next
        // report is a fresh baseline.
        assert!(tracker.layer_loads_at(at(101), "m").layers.is_empty());
        assert!(tracker.routers.lock().unwrap().routers.is_empty());
        tracker.record_router_at(at(102), "m", "r1", &[layer(0, &[20, 3])], [23, 0, 0]);
        assert!(tracker.layer_loads_at(at(102), "m").layers.is_empty());
    }

    fn limits(routers: usize) -> LoadLimits {
        LoadLimits {
            routers,
            models: 2,
            nodes: 2,
            counters_per_report: 8,
            tokens_per_second: 1000,
        }
    }

    #[test]
    fn a_new_router_evicts_the_stalest_and_silent_ones_expire() {
        let tracker = LoadTracker::with_limits(Duration::from_secs(60), limits(3));
        let start = Instant::now();
        let at = |seconds: u64| start + Duration::from_secs(seconds);
        for (second, router) in ["r1", "r2", "r3", "r4", "r5"].into_iter().enumerate() {
            tracker.record_router_at(at(second as u64), "m", router, &[layer(0, &[0])], [0; 3]);
        }
        let tracked = |tracker: &LoadTracker| {
            let windows = tracker.routers.lock().unwrap();
            let mut routers: Vec<String> = windows
                .routers
                .keys()
                .map(|(model, router)| format!("{model}/{router}"))
                .collect();
            routers.sort();
            routers
        };
        assert_eq!(tracked(&tracker), vec!["m/r3", "m/r4", "m/r5"]);
        // So do models.
        for (second, model) in [(5, "a"), (6, "b"), (7, "c")] {
            tracker.record_router_at(at(second), model, "r5", &[layer(0, &[0])], [0; 3]);
        }
        assert_eq!(tracked(&tracker), vec!["a/r5", "b/r5", "c/r5"]);
        let mut models: Vec<String> = tracker
            .routers
            .lock()
            .unwrap()
            .models
            .keys()
            .cloned()
            .collect();
        models.sort();
        assert_eq!(models, vec!["b", "c"]);
        // Routers silent for a whole window are gone at the next report.
        tracker.record_router_at(at(66), "m", "r6", &[layer(0, &[0])], [0; 3]);
        assert_eq!(tracked(&tracker), vec!["c/r5", "m/r6"]);
        // Reports naming a model or router beyond 256 bytes are dropped.
        let long_name = "r".repeat(300);
        tracker.record_router_at(at(66), "m", &long_name, &[layer(0, &[0])], [0; 3]);
        assert_eq!(tracked(&tracker), vec!["c/r5", "m/r6"]);
    }

    #[test]
    fn one_report_claims_no_more_than_it_forwarded_nor_than_the_rate_allows() {
        let tracker = LoadTracker::with_limits(Duration::from_secs(60), limits(4));
        tracker.record_router("m", "r1", &[layer(0, &[0, 0, 0])], [0; 3]);
        tracker.record_router(
            "m",
            "r1",
            &[layer(0, &[5, 1000, 0])],
            [10, u64::MAX, u64::MAX],
        );
        assert_eq!(tracker.layer_loads("m").layers, vec![layer(0, &[5, 10, 0])]);
        // 10 tokens reach at most one node per expert (3), each send 1 MiB at most.
        let dispatch = tracker.dispatch("m");
        assert_eq!(dispatch.nodes, 3.0);
        assert_eq!(dispatch.bytes, 3.0 * (1 << 20) as f64);

        // At 1000 tokens a second, ten seconds saved up: 10,000 at most.
        tracker.record_router("m", "r2", &[layer(0, &[0, 0, 0])], [0; 3]);
        let huge = 1 << 40;
        tracker.record_router("m", "r2", &[layer(0, &[huge, 0, 0])], [huge, 0, 0]);
        let layers = tracker.layer_loads("m").layers;
        assert_eq!(layers, vec![layer(0, &[5 + 10_000, 10, 0])]);
        // A report keeps at most 8 counters.
        tracker.record_router("m", "r3", &[layer(0, &[0; 6]), layer(1, &[0; 6])], [0; 3]);
        let windows = tracker.routers.lock().unwrap();
        let kept = &windows.routers[&("m".to_string(), "r3".to_string())].counts;
        assert_eq!(kept.values().map(Vec::len).sum::<usize>(), 8);
    }

    #[test]
    fn counters_near_the_top_of_u64_saturate() {
        let tracker = LoadTracker::new(Duration::from_secs(60));
        for router in ["r1", "r2", "r3"] {
            tracker.record_router("m", router, &[layer(0, &[0])], [0; 3]);
            let top = u64::MAX;
            tracker.record_router("m", router, &[layer(0, &[top])], [top, top, top]);
        }
        let layers = tracker.layer_loads("m").layers;
        assert!(layers[0].tokens[0] > 0);
        let dispatch = tracker.dispatch("m");
        assert!(dispatch.nodes.is_finite() && dispatch.bytes.is_finite());
        // Wrapped-around counters look like a restart and add nothing.
        tracker.record_router("m", "r1", &[layer(0, &[3])], [3, 3, 3]);
        assert_eq!(tracker.layer_loads("m").layers, layers);
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

    /// A heartbeat of `node` carrying its one-hop clients' cumulative
    /// tokens, the experts' given as dense layers.
    fn clients(node: &str, model: &str, layers: &[LayerLoad], tokens: u64) -> HeartbeatRequest {
        let client_experts = layers
            .iter()
            .flat_map(|load| {
                let layer = load.layer;
                let counts = load.tokens.iter().enumerate();
                counts.map(move |(expert, &tokens)| ExpertTokens {
                    layer,
                    expert: expert as u32,
                    tokens,
                })
            })
            .filter(|count| count.tokens > 0)
            .collect();
        HeartbeatRequest {
            node: node.into(),
            model: model.into(),
            client_experts,
            client_tokens: tokens,
            ..HeartbeatRequest::default()
        }
    }

    #[test]
    fn sparse_expert_counts_become_bounded_dense_layers() {
        let count = |layer, expert, tokens| ExpertTokens {
            layer,
            expert,
            tokens,
        };
        let dense = |experts: &[ExpertTokens], limit| -> Vec<(u32, Vec<u64>)> {
            dense_counts(experts, limit).into_iter().collect()
        };
        let experts = [
            count(2, 3, 7),
            count(0, 1, 4),
            count(2, 0, 1),
            count(2, 3, 1),
        ];
        let want = vec![(0, vec![0, 4]), (2, vec![1, 0, 0, 8])];
        assert_eq!(dense(&experts, 100), want);
        // A huge expert id would need more counters than allowed: dropped.
        let layers = dense(&[count(1, u32::MAX, 5), count(1, 2, 5)], 100);
        assert_eq!(layers, vec![(1, vec![0, 0, 5])]);
        assert_eq!(dense(&[count(1, 2, 5)], 2), vec![]);
    }

    #[test]
    fn nodes_add_their_one_hop_clients_tokens_to_the_load_but_not_to_dispatch() {
        let tracker = LoadTracker::new(Duration::from_secs(60));
        let start = Instant::now();
        let at = |seconds: u64| start + Duration::from_secs(seconds);
        tracker.record_router_at(at(0), "m", "r1", &[layer(0, &[0, 0, 0])], [0; 3]);
        tracker.record_node_at(at(0), &clients("a", "m", &[], 0));
        tracker.record_router_at(at(1), "m", "r1", &[layer(0, &[4, 0, 2])], [4, 6, 60]);
        tracker.record_node_at(at(1), &clients("a", "m", &[layer(0, &[0, 3, 1])], 3));
        // A node first heard of: its counts are the baseline, as a router's.
        tracker.record_node_at(at(1), &clients("b", "m", &[layer(0, &[5, 5, 5])], 10));
        // A node that names no model reports no clients.
        tracker.record_node_at(at(0), &clients("c", "", &[], 0));
        tracker.record_node_at(at(1), &clients("c", "", &[layer(0, &[9, 9, 9])], 9));
        let loads = tracker.layer_loads_at(at(1), "m");
        assert_eq!(loads.layers, vec![layer(0, &[4, 3, 3])]);
        // Only the router's tokens: 4 tokens sent 6 times, 60 bytes.
        let (_, _, dispatch) = tracker.sums(at(1), "m");
        assert_eq!(dispatch, [4, 6, 60]);

        // One-hop clients alone: their tokens cover the time since the
        // node's previous heartbeat.
        tracker.record_node_at(at(0), &clients("d", "solo", &[], 0));
        tracker.record_node_at(at(2), &clients("d", "solo", &[layer(1, &[0, 2])], 2));
        let loads = tracker.layer_loads_at(at(2), "solo");
        assert_eq!(loads.layers, vec![layer(1, &[0, 2])]);
        assert_eq!(loads.seconds, 2.0);
        // Nodes no client calls open no window.
        tracker.record_node_at(at(0), &clients("e", "quiet", &[], 0));
        tracker.record_node_at(at(1), &clients("e", "quiet", &[layer(0, &[0])], 0));
        let loads = tracker.layer_loads_at(at(1), "quiet");
        assert_eq!((loads.seconds, loads.layers.len()), (0.0, 0));
        // A restarted node (counters back) starts over from that heartbeat.
        tracker.record_node_at(at(3), &clients("a", "m", &[layer(0, &[0, 1, 0])], 1));
        tracker.record_node_at(at(4), &clients("a", "m", &[layer(0, &[2, 1, 0])], 3));
        let loads = tracker.layer_loads_at(at(4), "m");
        assert_eq!(loads.layers, vec![layer(0, &[6, 3, 3])]);
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

    #[test]
    fn node_heartbeats_are_bounded_and_spaced() {
        let tracker = LoadTracker::with_limits(Duration::from_secs(60), limits(4));
        let start = Instant::now();
        for (second, node) in ["n1", "n2", "n3"].into_iter().enumerate() {
            let at = start + Duration::from_secs(second as u64);
            tracker.record_node_at(at, &work(node, 0, 0, 0));
        }
        let nodes: Vec<String> = tracker
            .node_work()
            .into_iter()
            .map(|work| work.node)
            .collect();
        assert_eq!(nodes, vec!["n2", "n3"]);
        // Heartbeats closer together than a sixteenth of the window collapse.
        for pairs in 0..100 {
            let at = start + Duration::from_secs(3) + Duration::from_millis(pairs);
            tracker.record_node_at(at, &work("n3", 0, 0, pairs));
        }
        assert_eq!(tracker.nodes.lock().unwrap()["n3"].len(), 2);
    }
}
