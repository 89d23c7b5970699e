//! Expert node health as this router sees it. A node that did not answer
//! is avoided for [`UNHEALTHY_FOR_MS`] while another replica can serve its
//! experts (a node that merely refused work stays in use), and the
//! coordinators hear of it, so that the leader declares a dead node dead
//! sooner. The marks live on each node's [`NodeLink`], so they outlast
//! placement epochs.
//!
//! A node that answers that it does not hold an expert the routing table
//! lists it for is a stale replica: that (node, layer, expert) is avoided
//! while another replica can serve the expert, until the placement epoch
//! changes (at most [`STALE_REPLICA_FOR_MS`]), and the coordinators hear
//! of it too.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use tokio::sync::mpsc;

use moemesh_client::CoordinatorClient;

use crate::load::{UnreachableReport, report_unreachable_task};
use crate::table::NodeLink;

/// How long a node that failed is avoided while other replicas can serve.
pub const UNHEALTHY_FOR_MS: u64 = 2_000;

/// How long a stale replica is avoided at most when the placement epoch
/// does not change: a node restarted empty under the same id loads its
/// experts again without a new epoch, and a placement file has none.
pub const STALE_REPLICA_FOR_MS: u64 = 10_000;

/// Unreachable reports waiting for the coordinators; more are dropped
/// rather than slowing a forward.
const REPORT_QUEUE: usize = 64;

/// Milliseconds on a clock shared by the router's node health marks.
pub fn health_clock() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// Per node of `links`: whether it failed within the last
/// [`UNHEALTHY_FOR_MS`] and is to be avoided now.
pub fn recently_failed(links: &[NodeLink]) -> Vec<bool> {
    let now = health_clock();
    links
        .iter()
        .map(|link| link.unhealthy_until.load(Ordering::Relaxed) > now)
        .collect()
}

/// Marks expert nodes unreachable and tells the coordinators.
pub struct NodeHealth {
    /// Unreachable nodes (id, reason) for the coordinators; the other end
    /// is [`report_unreachable_task`]. None when the placement is a file
    /// and there are no coordinators to tell.
    unreachable_tx: Option<mpsc::Sender<UnreachableReport>>,
    /// Replicas that said they do not hold their expert.
    stale: Mutex<StaleReplicas>,
}

impl NodeHealth {
    /// Health that only this router acts on.
    pub fn without_coordinators() -> Self {
        Self::with_reports(None)
    }

    /// Health whose reports for the coordinators go to `unreachable_tx`.
    pub(crate) fn with_reports(unreachable_tx: Option<mpsc::Sender<UnreachableReport>>) -> Self {
        Self {
            unreachable_tx,
            stale: Mutex::new(StaleReplicas::default()),
        }
    }

    /// Health whose unreachable marks are reported to `coordinators` by
    /// `router`; the reporting task ends with the router.
    pub fn reporting_to(coordinators: CoordinatorClient, router: String) -> Self {
        let (unreachable_tx, unreachable_rx) = mpsc::channel(REPORT_QUEUE);
        tokio::spawn(report_unreachable_task(
            coordinators,
            router,
            unreachable_rx,
        ));
        Self::with_reports(Some(unreachable_tx))
    }

    /// Avoids `link`'s node for [`UNHEALTHY_FOR_MS`] from now. The
    /// coordinators hear of it only when the node was not already avoided:
    /// one report per outage, not one per failed call.
    pub fn mark_unreachable(&self, link: &NodeLink, reason: &str) {
        let now = health_clock();
        let was_healthy = link
            .unhealthy_until
            .swap(now + UNHEALTHY_FOR_MS, Ordering::Relaxed)
            <= now;
        if was_healthy {
            self.report(link, reason.to_string());
        }
    }

    /// Avoids `experts` of `layer` on `link`'s node, which said it does not
    /// hold them, while the routing table of `epoch` lasts (at most
    /// [`STALE_REPLICA_FOR_MS`]). The coordinators hear of each replica
    /// once while it is avoided.
    pub fn mark_stale(&self, epoch: u64, link: &NodeLink, layer: usize, experts: &[u32]) {
        let newly_stale =
            self.stale
                .lock()
                .expect("stale replicas")
                .mark(epoch, &link.node.id, layer, experts);
        let reason = match newly_stale.as_slice() {
            [] => return,
            [expert] => format!("stale replica: node does not hold layer {layer} expert {expert}"),
            experts => {
                format!("stale replica: node does not hold layer {layer} experts {experts:?}")
            }
        };
        self.report(link, reason);
    }

    /// The replicas of `layer` to avoid in the routing table of `epoch`
    /// whose nodes are `links`: (node index, expert) pairs.
    pub fn stale_replicas(
        &self,
        epoch: u64,
        links: &[NodeLink],
        layer: usize,
    ) -> Vec<(usize, u32)> {
        let stale = self
            .stale
            .lock()
            .expect("stale replicas")
            .of_layer(epoch, layer);
        stale
            .into_iter()
            .filter_map(|(node_id, expert)| {
                let node = links.iter().position(|link| link.node.id == node_id)?;
                Some((node, expert))
            })
            .collect()
    }

    /// Tells the coordinators about `link`'s node, unless their queue is full.
    fn report(&self, link: &NodeLink, reason: String) {
        if let Some(unreachable_tx) = &self.unreachable_tx {
            let _ = unreachable_tx.try_send(UnreachableReport {
                node: link.node.id.clone(),
                reason,
            });
        }
    }
}

/// Stale replicas of one placement epoch: until when (on [`health_clock`])
/// each (node id, layer, expert) is avoided.
#[derive(Debug, Default)]
struct StaleReplicas {
    epoch: u64,
    until: HashMap<(String, usize, u32), u64>,
}

impl StaleReplicas {
    /// Forgets the marks of older epochs once `epoch` is newer: the new
    /// placement may have put the experts back, or moved them.
    fn follow_epoch(&mut self, epoch: u64) {
        if epoch > self.epoch {
            self.epoch = epoch;
            self.until.clear();
        }
    }

    /// Marks `experts` of `layer` on `node` stale, unless `epoch` is older
    /// than the newest seen; returns those not already marked.
    fn mark(&mut self, epoch: u64, node: &str, layer: usize, experts: &[u32]) -> Vec<u32> {
        self.follow_epoch(epoch);
        if epoch < self.epoch {
            return Vec::new();
        }
        let now = health_clock();
        let mut newly_stale = Vec::new();
        for &expert in experts {
            let until = self
                .until
                .entry((node.to_string(), layer, expert))
                .or_default();
            if *until <= now {
                newly_stale.push(expert);
            }
            *until = now + STALE_REPLICA_FOR_MS;
        }
        newly_stale
    }

    /// The (node id, expert) pairs of `layer` avoided now in `epoch`.
    fn of_layer(&mut self, epoch: u64, layer: usize) -> Vec<(String, u32)> {
        self.follow_epoch(epoch);
        if epoch < self.epoch || self.until.is_empty() {
            return Vec::new();
        }
        let now = health_clock();
        self.until.retain(|_, until| *until > now);
        self.until
            .keys()
            .filter(|(_, marked_layer, _)| *marked_layer == layer)
            .map(|(node, _, expert)| (node.clone(), *expert))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use moemesh_core::model::placement::NodeEntry;
    use moemesh_proto::tls::TlsConfig;

    use super::*;

    fn report(node: &str, reason: &str) -> UnreachableReport {
        UnreachableReport {
            node: node.into(),
            reason: reason.into(),
        }
    }

    fn link(id: &str) -> NodeLink {
        let node = NodeEntry {
            id: id.into(),
            address: "http://127.0.0.1:1".into(),
        };
        NodeLink::connect_lazy(node, String::new(), &TlsConfig::plaintext()).unwrap()
    }

    #[tokio::test]
    async fn an_unreachable_node_is_avoided_for_a_while_and_reported_once() {
        let (unreachable_tx, mut unreachable_rx) = mpsc::channel(REPORT_QUEUE);
        let health = NodeHealth::with_reports(Some(unreachable_tx));
        let links = [link("a"), link("b")];
        assert_eq!(recently_failed(&links), vec![false, false]);

        health.mark_unreachable(&links[1], "connection refused");
        health.mark_unreachable(&links[1], "connection refused again");
        assert_eq!(recently_failed(&links), vec![false, true]);
        let until = links[1].unhealthy_until.load(Ordering::Relaxed);
        assert!(until > health_clock() && until <= health_clock() + UNHEALTHY_FOR_MS);
        assert_eq!(
            unreachable_rx.try_recv(),
            Ok(report("b", "connection refused"))
        );
        assert!(unreachable_rx.try_recv().is_err(), "reported twice");

        // Once the window has passed, the node is used again, and a new
        // failure is a new outage to report.
        links[1].unhealthy_until.store(0, Ordering::Relaxed);
        assert_eq!(recently_failed(&links), vec![false, false]);
        health.mark_unreachable(&links[1], "down again");
        assert_eq!(unreachable_rx.try_recv(), Ok(report("b", "down again")));
    }

    #[tokio::test]
    async fn without_coordinators_marks_still_steer_forwards() {
        let health = NodeHealth::without_coordinators();
        let links = [link("a")];
        health.mark_unreachable(&links[0], "timed out");
        assert_eq!(recently_failed(&links), vec![true]);
    }

    #[tokio::test]
    async fn a_stale_replica_is_avoided_until_the_epoch_changes_and_reported_once() {
        let (unreachable_tx, mut unreachable_rx) = mpsc::channel(REPORT_QUEUE);
        let health = NodeHealth::with_reports(Some(unreachable_tx));
        let links = [link("a"), link("b")];
        health.mark_stale(4, &links[1], 0, &[3]);
        health.mark_stale(4, &links[1], 0, &[3]);
        health.mark_stale(4, &links[1], 1, &[2, 5]);
        assert_eq!(
            unreachable_rx.try_recv(),
            Ok(report(
                "b",
                "stale replica: node does not hold layer 0 expert 3"
            ))
        );
        assert_eq!(
            unreachable_rx.try_recv(),
            Ok(report(
                "b",
                "stale replica: node does not hold layer 1 experts [2, 5]"
            ))
        );
        assert!(unreachable_rx.try_recv().is_err(), "reported twice");
        // Only the replica is avoided: the node stays healthy.
        assert_eq!(recently_failed(&links), vec![false, false]);
        assert_eq!(health.stale_replicas(4, &links, 0), vec![(1, 3)]);
        let mut layer_1 = health.stale_replicas(4, &links, 1);
        layer_1.sort_unstable();
        assert_eq!(layer_1, vec![(1, 2), (1, 5)]);

        // A forward still on an older table neither sees nor undoes them.
        health.mark_stale(3, &links[0], 0, &[1]);
        assert!(health.stale_replicas(3, &links, 0).is_empty());
        assert_eq!(health.stale_replicas(4, &links, 0), vec![(1, 3)]);

        // A new epoch forgets them.
        assert!(health.stale_replicas(5, &links, 0).is_empty());
        assert!(health.stale_replicas(5, &links, 1).is_empty());
        health.mark_stale(5, &links[1], 0, &[3]);
        assert!(
            unreachable_rx.try_recv().is_ok(),
            "a new epoch's mark is news"
        );
    }

    #[test]
    fn a_stale_mark_expires_without_a_new_epoch() {
        let mut stale = StaleReplicas::default();
        assert_eq!(stale.mark(0, "a", 0, &[1]), vec![1]);
        assert_eq!(stale.of_layer(0, 0), vec![("a".to_string(), 1)]);
        stale.until.values_mut().for_each(|until| *until = 0);
        assert!(stale.of_layer(0, 0).is_empty());
        assert_eq!(stale.mark(0, "a", 0, &[1]), vec![1], "marked afresh");
    }
}
