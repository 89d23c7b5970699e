//! What a router has sent each expert: token counts per layer and expert,
//! reported to the coordinators every second, where they become the load
//! window the rebalancer plans with.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::Weak;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use moemesh_client::CoordinatorClient;
use moemesh_core::model::gating::Routing;
use moemesh_proto::v1::{LayerLoad, ReportLoadRequest, ReportUnreachableRequest};

/// How often a router reports its counts.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// Tokens routed to each expert since the router started.
pub struct LoadCounters {
    /// Per MoE layer, per expert id (the shared expert last).
    layers: BTreeMap<usize, Vec<AtomicU64>>,
    /// Tokens forwarded.
    tokens: AtomicU64,
    /// (token, node) sends: each token goes once to each node it needs.
    node_sends: AtomicU64,
    /// Activation bytes sent to expert nodes.
    bytes_sent: AtomicU64,
}

impl LoadCounters {
    /// Counters for `experts_per_layer` experts in each of `layers`.
    pub fn new(layers: &[usize], experts_per_layer: usize) -> Self {
        Self {
            layers: layers
                .iter()
                .map(|&layer| {
                    let counters = (0..experts_per_layer).map(|_| AtomicU64::new(0)).collect();
                    (layer, counters)
                })
                .collect(),
            tokens: AtomicU64::new(0),
            node_sends: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
        }
    }

    /// Counts one forward's dispatch: `tokens` tokens sent `node_sends`
    /// times in all, `bytes` of activations.
    pub fn count_dispatch(&self, tokens: usize, node_sends: usize, bytes: usize) {
        self.tokens.fetch_add(tokens as u64, Ordering::Relaxed);
        self.node_sends
            .fetch_add(node_sends as u64, Ordering::Relaxed);
        self.bytes_sent.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Counts one routed batch of `layer`.
    pub fn count(&self, layer: usize, routing: &Routing) {
        let Some(counters) = self.layers.get(&layer) else {
            return;
        };
        for &expert in &routing.experts {
            if let Some(counter) = counters.get(expert as usize) {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
        if routing.shared_weights.is_some()
            && let Some(shared) = counters.last()
        {
            shared.fetch_add(routing.tokens() as u64, Ordering::Relaxed);
        }
    }

    /// The counts now, per layer.
    pub fn snapshot(&self) -> Vec<LayerLoad> {
        self.layers
            .iter()
            .map(|(&layer, counters)| LayerLoad {
                layer: layer as u32,
                tokens: counters
                    .iter()
                    .map(|counter| counter.load(Ordering::Relaxed))
                    .collect(),
            })
            .collect()
    }
}

/// A name for this router's reports, fresh at every start.
pub fn router_id() -> String {
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    format!("router-{random:016x}")
}

/// Reports the counts to the coordinators every [`REPORT_INTERVAL`]; a
/// coordinator that does not answer within it is left for the next. Ends
/// with the router.
pub async fn report_load_task(
    coordinators: CoordinatorClient,
    model: String,
    router: String,
    counters: Weak<LoadCounters>,
) {
    let mut coordinators = coordinators.with_call_timeout(REPORT_INTERVAL);
    let mut interval = tokio::time::interval(REPORT_INTERVAL);
    loop {
        interval.tick().await;
        let Some(counters) = counters.upgrade() else {
            return;
        };
        let request = ReportLoadRequest {
            router: router.clone(),
            model: model.clone(),
            layers: counters.snapshot(),
            tokens: counters.tokens.load(Ordering::Relaxed),
            node_sends: counters.node_sends.load(Ordering::Relaxed),
            bytes_sent: counters.bytes_sent.load(Ordering::Relaxed),
        };
        drop(counters);
        if let Err(error) = coordinators.report_load(request).await {
            tracing::debug!(%error, "load report not delivered");
        }
    }
}

/// An expert node this router could not reach, for the coordinators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnreachableReport {
    pub node: String,
    pub reason: String,
}

/// Tells the coordinators about expert nodes this router failed to reach,
/// so that the leader declares them dead sooner; ends with the router.
pub async fn report_unreachable_task(
    coordinators: CoordinatorClient,
    router: String,
    mut reports: tokio::sync::mpsc::Receiver<UnreachableReport>,
) {
    let mut coordinators = coordinators.with_call_timeout(REPORT_INTERVAL);
    while let Some(report) = reports.recv().await {
        let request = ReportUnreachableRequest {
            node: report.node,
            reporter: router.clone(),
            reason: report.reason,
        };
        if let Err(error) = coordinators.report_unreachable(request).await {
            tracing::debug!(%error, "unreachable report not delivered");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn counts_every_routed_pair_and_shared_tokens() {
        let counters = Arc::new(LoadCounters::new(&[1, 3], 4));
        let routing = Routing {
            top_k: 2,
            experts: vec![0, 2, 0, 1],
            weights: vec![0.5; 4],
            shared_weights: Some(vec![1.0, 1.0]),
        };
        counters.count(3, &routing);
        counters.count(3, &routing);
        counters.count(7, &routing);
        let snapshot = counters.snapshot();
        assert_eq!(
            snapshot[0],
            LayerLoad {
                layer: 1,
                tokens: vec![0; 4]
            }
        );
        assert_eq!(
            snapshot[1],
            LayerLoad {
                layer: 3,
                tokens: vec![4, 2, 2, 4]
            }
        );
        assert_ne!(router_id(), router_id());
    }
}
