//! [`PlacementView`]: a watcher's copy of the placement, kept from the
//! updates of a placement stream (`AdminService.WatchPlacement`).
//!
//! A stream starts with a snapshot, or, when the watcher sent the revision
//! it has, with only what changed since; then each update carries the nodes
//! and experts that changed, whole. Applying them in order gives the
//! snapshot the coordinator would send at the same revision, so a watcher
//! of a large placement pays for what changes, not for what it already has.

use std::collections::BTreeMap;

use crate::v1::{
    ExpertPlacement, NodeInfo, PlacementDelta, PlacementSnapshot, PlacementUpdate, ReplicaInfo,
    placement_update,
};

/// An expert of a model: (model, layer, expert).
pub type ExpertId = (String, u32, u32);

/// Why an update does not apply to a view.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementViewError {
    #[error("a placement update carries neither a snapshot nor a delta")]
    Empty,
    #[error("a placement delta arrived before any snapshot")]
    DeltaWithoutBase,
}

/// The placement as a watcher has it, at one revision.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PlacementView {
    /// None until the first snapshot.
    revision: Option<u64>,
    epoch: u64,
    nodes: BTreeMap<String, NodeInfo>,
    experts: BTreeMap<ExpertId, Vec<ReplicaInfo>>,
}

/// What one update did to a view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// It was older than the view (from a coordinator behind the one the
    /// view came from) and was left out.
    Stale,
    /// It replaced the view with a whole snapshot.
    Snapshot,
    /// It patched the nodes and experts that changed.
    Delta,
}

impl PlacementView {
    /// An empty view, before any update.
    pub fn new() -> Self {
        Self::default()
    }

    /// The revision the view is at; None before the first snapshot. Send it
    /// as `since_revision` when watching again.
    pub fn revision(&self) -> Option<u64> {
        self.revision
    }

    /// The placement epoch the view is at.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Applies the next update of a stream that follows `model` (empty: all
    /// models; a delta of a one-model stream leaves the model out of its
    /// experts).
    ///
    /// An update older than the view is left out, so the view never goes
    /// back: after a reconnection to a coordinator that is behind, its
    /// updates apply again once it has caught up. A delta then covers at
    /// least what changed since the view's revision (it names everything
    /// changed since an older one, as it is now), so it still gives the
    /// coordinator's snapshot.
    pub fn apply(
        &mut self,
        update: PlacementUpdate,
        model: &str,
    ) -> Result<Applied, PlacementViewError> {
        let update = update.update.ok_or(PlacementViewError::Empty)?;
        let revision = match &update {
            placement_update::Update::Snapshot(snapshot) => snapshot.revision,
            placement_update::Update::Delta(delta) => delta.revision,
        };
        if self.revision.is_some_and(|have| revision < have) {
            return Ok(Applied::Stale);
        }
        match update {
            placement_update::Update::Snapshot(snapshot) => Ok(self.replace(snapshot)),
            placement_update::Update::Delta(delta) => self.patch(delta, model),
        }
    }

    fn replace(&mut self, snapshot: PlacementSnapshot) -> Applied {
        self.revision = Some(snapshot.revision);
        self.epoch = snapshot.epoch;
        self.nodes = snapshot
            .nodes
            .into_iter()
            .map(|node| (node.id.clone(), node))
            .collect();
        self.experts = snapshot
            .experts
            .into_iter()
            .map(|placement| {
                let id = (placement.model, placement.layer, placement.expert);
                (id, placement.replicas)
            })
            .collect();
        Applied::Snapshot
    }

    fn patch(&mut self, delta: PlacementDelta, model: &str) -> Result<Applied, PlacementViewError> {
        self.revision.ok_or(PlacementViewError::DeltaWithoutBase)?;
        self.revision = Some(delta.revision);
        self.epoch = delta.epoch;
        for node in delta.nodes {
            self.nodes.insert(node.id.clone(), node);
        }
        for placement in delta.experts {
            let model = if placement.model.is_empty() {
                model.to_string()
            } else {
                placement.model
            };
            let id = (model, placement.layer, placement.expert);
            if placement.replicas.is_empty() {
                self.experts.remove(&id);
            } else {
                self.experts.insert(id, placement.replicas);
            }
        }
        Ok(Applied::Delta)
    }

    /// The view as the snapshot a coordinator would send at its revision.
    pub fn snapshot(&self) -> PlacementSnapshot {
        PlacementSnapshot {
            epoch: self.epoch,
            revision: self.revision.unwrap_or_default(),
            nodes: self.nodes.values().cloned().collect(),
            experts: self
                .experts
                .iter()
                .map(|((model, layer, expert), replicas)| ExpertPlacement {
                    model: model.clone(),
                    layer: *layer,
                    expert: *expert,
                    replicas: replicas.clone(),
                })
                .collect(),
        }
    }
}

/// Bytes an update takes on the wire inside its HTTP/2 stream: the message,
/// gRPC's 5-byte prefix, and a 9-byte DATA frame header per 16 KiB frame
/// (HTTP/2's default largest frame). TCP and TLS add their own.
pub fn update_wire_bytes(update: &PlacementUpdate) -> u64 {
    use prost::Message;
    const FRAME_PAYLOAD: usize = 16 * 1024;
    let framed = update.encoded_len() + 5;
    (framed + framed.div_ceil(FRAME_PAYLOAD) * 9) as u64
}
