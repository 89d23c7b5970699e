//! `ExpertService`: validates each request completely before it reaches the
//! device worker, so that a bad request is refused with a clear message and
//! never disturbs other work.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use moemesh_core::compute::ComputeBackend;
use moemesh_core::model::checkpoint::Checkpoint;
use moemesh_core::model::config::ModelConfig;
use moemesh_core::model::placement::LayerExpert;
use moemesh_proto::codec::{WireDtype, decode_rows, encode};
use moemesh_proto::v1::{
    ComputeRequest, ComputeResponse, ExpertLoad, ExpertRows, InfoRequest, InfoResponse,
    LayerExperts,
};
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::residency::Residency;
use crate::worker::{ComputeJob, DeviceWorker, DeviceWorkerHandle, ExpertAssignment};
use crate::{ExpertNodeConfig, ExpertNodeError, ExpertNodeResult};

/// The gRPC face of an expert node; cheap to clone, all clones share one node.
#[derive(Clone)]
pub struct ExpertNodeService {
    inner: Arc<NodeInner>,
}

struct NodeInner {
    model_id: String,
    config: ModelConfig,
    /// Where experts are loaded from when the placement adds one.
    checkpoint: Arc<Checkpoint>,
    backend: Arc<dyn ComputeBackend>,
    worker: DeviceWorkerHandle,
    /// Whether an added expert is loaded before the worker serves it
    /// (no budget), or paged in by the worker as the budget allows.
    loads_eagerly: bool,
}

/// A node's work as heartbeats report it: the coordinators' measure of how
/// busy a node is (routed tokens are "load"; this is "work").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkCounters {
    /// Jobs waiting for the worker now.
    pub queue_depth: u64,
    /// Compute time since the node started, in microseconds.
    pub busy_micros: u64,
    /// Token-expert pairs computed since the node started.
    pub pairs: u64,
    /// Expert Buffering since the node started: experts found resident.
    pub buffer_hits: u64,
    /// Experts that were not resident when a job needed them.
    pub buffer_misses: u64,
    /// Bytes of expert weights moved into the resident tier.
    pub bytes_paged_in: u64,
    /// Experts computed on the host instead of being paged in.
    pub host_fallbacks: u64,
}

impl ExpertNodeService {
    /// Loads the configured experts from `checkpoint` onto `backend` and
    /// starts the device worker. A node may start empty and take experts
    /// as the coordinators place them.
    pub fn load(
        checkpoint: Arc<Checkpoint>,
        backend: Arc<dyn ComputeBackend>,
        node_config: &ExpertNodeConfig,
    ) -> ExpertNodeResult<Self> {
        let config = checkpoint.config().clone();
        let mut residency = Residency::new(
            Arc::clone(&checkpoint),
            Arc::clone(&backend),
            node_config.resident_budget(),
        );
        let loads_eagerly = residency.loads_eagerly();
        for &LayerExpert { layer, expert } in &node_config.experts {
            residency.serve((layer, expert), None)?;
        }
        crate::release_freed_memory();
        let worker = DeviceWorker::spawn(residency, config.hidden_size, node_config.queue_capacity);
        tracing::info!(
            experts = node_config.experts.len(),
            weight_mib = worker.stats().weight_bytes.load(Ordering::Relaxed) >> 20,
            budget = ?node_config.resident_budget(),
            backend = %backend.describe(),
            "experts loaded"
        );
        let inner = NodeInner {
            model_id: node_config.model_id.clone(),
            config,
            checkpoint,
            backend,
            worker,
            loads_eagerly,
        };
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// Loads an expert from the checkpoint and makes it resident (a no-op
    /// if it already is). Loading runs off the async runtime.
    pub async fn add_expert(&self, layer: usize, expert: u32) -> ExpertNodeResult<()> {
        if self
            .inner
            .worker
            .held()
            .get(&layer)
            .is_some_and(|experts| experts.contains(&expert))
        {
            return Ok(());
        }
        let inner = Arc::clone(&self.inner);
        let loaded = if inner.loads_eagerly {
            let loaded = tokio::task::spawn_blocking(move || {
                inner.backend.page_in(&inner.checkpoint, layer, expert)
            })
            .await
            .map_err(|error| {
                ExpertNodeError::Internal(format!("expert loading panicked: {error}"))
            })??;
            Some(loaded)
        } else {
            None
        };
        self.inner.worker.add_expert(layer, expert, loaded).await?;
        crate::release_freed_memory();
        tracing::info!(layer, expert, "expert loaded");
        Ok(())
    }

    /// Drops an expert after the work already queued for it.
    pub async fn remove_expert(&self, layer: usize, expert: u32) -> ExpertNodeResult<()> {
        self.inner.worker.remove_expert(layer, expert).await?;
        tracing::info!(layer, expert, "expert unloaded");
        Ok(())
    }

    /// What heartbeats report of this node's work.
    pub fn work_counters(&self) -> WorkCounters {
        let worker = &self.inner.worker;
        let stats = worker.stats();
        WorkCounters {
            queue_depth: worker.queue_depth() as u64,
            busy_micros: stats.busy_micros.load(Ordering::Relaxed),
            pairs: stats.pairs.load(Ordering::Relaxed),
            buffer_hits: stats.buffer_hits.load(Ordering::Relaxed),
            buffer_misses: stats.buffer_misses.load(Ordering::Relaxed),
            bytes_paged_in: stats.bytes_paged_in.load(Ordering::Relaxed),
            host_fallbacks: stats.host_fallbacks.load(Ordering::Relaxed),
        }
    }

    /// Returns the experts this node serves, per layer.
    pub fn serving(&self) -> Vec<LayerExperts> {
        self.inner
            .worker
            .held()
            .iter()
            .map(|(&layer, experts)| LayerExperts {
                layer: layer as u32,
                experts: experts.iter().copied().collect(),
            })
            .collect()
    }

    /// Returns the model id this node serves.
    pub fn model_id(&self) -> &str {
        &self.inner.model_id
    }

    /// Checks a request against what this node holds and turns it into a job.
    fn validate(&self, request: ComputeRequest) -> ExpertNodeResult<ComputeJob> {
        let inner = &self.inner;
        if !request.model.is_empty() && request.model != inner.model_id {
            return Err(ExpertNodeError::InvalidArgument(format!(
                "unknown model {:?}; this node serves {:?}",
                request.model, inner.model_id
            )));
        }
        let layer = request.layer as usize;
        let all_held = inner.worker.held();
        let held = all_held.get(&layer).ok_or_else(|| {
            ExpertNodeError::InvalidArgument(format!(
                "layer {layer} is not held here; this node holds layers {:?}",
                all_held.keys().collect::<Vec<_>>()
            ))
        })?;
        let rows = decode_rows(request.rows.as_ref(), inner.config.hidden_size)?;
        let mut assignments = Vec::with_capacity(request.experts.len());
        let mut previous_expert = None;
        for ExpertRows {
            expert,
            rows: row_indices,
            weights,
        } in request.experts
        {
            if !held.contains(&expert) {
                return Err(ExpertNodeError::InvalidArgument(format!(
                    "expert {expert} of layer {layer} is not held here; held: {held:?}"
                )));
            }
            if previous_expert.is_some_and(|previous| previous >= expert) {
                return Err(ExpertNodeError::InvalidArgument(format!(
                    "experts must be listed in strictly increasing order; {expert} follows {}",
                    previous_expert.unwrap_or_default()
                )));
            }
            previous_expert = Some(expert);
            if row_indices.len() != weights.len() {
                return Err(ExpertNodeError::InvalidArgument(format!(
                    "expert {expert}: {} rows but {} weights",
                    row_indices.len(),
                    weights.len()
                )));
            }
            if let Some(position) = row_indices.windows(2).position(|pair| pair[0] >= pair[1]) {
                return Err(ExpertNodeError::InvalidArgument(format!(
                    "expert {expert}: row indices must be strictly increasing ({} then {})",
                    row_indices[position],
                    row_indices[position + 1]
                )));
            }
            if let Some(&row) = row_indices.last()
                && row as usize >= rows.rows
            {
                return Err(ExpertNodeError::InvalidArgument(format!(
                    "expert {expert}: row index {row} is out of range for {} rows",
                    rows.rows
                )));
            }
            if let Some(weight) = weights.iter().find(|weight| !weight.is_finite()) {
                return Err(ExpertNodeError::InvalidArgument(format!(
                    "expert {expert}: routing weight {weight} is not finite"
                )));
            }
            assignments.push(ExpertAssignment {
                expert,
                rows: row_indices,
                weights,
            });
        }
        Ok(ComputeJob {
            layer,
            input: rows.values,
            assignments,
        })
    }

    fn describe(&self) -> InfoResponse {
        let inner = &self.inner;
        let stats = inner.worker.stats();
        let load = stats
            .tokens
            .lock()
            .expect("worker stats")
            .iter()
            .map(|(&(layer, expert), &tokens)| ExpertLoad {
                layer: layer as u32,
                expert,
                tokens,
            })
            .collect();
        InfoResponse {
            model: inner.model_id.clone(),
            family: inner.config.family.to_string(),
            hidden_size: inner.config.hidden_size as u32,
            num_experts: inner.config.num_experts as u32,
            layers: self.serving(),
            load,
            backend: inner.backend.describe(),
            weight_bytes: stats.weight_bytes.load(Ordering::Relaxed),
        }
    }
}

#[tonic::async_trait]
impl moemesh_proto::ExpertService for ExpertNodeService {
    #[instrument(skip_all, fields(layer = request.get_ref().layer, experts = request.get_ref().experts.len()))]
    async fn compute(
        &self,
        request: Request<ComputeRequest>,
    ) -> Result<Response<ComputeResponse>, Status> {
        let job = self.validate(request.into_inner())?;
        let hidden_size = self.inner.config.hidden_size;
        let rows: usize = job
            .assignments
            .iter()
            .map(|assignment| assignment.rows.len())
            .sum();
        let computed = self.inner.worker.compute(job).await?;
        Ok(Response::new(ComputeResponse {
            output: Some(encode(
                &computed.output,
                &[rows, hidden_size],
                WireDtype::F32,
            )),
            compute_micros: computed.compute_time.as_micros() as u64,
        }))
    }

    async fn info(&self, _request: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        Ok(Response::new(self.describe()))
    }
}
