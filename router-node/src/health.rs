//! Expert node health as this router sees it. A node that did not answer
//! is avoided for [`UNHEALTHY_FOR_MS`] while another replica can serve its
//! experts (a node that merely refused work stays in use), and the
//! coordinators hear of it, so that the leader declares a dead node dead
//! sooner. The marks live on each node's [`NodeLink`], so they outlast
//! placement epochs.

use std::sync::OnceLock;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::sync::mpsc;

use moemesh_client::CoordinatorClient;

use crate::load::{UnreachableReport, report_unreachable_task};
use crate::table::NodeLink;

/// How long a node that failed is avoided while other replicas can serve.
pub const UNHEALTHY_FOR_MS: u64 = 2_000;

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
}

impl NodeHealth {
    /// Health that only this router acts on.
    pub fn without_coordinators() -> Self {
        Self {
            unreachable_tx: None,
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
        Self {
            unreachable_tx: Some(unreachable_tx),
        }
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
        if was_healthy && let Some(unreachable_tx) = &self.unreachable_tx {
            let _ = unreachable_tx.try_send(UnreachableReport {
                node: link.node.id.clone(),
                reason: reason.to_string(),
            });
        }
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
        let health = NodeHealth {
            unreachable_tx: Some(unreachable_tx),
        };
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
}
