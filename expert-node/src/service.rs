//! `ExpertService`: validates each request completely before it reaches the
//! device worker, so that a bad request is refused with a clear message and
//! never disturbs other work.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::Ordering;

use moemesh_core::backend::ComputeBackend;
use moemesh_core::checkpoint::Checkpoint;
use moemesh_core::config::ModelConfig;
use moemesh_core::tensor::{WireDtype, decode_rows, encode};
use moemesh_proto::v1::{
    ComputeRequest, ComputeResponse, ExpertLoad, ExpertRows, InfoRequest, InfoResponse,
    LayerExperts,
};
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::worker::{ComputeJob, DeviceWorker, DeviceWorkerHandle, ExpertAssignment};
use crate::{ExpertNodeConfig, ExpertNodeError, ExpertNodeResult};

/// The gRPC face of an expert node.
pub struct ExpertNodeService {
    model_id: String,
    config: ModelConfig,
    /// Experts held per layer; fixed once loaded.
    held: BTreeMap<usize, BTreeSet<u32>>,
    backend_description: String,
    weight_bytes: u64,
    worker: DeviceWorkerHandle,
}

impl ExpertNodeService {
    /// Loads the configured experts from `checkpoint` onto `backend` and
    /// starts the device worker.
    pub fn load(
        checkpoint: &Checkpoint,
        backend: &dyn ComputeBackend,
        node_config: &ExpertNodeConfig,
    ) -> ExpertNodeResult<Self> {
        let config = checkpoint.config().clone();
        if node_config.experts.is_empty() {
            return Err(ExpertNodeError::InvalidArgument(
                "no experts assigned to this node".into(),
            ));
        }
        let mut held: BTreeMap<usize, BTreeSet<u32>> = BTreeMap::new();
        let mut experts = HashMap::new();
        let mut weight_bytes = 0u64;
        for &(layer, expert) in &node_config.experts {
            if !held.entry(layer).or_default().insert(expert) {
                continue;
            }
            let resident = backend.load_expert(checkpoint.load_expert(layer, expert)?)?;
            weight_bytes += resident.weight_bytes() as u64;
            experts.insert((layer, expert), resident);
        }
        tracing::info!(
            experts = experts.len(),
            layers = held.len(),
            weight_mib = weight_bytes / (1 << 20),
            backend = %backend.describe(),
            "experts resident"
        );
        let worker = DeviceWorker::spawn(experts, config.hidden_size, node_config.queue_capacity);
        Ok(Self {
            model_id: node_config.model_id.clone(),
            config,
            held,
            backend_description: backend.describe(),
            weight_bytes,
            worker,
        })
    }

    /// Returns the experts this node serves, per layer.
    pub fn serving(&self) -> Vec<LayerExperts> {
        self.held
            .iter()
            .map(|(&layer, experts)| LayerExperts {
                layer: layer as u32,
                experts: experts.iter().copied().collect(),
            })
            .collect()
    }

    /// Returns the model id this node serves.
    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    /// Checks a request against what this node holds and turns it into a job.
    fn validate(&self, request: ComputeRequest) -> ExpertNodeResult<ComputeJob> {
        if !request.model.is_empty() && request.model != self.model_id {
            return Err(ExpertNodeError::InvalidArgument(format!(
                "unknown model {:?}; this node serves {:?}",
                request.model, self.model_id
            )));
        }
        let layer = request.layer as usize;
        let held = self.held.get(&layer).ok_or_else(|| {
            ExpertNodeError::InvalidArgument(format!(
                "layer {layer} is not held here; this node holds layers {:?}",
                self.held.keys().collect::<Vec<_>>()
            ))
        })?;
        let rows = decode_rows(request.rows.as_ref(), self.config.hidden_size)?;
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
        let stats = self.worker.stats();
        let mut load: Vec<ExpertLoad> = stats
            .tokens
            .iter()
            .map(|(&(layer, expert), tokens)| ExpertLoad {
                layer: layer as u32,
                expert,
                tokens: tokens.load(Ordering::Relaxed),
            })
            .collect();
        load.sort_by_key(|entry| (entry.layer, entry.expert));
        InfoResponse {
            model: self.model_id.clone(),
            family: self.config.family.to_string(),
            hidden_size: self.config.hidden_size as u32,
            num_experts: self.config.num_experts as u32,
            layers: self.serving(),
            load,
            backend: self.backend_description.clone(),
            weight_bytes: self.weight_bytes,
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
        let rows = job.input.len() / self.config.hidden_size;
        let combined = self.worker.compute(job).await?;
        Ok(Response::new(ComputeResponse {
            output: Some(encode(
                &combined,
                &[rows, self.config.hidden_size],
                WireDtype::F32,
            )),
        }))
    }

    async fn info(&self, _request: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        Ok(Response::new(self.describe()))
    }
}
