//! `ExpertService`: validates each request completely before it reaches the
//! device worker, so that a bad request is refused with a clear message and
//! never disturbs other work.
//!
//! A request first takes a place in the worker's queue (an overloaded node
//! refuses at once), then its sizes are checked against the model and
//! [`limits::ComputeLimits`], then what it names against what the node
//! holds; its rows are decoded last.

pub mod limits;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use moemesh_core::compute::ComputeBackend;
use moemesh_core::model::checkpoint::Checkpoint;
use moemesh_core::model::config::ModelConfig;
use moemesh_core::model::placement::LayerExpert;
use moemesh_proto::codec::{WireDtype, check_rows_header, decode_rows, encode};
use moemesh_proto::v1::{
    ComputeRequest, ComputeResponse, ExpertLoad, ExpertRows, ExpertTokens, InfoRequest,
    InfoResponse, LayerExperts,
};
use tonic::{Request, Response, Status};
use tracing::instrument;

use moemesh_proto::identity::Role;
use moemesh_proto::tls::TlsConfig;

use self::limits::ComputeLimits;
use crate::client_load::{ClientLoad, JobLoad};
use crate::metrics::ExpertMetrics;
use crate::residency::Residency;
use crate::worker::{ComputeJob, DeviceWorker, DeviceWorkerHandle, ExpertAssignment, HeldExperts};
use crate::{ExpertNodeConfig, ExpertNodeError, ExpertNodeResult};

/// The gRPC face of an expert node; cheap to clone, all clones share one node.
#[derive(Clone)]
pub struct ExpertNodeService {
    inner: Arc<NodeInner>,
}

struct NodeInner {
    model_id: String,
    config: ModelConfig,
    /// The sizes a request may have, from `config`.
    limits: ComputeLimits,
    /// Where experts are loaded from when the placement adds one.
    checkpoint: Arc<Checkpoint>,
    backend: Arc<dyn ComputeBackend>,
    worker: DeviceWorkerHandle,
    /// Whether an added expert is loaded before the worker serves it
    /// (no budget), or paged in by the worker as the budget allows.
    loads_eagerly: bool,
    /// Says who each caller is: only routers and clients compute.
    tls: TlsConfig,
    metrics: ExpertMetrics,
    /// What one-hop clients had this node compute, for heartbeats.
    client_load: ClientLoad,
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
        let worker = DeviceWorker::spawn(
            residency,
            config.hidden_size,
            node_config.queue_capacity,
            node_config.metrics.clone(),
        );
        let limits = ComputeLimits::for_model(&config);
        tracing::info!(
            experts = node_config.experts.len(),
            weight_mib = worker.stats().weight_bytes.load(Ordering::Relaxed) >> 20,
            budget = ?node_config.resident_budget(),
            backend = %backend.describe(),
            max_rows = limits.max_rows,
            max_request_mib = limits.max_request_bytes() >> 20,
            "experts loaded"
        );
        let inner = NodeInner {
            model_id: node_config.model_id.clone(),
            limits,
            config,
            checkpoint,
            backend,
            worker,
            loads_eagerly,
            tls: node_config.tls.clone(),
            metrics: node_config.metrics.clone(),
            client_load: ClientLoad::default(),
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

    /// The tokens one-hop clients sent this node since it started, per
    /// expert, and in all ([`ClientLoad`]).
    pub fn client_load(&self) -> (Vec<ExpertTokens>, u64) {
        self.inner.client_load.snapshot()
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

    /// Where this node counts its work.
    pub fn metrics(&self) -> &ExpertMetrics {
        &self.inner.metrics
    }

    /// Returns the model id this node serves.
    pub fn model_id(&self) -> &str {
        &self.inner.model_id
    }

    /// The largest Compute request this node accepts, in bytes: its
    /// server's decoding limit.
    pub fn max_request_bytes(&self) -> usize {
        self.inner.limits.max_request_bytes()
    }

    /// Checks a request against the model, this node's limits and what it
    /// holds, and turns it into a job. Every check runs on the request's
    /// fields as they arrived; the rows are decoded (and memory allocated
    /// for them) only once all have passed.
    fn validate(&self, request: ComputeRequest) -> ExpertNodeResult<ComputeJob> {
        let inner = &self.inner;
        let ComputeRequest {
            model,
            layer,
            rows,
            experts,
        } = request;
        if !model.is_empty() && model != inner.model_id {
            return Err(ExpertNodeError::InvalidArgument(format!(
                "unknown model {model:?}; this node serves {:?}",
                inner.model_id
            )));
        }
        let layer = layer as usize;
        if !inner.config.is_moe_layer(layer) {
            return Err(ExpertNodeError::InvalidArgument(format!(
                "layer {layer} has no MoE block in this model (its MoE layers are {:?})",
                inner.config.moe_layers()
            )));
        }
        let header = check_rows_header(rows.as_ref(), inner.config.hidden_size)?;
        inner.limits.check_rows(header.rows)?;
        let mut pairs = 0;
        let mut previous_expert = None;
        for entry in &experts {
            self.check_expert_rows(entry, previous_expert, header.rows)?;
            previous_expert = Some(entry.expert);
            pairs += entry.rows.len();
        }
        inner.limits.check_pairs(pairs, header.rows)?;
        // Only now that the request is well formed: a stale placement is
        // worth retrying elsewhere, a malformed request is not.
        check_held(&inner.worker.held(), layer, &experts)?;
        let rows = decode_rows(rows.as_ref(), inner.config.hidden_size)?;
        let assignments = experts
            .into_iter()
            .map(|entry| ExpertAssignment {
                expert: entry.expert,
                rows: entry.rows,
                weights: entry.weights,
            })
            .collect();
        Ok(ComputeJob {
            layer,
            input: rows.values,
            assignments,
        })
    }

    /// Checks one expert's entry of a request of `rows` rows: an expert of
    /// the model, after `previous_expert`, with one finite weight per row
    /// and strictly increasing row indices within the request.
    fn check_expert_rows(
        &self,
        entry: &ExpertRows,
        previous_expert: Option<u32>,
        rows: usize,
    ) -> ExpertNodeResult<()> {
        let ExpertRows {
            expert,
            rows: row_indices,
            weights,
        } = entry;
        let experts_per_layer = self.inner.limits.experts_per_layer;
        if *expert as usize >= experts_per_layer {
            return Err(ExpertNodeError::InvalidArgument(format!(
                "expert {expert} does not exist: this model's layers have experts 0 to {}{}",
                experts_per_layer - 1,
                match self.inner.config.shared_expert_id() {
                    Some(shared) => format!(" ({shared} is the shared expert)"),
                    None => String::new(),
                }
            )));
        }
        if let Some(previous) = previous_expert
            && previous >= *expert
        {
            return Err(ExpertNodeError::InvalidArgument(format!(
                "experts must be listed in strictly increasing order; {expert} follows {previous}"
            )));
        }
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
            && row as usize >= rows
        {
            return Err(ExpertNodeError::InvalidArgument(format!(
                "expert {expert}: row index {row} is out of range for {rows} rows"
            )));
        }
        if let Some(weight) = weights.iter().find(|weight| !weight.is_finite()) {
            return Err(ExpertNodeError::InvalidArgument(format!(
                "expert {expert}: routing weight {weight} is not finite"
            )));
        }
        Ok(())
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

/// Refuses a request for `experts` of `layer` of which `held` lacks some,
/// naming all of those and what the node holds of the layer instead.
fn check_held(held: &HeldExperts, layer: usize, experts: &[ExpertRows]) -> ExpertNodeResult<()> {
    let held_in_layer = held.get(&layer);
    let missing: Vec<u32> = experts
        .iter()
        .map(|entry| entry.expert)
        .filter(|expert| !held_in_layer.is_some_and(|held| held.contains(expert)))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(ExpertNodeError::NotHeld {
        layer,
        experts: missing,
        detail: match held_in_layer {
            Some(held) => format!(
                "this node holds experts {:?} of layer {layer}",
                held.iter().collect::<Vec<_>>()
            ),
            None => format!("this node holds no expert of layer {layer}"),
        },
    })
}

#[tonic::async_trait]
impl moemesh_proto::ExpertService for ExpertNodeService {
    #[instrument(skip_all, fields(layer = request.get_ref().layer, experts = request.get_ref().experts.len()))]
    async fn compute(
        &self,
        request: Request<ComputeRequest>,
    ) -> Result<Response<ComputeResponse>, Status> {
        let metrics = &self.inner.metrics;
        let call = metrics.start_request();
        let input = request.get_ref().rows.as_ref();
        metrics.count_bytes_received(input.map_or(0, |tensor| tensor.data.len()));
        let result = self.compute_counted(request).await;
        call.finish(
            result
                .as_ref()
                .map_or_else(Status::code, |_| tonic::Code::Ok),
        );
        result
    }

    async fn info(&self, request: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        self.inner.tls.caller(&request).permit_members("Info")?;
        Ok(Response::new(self.describe()))
    }
}

impl ExpertNodeService {
    /// Compute's work, which [`moemesh_proto::ExpertService::compute`]
    /// counts: admission, validation, the worker's result.
    async fn compute_counted(
        &self,
        request: Request<ComputeRequest>,
    ) -> Result<Response<ComputeResponse>, Status> {
        let caller = self.inner.tls.caller(&request);
        caller.permit_roles("Compute", &[Role::Router, Role::Client])?;
        // Admission before anything is decoded: an overloaded node spends
        // no memory on work it would refuse.
        let slot = self.inner.worker.reserve_compute()?;
        let job = self.validate(request.into_inner())?;
        let hidden_size = self.inner.config.hidden_size;
        let client_job = JobLoad::of_client(&caller, &job, hidden_size);
        let rows: usize = job
            .assignments
            .iter()
            .map(|assignment| assignment.rows.len())
            .sum();
        let computed = slot.compute(job).await?;
        if let Some(client_job) = &client_job {
            self.inner.client_load.add(client_job);
        }
        let output = encode(&computed.output, &[rows, hidden_size], WireDtype::F32);
        self.inner.metrics.count_bytes_sent(output.data.len());
        Ok(Response::new(ComputeResponse {
            output: Some(output),
            compute_micros: computed.compute_time.as_micros() as u64,
        }))
    }
}

#[cfg(test)]
mod tests;
