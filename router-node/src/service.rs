//! `RouterService`: gate, dispatch to expert nodes in parallel, combine.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use moemesh_core::checkpoint::Checkpoint;
use moemesh_core::config::ModelConfig;
use moemesh_core::gating::Gate;
use moemesh_core::placement::Placement;
use moemesh_core::tensor::{Rows, WireDtype, decode_rows, encode};
use moemesh_proto::v1::{ComputeRequest, ForwardRequest, ForwardResponse};
use tokio::sync::watch;
use tonic::{Code, Request, Response, Status};
use tracing::instrument;

use crate::dispatch::{NodeBatch, ReplicaPicker, add_expert_rows, routing_pairs, split_pairs};
use crate::load::{LoadCounters, report_load_task, report_unreachable_task, router_id};
use crate::table::{NodeLink, RoutingTable, follow_coordinators_task};
use crate::{PlacementSource, RouterConfig, RouterError, RouterResult};

impl NodeLink {
    /// Sends this node its share of a batch and returns its partial rows.
    async fn compute(
        mut self,
        request: ComputeRequest,
        hidden_size: usize,
        rows: usize,
        timeout: Duration,
    ) -> RouterResult<(Vec<f32>, u64)> {
        let layer = request.layer;
        let experts: Vec<u32> = request.experts.iter().map(|rows| rows.expert).collect();
        let pairs: u64 = request
            .experts
            .iter()
            .map(|rows| rows.rows.len() as u64)
            .sum();
        let _in_flight = InFlight::count(&self.in_flight, pairs);
        let describe = |status: &Status| {
            format!(
                "expert node {} ({}) failed layer {layer} experts {experts:?}: {}",
                self.node.id,
                self.node.address,
                status.message()
            )
        };
        let mut request = Request::new(request);
        request.set_timeout(timeout.max(Duration::from_millis(1)));
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
        let response = response.into_inner();
        let partials = decode_rows(response.output.as_ref(), hidden_size).map_err(|error| {
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
        Ok((partials.values, response.compute_micros))
    }
}

/// Token-expert pairs counted as outstanding at a node while a call to it
/// runs, however the call ends.
struct InFlight<'a> {
    counter: &'a AtomicU64,
    pairs: u64,
}

impl<'a> InFlight<'a> {
    fn count(counter: &'a AtomicU64, pairs: u64) -> Self {
        counter.fetch_add(pairs, Ordering::Relaxed);
        Self { counter, pairs }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.counter.fetch_sub(self.pairs, Ordering::Relaxed);
    }
}

/// Gates with at most this many multiply-adds (about 50 µs of work) run
/// on the async worker that received the request.
const INLINE_GATING_MACS: usize = 1 << 20;

/// The gRPC face of a router.
pub struct RouterNodeService {
    model_id: String,
    /// This router's topology group: replicas there win ties. Empty: none.
    group: String,
    config: ModelConfig,
    /// The gate of every layer this router serves.
    gates: HashMap<usize, Arc<Gate>>,
    /// The current routing table; a placement file sets it once, the
    /// coordinators' placement stream replaces it at every epoch.
    table_rx: watch::Receiver<Arc<RoutingTable>>,
    /// Tokens sent to each expert, reported to the coordinators.
    load: Arc<LoadCounters>,
    /// Expert nodes this router failed to reach, for the coordinators.
    unreachable_tx: Option<tokio::sync::mpsc::Sender<(String, String)>>,
    /// Admission control: one permit per forward in progress.
    admission: Arc<tokio::sync::Semaphore>,
    max_in_flight: usize,
}

/// How long a router waits for the coordinators' first placement.
const FIRST_PLACEMENT_TIMEOUT: Duration = Duration::from_secs(60);

impl RouterNodeService {
    /// Loads the gates of the layers to serve and the first routing table:
    /// from the placement file, or from the coordinators (then following them).
    pub async fn load(router_config: RouterConfig) -> RouterResult<Self> {
        let model_dir = router_config.model_dir.clone();
        let checkpoint = tokio::task::spawn_blocking(move || Checkpoint::open(&model_dir))
            .await
            .map_err(|error| {
                RouterError::Internal(format!("checkpoint loading panicked: {error}"))
            })??;
        let config = checkpoint.config().clone();
        let max_in_flight = match router_config.max_in_flight {
            0 => DEFAULT_MAX_IN_FLIGHT,
            limit => limit,
        };
        let load = Arc::new(LoadCounters::new(
            &config.moe_layers(),
            config.experts_per_layer(),
        ));
        let mut unreachable_tx = None;
        let (layers, table_rx) = match router_config.placement {
            PlacementSource::File(file) => {
                let placement = Placement::from_file(&file, &config)?;
                let layers = placement.layers();
                let table = RoutingTable::new(0, placement, &[], None)?;
                let (_, table_rx) = watch::channel(Arc::new(table));
                (layers, table_rx)
            }
            PlacementSource::Coordinators(coordinators) => {
                if coordinators.is_empty() {
                    return Err(RouterError::InvalidArgument("no coordinator given".into()));
                }
                let empty = RoutingTable::new(
                    0,
                    Placement::from_parts(Vec::new(), HashMap::new()),
                    &[],
                    None,
                )?;
                let (table_tx, mut table_rx) = watch::channel(Arc::new(empty));
                let router = router_id();
                tokio::spawn(report_load_task(
                    coordinators.clone(),
                    router_config.model_id.clone(),
                    router.clone(),
                    Arc::downgrade(&load),
                ));
                let (tx, rx) = tokio::sync::mpsc::channel(64);
                unreachable_tx = Some(tx);
                tokio::spawn(report_unreachable_task(coordinators.clone(), router, rx));
                tokio::spawn(follow_coordinators_task(
                    coordinators,
                    router_config.model_id.clone(),
                    config.clone(),
                    table_tx,
                ));
                tokio::time::timeout(FIRST_PLACEMENT_TIMEOUT, table_rx.changed())
                    .await
                    .map_err(|_| {
                        RouterError::Unavailable(
                            "no placement from the coordinators within 60 s".into(),
                        )
                    })?
                    .map_err(|_| RouterError::Internal("placement follower stopped".into()))?;
                (config.moe_layers(), table_rx)
            }
        };
        let gates = tokio::task::spawn_blocking(move || {
            layers
                .into_iter()
                .map(|layer| {
                    Ok((
                        layer,
                        Arc::new(Gate::new(checkpoint.config(), checkpoint.load_gate(layer)?)),
                    ))
                })
                .collect::<RouterResult<HashMap<_, _>>>()
        })
        .await
        .map_err(|error| RouterError::Internal(format!("gate loading panicked: {error}")))??;
        tracing::info!(model = %router_config.model_id, layers = gates.len(), epoch = table_rx.borrow().epoch, "router ready");
        Ok(Self {
            model_id: router_config.model_id,
            group: router_config.group,
            config,
            gates,
            table_rx,
            load,
            unreachable_tx,
            admission: Arc::new(tokio::sync::Semaphore::new(max_in_flight)),
            max_in_flight,
        })
    }

    /// Computes layer `layer` for `rows`; returns the output and the
    /// slowest expert node's compute time in microseconds.
    pub async fn forward_rows(
        &self,
        layer: usize,
        rows: Rows,
        deadline: Instant,
    ) -> RouterResult<(Vec<f32>, u64)> {
        let hidden_size = self.config.hidden_size;
        if rows.rows == 0 {
            return Ok((Vec::new(), 0));
        }
        let gate = Arc::clone(
            self.gates
                .get(&layer)
                .ok_or_else(|| self.unknown_layer(layer))?,
        );
        // This request keeps this table to its end, whatever epochs come meanwhile.
        let table = self.table_rx.borrow().clone();
        let routing_table = Arc::clone(&table);
        let gate_macs = rows.values.len() * self.config.num_experts;
        let mut picker = ReplicaPicker::new(
            table
                .links
                .iter()
                .map(|link| link.in_flight.load(Ordering::Relaxed))
                .collect(),
            table
                .links
                .iter()
                .map(|link| !self.group.is_empty() && link.group == self.group)
                .collect(),
        );
        let load = Arc::clone(&self.load);
        // Nodes that failed recently are left out while another replica
        // can take their work.
        let now = health_clock();
        let unhealthy: Vec<bool> = table
            .links
            .iter()
            .map(|link| link.unhealthy_until.load(Ordering::Relaxed) > now)
            .collect();
        let gate_and_split = move || {
            let routing = gate.route(&rows.values, rows.rows);
            load.count(layer, &routing);
            let batches = match routing_table.placement.replicas(layer) {
                Some(replicas) => {
                    let shared = routing
                        .shared_weights
                        .as_ref()
                        .map(|_| (replicas.len() - 1) as u32);
                    let pairs = routing_pairs(&routing, shared);
                    let split = |picker: &mut ReplicaPicker, excluded: &[bool]| {
                        split_pairs(
                            &pairs,
                            &rows.values,
                            hidden_size,
                            replicas,
                            shared,
                            picker,
                            excluded,
                        )
                    };
                    let mut trial = picker.clone();
                    match split(&mut trial, &unhealthy) {
                        Ok(batches) => {
                            picker = trial;
                            Ok((batches, shared))
                        }
                        Err(_) => split(&mut picker, &vec![false; unhealthy.len()])
                            .map(|batches| (batches, shared)),
                    }
                }
                None => Err(routing.experts.clone()),
            };
            (rows, batches, picker)
        };
        // Gating is CPU work: large batches leave the async workers for it;
        // a decode step's few tokens take less than the handoff would.
        let (rows, batches, mut picker) = if gate_macs <= INLINE_GATING_MACS {
            gate_and_split()
        } else {
            tokio::task::spawn_blocking(gate_and_split)
                .await
                .map_err(|error| RouterError::Internal(format!("gating panicked: {error}")))?
        };
        let (batches, shared) = batches.map_err(|mut experts| {
            experts.sort_unstable();
            experts.dedup();
            RouterError::Unavailable(format!(
                "no live replica of layer {layer} experts {experts:?} (placement epoch {})",
                table.epoch
            ))
        })?;

        let node_sends: usize = batches.iter().map(|batch| batch.tokens.len()).sum();
        self.load.count_dispatch(
            rows.rows,
            node_sends,
            node_sends * hidden_size * size_of::<f32>(),
        );
        let replicas = table
            .placement
            .replicas(layer)
            .ok_or_else(|| self.unknown_layer(layer))?;
        // A node that fails or refuses has its share sent to other replicas
        // of the same experts, until the deadline: expert compute has no
        // side effects, so a retry is always safe.
        let mut failed = vec![false; table.links.len()];
        let mut pending: Vec<(usize, NodeBatch)> = busy_batches(batches);
        let mut answered: Vec<(NodeBatch, Vec<f32>)> = Vec::new();
        let mut slowest_compute = 0;
        for attempt in 0.. {
            let calls = pending.iter().map(|(node, batch)| {
                let request = ComputeRequest {
                    model: self.model_id.clone(),
                    layer: layer as u32,
                    rows: Some(gather_rows(&rows.values, hidden_size, batch)),
                    experts: batch.expert_rows(),
                };
                let remaining = deadline.saturating_duration_since(Instant::now());
                table.links[*node]
                    .clone()
                    .compute(request, hidden_size, batch.pairs(), remaining)
            });
            let results = futures::future::join_all(calls).await;
            let mut retry = Vec::new();
            let mut last_error = None;
            for ((node, batch), result) in std::mem::take(&mut pending).into_iter().zip(results) {
                match result {
                    Ok((reply, micros)) => {
                        slowest_compute = slowest_compute.max(micros);
                        answered.push((batch, reply));
                    }
                    Err(error @ (RouterError::Unavailable(_) | RouterError::Overloaded(_))) => {
                        failed[node] = true;
                        let link = &table.links[node];
                        if matches!(error, RouterError::Unavailable(_)) {
                            let now = health_clock();
                            let was_healthy = link
                                .unhealthy_until
                                .swap(now + UNHEALTHY_FOR_MS, Ordering::Relaxed)
                                <= now;
                            if was_healthy && let Some(tx) = &self.unreachable_tx {
                                let _ = tx.try_send((link.node.id.clone(), error.to_string()));
                            }
                            tracing::warn!(node = %link.node.id, %error, "expert node failed; retrying its share elsewhere");
                        }
                        retry.extend(batch.to_pairs());
                        last_error = Some(error);
                    }
                    Err(error) => return Err(error),
                }
            }
            let Some(last_error) = last_error else {
                break;
            };
            if attempt >= MAX_RETRIES || Instant::now() >= deadline {
                return Err(last_error);
            }
            retry.sort_by_key(|pair| (pair.token, pair.expert));
            let batches = split_pairs(
                &retry,
                &rows.values,
                hidden_size,
                replicas,
                shared,
                &mut picker,
                &failed,
            )
            .map_err(|experts| {
                let reason = match &last_error {
                    RouterError::Overloaded(_) => "every replica is overloaded",
                    _ => "no live replica left",
                };
                let error = format!(
                    "layer {layer} experts {experts:?}: {reason} (placement epoch {}); last failure: {last_error}",
                    table.epoch
                );
                match last_error {
                    RouterError::Overloaded(_) => RouterError::Overloaded(error),
                    _ => RouterError::Unavailable(error),
                }
            })?;
            pending = busy_batches(batches);
        }

        let mut output = vec![0f32; rows.values.len()];
        let batches: Vec<&NodeBatch> = answered.iter().map(|(batch, _)| batch).collect();
        let replies: Vec<&[f32]> = answered.iter().map(|(_, reply)| reply.as_slice()).collect();
        add_expert_rows(&mut output, hidden_size, &batches, &replies);
        Ok((output, slowest_compute))
    }

    fn unknown_layer(&self, layer: usize) -> RouterError {
        let mut served: Vec<&usize> = self.gates.keys().collect();
        served.sort();
        RouterError::InvalidArgument(format!(
            "layer {layer} is not served; this router serves MoE layers {served:?}"
        ))
    }
}

/// The batches that have work, with their node index.
fn busy_batches(batches: Vec<NodeBatch>) -> Vec<(usize, NodeBatch)> {
    batches
        .into_iter()
        .enumerate()
        .filter(|(_, batch)| !batch.tokens.is_empty())
        .collect()
}

/// Forwards a router runs at once unless configured otherwise.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 256;

/// Retries of a node's share after the first try, at most.
const MAX_RETRIES: usize = 3;
/// How long a node that failed is avoided while other replicas can serve.
const UNHEALTHY_FOR_MS: u64 = 2_000;
/// The time a request may take when the client sets no deadline.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(30);

/// Milliseconds on a clock shared by the router's node health marks.
pub fn health_clock() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// The client's deadline from a `grpc-timeout` header (`30S`, `500m`, ...).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
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
        // Refuse at once rather than queue without bound: memory stays
        // bounded under any load, and the client backs off.
        let _admitted = self.admission.try_acquire().map_err(|_| {
            Status::resource_exhausted(format!(
                "router busy: {} forwards in progress; retry shortly",
                self.max_in_flight
            ))
        })?;
        let deadline = Instant::now()
            + request
                .metadata()
                .get("grpc-timeout")
                .and_then(|value| value.to_str().ok())
                .and_then(parse_grpc_timeout)
                .unwrap_or(DEFAULT_DEADLINE);
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
        let (output, expert_compute_micros) = self.forward_rows(layer, rows, deadline).await?;
        Ok(Response::new(ForwardResponse {
            output: Some(encode(&output, &[tokens, self.config.hidden_size], dtype)),
            expert_compute_micros,
        }))
    }
}
