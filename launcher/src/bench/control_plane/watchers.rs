//! Simulated routers for the control-plane bench: each follows the
//! placement through the SDK's [`CoordinatorClient`] (its own connection)
//! and keeps a [`PlacementView`], as a router keeps its table, logging
//! when each update arrived and what it cost on the wire.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use moemesh_client::CoordinatorClient;
use moemesh_proto::placement::{Applied, PlacementView, update_wire_bytes};
use moemesh_proto::v1::{PlacementSnapshot, PlacementUpdate};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio::task::JoinSet;

use super::fleet::rotated;
use crate::certs::MemberRole;
use crate::local_cluster::ClusterSecurity;

/// Watchers waiting for their first snapshot at once: each snapshot of a
/// large placement is a megabyte in flight.
const CONCURRENT_FIRST_SNAPSHOTS: usize = 16;

/// One update as a watcher received it.
#[derive(Debug, Clone, Copy)]
pub struct Seen {
    pub at: Instant,
    /// The view's epoch once it was applied.
    pub epoch: u64,
    pub wire_bytes: u64,
    pub snapshot: bool,
}

/// The watchers; their tasks stop when this is dropped.
pub struct Watchers {
    logs: Vec<Arc<Mutex<Vec<Seen>>>>,
    _tasks: JoinSet<()>,
}

impl Watchers {
    /// Starts `count` watchers of `model`, spread over the coordinators,
    /// and returns once each has its first snapshot (printing progress).
    pub async fn start(
        security: &ClusterSecurity,
        urls: &[String],
        model: &str,
        count: usize,
    ) -> anyhow::Result<Self> {
        let admission = Arc::new(Semaphore::new(CONCURRENT_FIRST_SNAPSHOTS));
        let mut tasks = JoinSet::new();
        let mut logs = Vec::with_capacity(count);
        let mut firsts = Vec::with_capacity(count);
        for index in 0..count {
            let tls = security.member_tls(MemberRole::Router, &format!("router-{index}"))?;
            let client = CoordinatorClient::new(rotated(urls, index), tls)?;
            let log = Arc::new(Mutex::new(Vec::new()));
            let (first_tx, first_rx) = oneshot::channel();
            // Released once the watcher has its first snapshot.
            let permit = Arc::clone(&admission).acquire_owned().await?;
            tasks.spawn(follow(
                client,
                model.to_string(),
                Arc::clone(&log),
                (first_tx, permit),
            ));
            logs.push(log);
            firsts.push(first_rx);
            if firsts.len() % 100 == 0 {
                eprintln!("  {}/{count} watchers started", firsts.len());
            }
        }
        futures::future::join_all(firsts).await;
        Ok(Self {
            logs,
            _tasks: tasks,
        })
    }

    /// Waits until every watcher's view has reached `epoch`; false when
    /// `patience` ran out first.
    pub async fn wait_for_epoch(&self, epoch: u64, patience: Duration) -> bool {
        let deadline = Instant::now() + patience;
        loop {
            let behind = self
                .logs
                .iter()
                .filter(|log| last(log).is_none_or(|seen| seen.epoch < epoch))
                .count();
            if behind == 0 {
                return true;
            }
            if Instant::now() >= deadline {
                eprintln!("  {behind} watchers never reached epoch {epoch}");
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every watcher's updates received at `from` or later.
    pub fn seen_since(&self, from: Instant) -> Vec<Vec<Seen>> {
        self.logs
            .iter()
            .map(|log| {
                let log = log.lock().expect("never poisoned");
                log.iter().copied().filter(|seen| seen.at >= from).collect()
            })
            .collect()
    }
}

fn last(log: &Mutex<Vec<Seen>>) -> Option<Seen> {
    log.lock().expect("never poisoned").last().copied()
}

/// One watcher: applies every update to its view and logs it.
async fn follow(
    client: CoordinatorClient,
    model: String,
    log: Arc<Mutex<Vec<Seen>>>,
    first: (oneshot::Sender<()>, OwnedSemaphorePermit),
) {
    let mut first = Some(first);
    let mut view = PlacementView::new();
    let mut updates = client.watch_placement_updates(&model, None);
    while let Some(update) = updates.next().await {
        let Some(seen) = apply(&mut view, update, &model) else {
            continue;
        };
        log.lock().expect("never poisoned").push(seen);
        if let Some((first_tx, _permit)) = first.take() {
            let _ = first_tx.send(());
        }
    }
}

/// Applies `update` to `view`; what was seen, or None (logged) when it
/// does not apply.
pub fn apply(view: &mut PlacementView, update: PlacementUpdate, model: &str) -> Option<Seen> {
    let wire_bytes = update_wire_bytes(&update);
    match view.apply(update, model) {
        Ok(applied) => Some(Seen {
            at: Instant::now(),
            epoch: view.epoch(),
            wire_bytes,
            snapshot: applied == Applied::Snapshot,
        }),
        Err(error) => {
            tracing::warn!(%error, "a placement update did not apply");
            None
        }
    }
}

/// What a watcher that stopped reading at some revision and comes back
/// later receives.
#[derive(Debug, Clone)]
pub struct CatchUp {
    /// Epochs published while it was away.
    pub epochs_missed: u64,
    /// Its first update after coming back.
    pub first: Seen,
    pub took: Duration,
    /// Its view then equals a fresh snapshot (revision aside).
    pub matches_snapshot: bool,
    /// What a fresh snapshot costs on the wire, for comparison.
    pub snapshot_bytes: u64,
}

/// A watcher that keeps its view from a first snapshot and reads no more,
/// until [`Laggard::come_back`].
pub struct Laggard {
    client: CoordinatorClient,
    model: String,
    view: PlacementView,
}

impl Laggard {
    /// Connects and takes one snapshot.
    pub async fn start(
        security: &ClusterSecurity,
        urls: &[String],
        model: &str,
    ) -> anyhow::Result<Self> {
        let tls = security.member_tls(MemberRole::Router, "router-laggard")?;
        let client = CoordinatorClient::new(urls.to_vec(), tls)?;
        let mut view = PlacementView::new();
        let first = client
            .watch_placement_updates(model, None)
            .next()
            .await
            .ok_or_else(|| anyhow::anyhow!("the placement stream ended at once"))?;
        view.apply(first, model)?;
        Ok(Self {
            client,
            model: model.to_string(),
            view,
        })
    }

    pub fn epoch(&self) -> u64 {
        self.view.epoch()
    }

    /// Watches again from the revision it has, and checks the result
    /// against a fresh snapshot.
    pub async fn come_back(mut self) -> anyhow::Result<CatchUp> {
        let epoch_before = self.view.epoch();
        let started = Instant::now();
        let update = self
            .client
            .watch_placement_updates(&self.model, self.view.revision())
            .next()
            .await
            .ok_or_else(|| anyhow::anyhow!("the placement stream ended at once"))?;
        let first = apply(&mut self.view, update, &self.model)
            .ok_or_else(|| anyhow::anyhow!("the catch-up update did not apply"))?;
        let took = started.elapsed();
        let fresh = self
            .client
            .watch_placement_updates(&self.model, None)
            .next()
            .await
            .ok_or_else(|| anyhow::anyhow!("the placement stream ended at once"))?;
        let snapshot_bytes = update_wire_bytes(&fresh);
        let mut fresh_view = PlacementView::new();
        fresh_view.apply(fresh, &self.model)?;
        let without_revision = |snapshot: PlacementSnapshot| PlacementSnapshot {
            revision: 0,
            ..snapshot
        };
        Ok(CatchUp {
            epochs_missed: self.view.epoch() - epoch_before,
            first,
            took,
            matches_snapshot: without_revision(self.view.snapshot())
                == without_revision(fresh_view.snapshot()),
            snapshot_bytes,
        })
    }
}
