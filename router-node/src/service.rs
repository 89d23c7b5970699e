//! `RouterService`: gate, dispatch to expert nodes in parallel, combine.

use std::collections::HashMap;
use std::sync::Arc;

use moemesh_core::checkpoint::Checkpoint;
use moemesh_core::config::ModelConfig;
use moemesh_core::gating::Gate;
use moemesh_core::placement::{NodeEntry, Placement};
use moemesh_core::tensor::{Rows, WireDtype, decode_rows, encode};
use moemesh_proto::v1::{ComputeRequest, ForwardRequest, ForwardResponse};
use moemesh_proto::{ExpertServiceClient, MAX_MESSAGE_BYTES};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status};
use tracing::instrument;

use crate::dispatch::{NodeBatch, add_partials, split_by_node};
use crate::{RouterConfig, RouterError, RouterResult};

/// One long-lived channel to an expert node.
#[derive(Clone)]
struct NodeLink {
    node: NodeEntry,
    client: ExpertServiceClient<Channel>,
}

impl NodeLink {
    fn connect_lazy(node: NodeEntry) -> RouterResult<Self> {
        let endpoint = Endpoint::from_shared(node.address.clone())
            .map_err(|error| {
                RouterError::InvalidArgument(format!(
                    "node {} address {:?}: {error}",
                    node.id, node.address
                ))
            })?
            .tcp_nodelay(true)
            .http2_adaptive_window(true);
        let client = ExpertServiceClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(Self { node, client })
    }

    /// Sends this node its share of a batch and returns its partial rows.
    async fn compute(
        mut self,
        request: ComputeRequest,
        hidden_size: usize,
        rows: usize,
    ) -> RouterResult<Vec<f32>> {
        let layer = request.layer;
        let experts: Vec<u32> = request.experts.iter().map(|rows| rows.expert).collect();
        let describe = |status: &Status| {
            format!(
                "expert node {} ({}) failed layer {layer} experts {experts:?}: {}",
                self.node.id,
                self.node.address,
                status.message()
            )
        };
        let response =
            self.client
                .compute(request)
                .await
                .map_err(|status| match status.code() {
                    Code::ResourceExhausted => RouterError::Overloaded(describe(&status)),
                    Code::InvalidArgument | Code::Internal => {
                        RouterError::Internal(describe(&status))
                    }
                    _ => RouterError::Unavailable(describe(&status)),
                })?;
        let partials =
            decode_rows(response.into_inner().output.as_ref(), hidden_size).map_err(|error| {
                RouterError::Internal(format!(
                    "expert node {} sent a bad reply: {error}",
                    self.node.id
                ))
            })?;
        if partials.rows != rows {
            return Err(RouterError::Internal(format!(
                "expert node {} returned {} rows for {rows}",
                self.node.id, partials.rows
            )));
        }
        Ok(partials.values)
    }
}

/// The gRPC face of a router.
pub struct RouterNodeService {
    model_id: String,
    config: ModelConfig,
    /// The gate of every layer this router serves.
    gates: HashMap<usize, Arc<Gate>>,
    placement: Arc<Placement>,
    links: Vec<NodeLink>,
}

impl RouterNodeService {
    /// Loads the gates of every placed layer and opens lazy channels to the
    /// expert nodes.
    pub fn load(router_config: &RouterConfig) -> RouterResult<Self> {
        let checkpoint = Checkpoint::open(&router_config.model_dir)?;
        let config = checkpoint.config().clone();
        let placement = Placement::from_file(&router_config.placement, &config)?;
        let gates = placement
            .layers()
            .into_iter()
            .map(|layer| {
                Ok((
                    layer,
                    Arc::new(Gate::new(&config, checkpoint.load_gate(layer)?)),
                ))
            })
            .collect::<RouterResult<HashMap<_, _>>>()?;
        let links = placement
            .nodes()
            .iter()
            .cloned()
            .map(NodeLink::connect_lazy)
            .collect::<RouterResult<_>>()?;
        tracing::info!(model = %router_config.model_id, layers = gates.len(), nodes = placement.nodes().len(), "router ready");
        Ok(Self {
            model_id: router_config.model_id.clone(),
            config,
            gates,
            placement: Arc::new(placement),
            links,
        })
    }

    /// Computes one layer's output for a decoded batch.
    pub async fn forward_rows(&self, layer: usize, rows: Rows) -> RouterResult<Vec<f32>> {
        let hidden_size = self.config.hidden_size;
        if rows.rows == 0 {
            return Ok(Vec::new());
        }
        let gate = Arc::clone(
            self.gates
                .get(&layer)
                .ok_or_else(|| self.unknown_layer(layer))?,
        );
        let placement = Arc::clone(&self.placement);
        let node_count = self.links.len();
        // Gating is CPU work: keep it off the async workers.
        let (rows, batches) = tokio::task::spawn_blocking(move || {
            let routing = gate.route(&rows.values, rows.rows);
            let replicas = placement
                .replicas(layer)
                .expect("every gated layer is placed");
            let batches = split_by_node(&routing, &rows.values, hidden_size, replicas, node_count);
            (rows, batches)
        })
        .await
        .map_err(|error| RouterError::Internal(format!("gating panicked: {error}")))?;

        let calls = self
            .links
            .iter()
            .zip(&batches)
            .filter(|(_, batch)| !batch.tokens.is_empty())
            .map(|(link, batch)| {
                let request = ComputeRequest {
                    model: self.model_id.clone(),
                    layer: layer as u32,
                    rows: Some(gather_rows(&rows.values, hidden_size, batch)),
                    experts: batch.expert_rows(),
                };
                link.clone()
                    .compute(request, hidden_size, batch.tokens.len())
            });
        let partials = futures::future::try_join_all(calls).await?;

        // Node order is fixed, so every token's sum is added in the same order.
        let mut output = vec![0f32; rows.values.len()];
        let busy_batches = batches.iter().filter(|batch| !batch.tokens.is_empty());
        for (batch, partial) in busy_batches.zip(&partials) {
            add_partials(&mut output, hidden_size, batch, partial);
        }
        Ok(output)
    }

    fn unknown_layer(&self, layer: usize) -> RouterError {
        let mut served: Vec<&usize> = self.gates.keys().collect();
        served.sort();
        RouterError::InvalidArgument(format!(
            "layer {layer} is not served; this router serves MoE layers {served:?}"
        ))
    }
}

/// Packs the rows of the batch's tokens into one f32 tensor.
fn gather_rows(hidden: &[f32], hidden_size: usize, batch: &NodeBatch) -> moemesh_proto::Tensor {
    let mut values = Vec::with_capacity(batch.tokens.len() * hidden_size);
    for &token in &batch.tokens {
        let token = token as usize;
        values.extend_from_slice(&hidden[token * hidden_size..(token + 1) * hidden_size]);
    }
    encode(&values, &[batch.tokens.len(), hidden_size], WireDtype::F32)
}

#[tonic::async_trait]
impl moemesh_proto::RouterService for RouterNodeService {
    #[instrument(skip_all, fields(layer = request.get_ref().layer))]
    async fn forward(
        &self,
        request: Request<ForwardRequest>,
    ) -> Result<Response<ForwardResponse>, Status> {
        let ForwardRequest {
            model,
            layer,
            hidden,
        } = request.into_inner();
        if !model.is_empty() && model != self.model_id {
            return Err(RouterError::InvalidArgument(format!(
                "unknown model {model:?}; this router serves {:?}",
                self.model_id
            ))
            .into());
        }
        let layer = layer as usize;
        if !self.gates.contains_key(&layer) {
            return Err(self.unknown_layer(layer).into());
        }
        let rows =
            decode_rows(hidden.as_ref(), self.config.hidden_size).map_err(RouterError::from)?;
        let (tokens, dtype) = (rows.rows, rows.wire_dtype);
        let output = self.forward_rows(layer, rows).await?;
        Ok(Response::new(ForwardResponse {
            output: Some(encode(&output, &[tokens, self.config.hidden_size], dtype)),
        }))
    }
}
