//! `RouterService`: the gRPC face of a router. Admission control, decoding,
//! encoding and the mapping of errors to status codes around a
//! [`LayerForwarder`], which gates (or takes the caller's routing, checked
//! by [`crate::routed`]) and runs the fan-out to the expert nodes
//! ([`crate::fanout`]). A one-hop client ([`crate::direct`]) holds a
//! `LayerForwarder` too, so both forward with the same code.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moemesh_core::model::checkpoint::Checkpoint;
use moemesh_core::model::config::ModelConfig;
use moemesh_core::model::gating::{Gate, Routing};
use moemesh_proto::DEFAULT_DEADLINE;
use moemesh_proto::codec::{Rows, WireDtype, decode_rows, encode};
use moemesh_proto::tls::TlsConfig;
use moemesh_proto::v1::{ForwardRequest, ForwardResponse, ForwardRoutedRequest};
use tokio::sync::{SemaphorePermit, oneshot, watch};
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::fanout::{ExpertFanOut, LayerOutput};
use crate::load::{LoadCounters, router_id};
use crate::metrics::RouterMetrics;
use crate::routed::caller_routing;
use crate::table::{RoutingSetup, RoutingTable};
use crate::{PlacementSource, RouterConfig, RouterError, RouterResult};

/// Routing and splitting with at most this much work (a gate's
/// multiply-adds, or the row values a pre-routed split reads: about 50 µs)
/// run on the async worker that received the request.
const INLINE_ROUTING_WORK: usize = 1 << 20;

/// What a [`LayerForwarder`] knows of the model it forwards for.
#[derive(Debug, Clone)]
pub enum ModelSource {
    /// A Hugging Face model directory: its `config.json`, and the gates of
    /// the MoE layers served (no expert weights are read), so that both
    /// gated and pre-routed forwards are served.
    Checkpoint(PathBuf),
    /// The model's config alone (`ModelConfig::from_dir` or `from_json` of
    /// its `config.json`): no gates, so pre-routed forwards only.
    Config(ModelConfig),
}

/// How a [`LayerForwarder`] starts.
pub struct ForwarderConfig {
    /// The model id every expert node call names.
    pub model_id: String,
    pub model: ModelSource,
    /// Expert nodes and which experts each holds.
    pub placement: PlacementSource,
    /// The name the coordinators hear load and unreachable nodes from:
    /// `router-…` for a router, `client-…` for a one-hop client.
    pub reporter: String,
    /// The forwarder's topology group: among equally busy replicas it
    /// prefers nodes of its own group. Empty: no preference.
    pub group: String,
    /// How connections to the coordinators and expert nodes are secured.
    pub tls: TlsConfig,
    /// Where routed tokens, bytes sent and the placement epoch are counted.
    pub metrics: RouterMetrics,
}

/// Forwards one layer's rows to the expert nodes and sums their answers:
/// the routing (a gate's or the caller's), the load counts the
/// coordinators hear, and the fan-out with its choice of replicas, retries
/// and combination in expert order. A router's service and a one-hop
/// client each hold one.
pub struct LayerForwarder {
    config: ModelConfig,
    /// The MoE layers served, ascending.
    layers: Vec<usize>,
    /// The gate of every layer served; empty when the model came as a
    /// config alone.
    gates: HashMap<usize, Arc<Gate>>,
    /// Sends each forward's routed rows to the expert nodes and gathers
    /// their answers.
    fanout: ExpertFanOut,
    /// The routing table the fan-out routes by, for its epoch.
    table_rx: watch::Receiver<Arc<RoutingTable>>,
    /// Tokens sent to each expert, reported to the coordinators.
    load: Arc<LoadCounters>,
    metrics: RouterMetrics,
    /// Dropped with the forwarder, which ends the task that keeps the
    /// placement epoch gauge current.
    _epoch_gauge: oneshot::Sender<()>,
}

impl LayerForwarder {
    /// Reads the model's config (and gates, from a checkpoint), takes the
    /// first routing table from the placement file or the coordinators
    /// (then following them) and starts reporting to the coordinators.
    pub async fn start(forwarder: ForwarderConfig) -> RouterResult<Self> {
        let (config, checkpoint) = match forwarder.model {
            ModelSource::Checkpoint(dir) => {
                let checkpoint = off_the_workers("checkpoint loading", move || {
                    Checkpoint::open(&dir).map_err(RouterError::from)
                })
                .await?;
                (checkpoint.config().clone(), Some(checkpoint))
            }
            ModelSource::Config(config) => (config, None),
        };
        let load = Arc::new(LoadCounters::new(
            &config.moe_layers(),
            config.experts_per_layer(),
        ));
        let RoutingSetup {
            mut layers,
            table_rx,
            health,
        } = RoutingSetup::start(
            forwarder.placement,
            &forwarder.model_id,
            &forwarder.reporter,
            &config,
            &forwarder.tls,
            &load,
        )
        .await?;
        layers.sort_unstable();
        let gates = match checkpoint {
            Some(checkpoint) => load_gates(checkpoint, layers.clone()).await?,
            None => HashMap::new(),
        };
        let (epoch_gauge, forwarder_gone) = oneshot::channel();
        follow_epoch(forwarder.metrics.clone(), table_rx.clone(), forwarder_gone);
        let fanout = ExpertFanOut::new(
            forwarder.model_id,
            forwarder.group,
            table_rx.clone(),
            health,
        );
        Ok(Self {
            config,
            layers,
            gates,
            fanout,
            table_rx,
            load,
            metrics: forwarder.metrics,
            _epoch_gauge: epoch_gauge,
        })
    }

    /// The model's config.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The MoE layers served, ascending.
    pub fn layers(&self) -> &[usize] {
        &self.layers
    }

    /// Whether `layer` is an MoE layer served here.
    pub fn serves(&self, layer: usize) -> bool {
        self.layers.binary_search(&layer).is_ok()
    }

    /// The epoch of the placement forwards route by now (0 for a file).
    pub fn placement_epoch(&self) -> u64 {
        self.table_rx.borrow().epoch
    }

    /// Computes layer `layer` for `rows`, routed by the layer's gate: the
    /// routed experts and the shared expert, if the model has one.
    pub async fn forward_rows(
        &self,
        layer: usize,
        rows: Rows,
        deadline: Instant,
    ) -> RouterResult<LayerOutput> {
        let gate = Arc::clone(self.gates.get(&layer).ok_or_else(|| self.no_gate(layer))?);
        let gate_macs = rows.values.len() * self.config.num_experts;
        let route = move |hidden: &[f32], tokens: usize| {
            let routing = gate.route(hidden, tokens);
            check_routing_finite(&routing)?;
            Ok(routing)
        };
        self.route_and_fan_out(layer, rows, deadline, gate_macs, route)
            .await
    }

    /// Computes the routed experts of layer `layer` for `rows` by the
    /// caller's routing: `top_k` experts per token, `expert_ids` and
    /// `weights` row-major `[tokens * top_k]`, checked as
    /// [`caller_routing`] does. No gate, no shared expert.
    pub async fn forward_routed(
        &self,
        layer: usize,
        rows: Rows,
        top_k: usize,
        expert_ids: Vec<u32>,
        weights: Vec<f32>,
        deadline: Instant,
    ) -> RouterResult<LayerOutput> {
        let routing = caller_routing(
            rows.rows,
            top_k,
            expert_ids,
            weights,
            self.config.num_experts,
            self.config.top_k,
        )?;
        self.forward_routed_rows(layer, rows, routing, deadline)
            .await
    }

    /// Computes the routed experts of layer `layer` for `rows` by a
    /// `routing` already checked by [`caller_routing`].
    pub async fn forward_routed_rows(
        &self,
        layer: usize,
        rows: Rows,
        routing: Routing,
        deadline: Instant,
    ) -> RouterResult<LayerOutput> {
        if !self.serves(layer) {
            return Err(self.unknown_layer(layer));
        }
        if routing.tokens() != rows.rows || routing.weights.len() != routing.experts.len() {
            return Err(RouterError::InvalidArgument(format!(
                "a routing of {} tokens for {} rows",
                routing.tokens(),
                rows.rows
            )));
        }
        // Splitting reads each pair's row to choose among replicas.
        let split_work = routing.experts.len() * self.config.hidden_size;
        self.route_and_fan_out(layer, rows, deadline, split_work, move |_, _| Ok(routing))
            .await
    }

    /// Routes `rows` with `route`, counts the routing, splits it per expert
    /// node and runs the fan-out. `cpu_work` (in multiply-adds or row
    /// values) decides whether routing and splitting leave the async worker.
    async fn route_and_fan_out<F>(
        &self,
        layer: usize,
        rows: Rows,
        deadline: Instant,
        cpu_work: usize,
        route: F,
    ) -> RouterResult<LayerOutput>
    where
        F: FnOnce(&[f32], usize) -> RouterResult<Routing> + Send + 'static,
    {
        let hidden_size = self.config.hidden_size;
        if rows.rows == 0 {
            return Ok(LayerOutput::default());
        }
        let mut fanout = self.fanout.start(layer, hidden_size);
        let load = Arc::clone(&self.load);
        let metrics = self.metrics.clone();
        let route_and_split = move || {
            let routing = match route(&rows.values, rows.rows) {
                Ok(routing) => routing,
                Err(error) => return (rows, Err(error), fanout),
            };
            load.count(layer, &routing);
            metrics.count_routed(layer, routing.tokens(), routing.experts.len());
            let batches = fanout.split(&routing, &rows.values);
            (rows, batches, fanout)
        };
        // Gating and splitting are CPU work: large batches leave the async
        // workers for it; a decode step's few tokens take less than the
        // handoff would.
        let (rows, batches, fanout) = if cpu_work <= INLINE_ROUTING_WORK {
            route_and_split()
        } else {
            tokio::task::spawn_blocking(route_and_split)
                .await
                .map_err(|error| RouterError::Internal(format!("routing panicked: {error}")))?
        };
        let batches = batches?;
        let node_sends: usize = batches.iter().map(|batch| batch.tokens.len()).sum();
        let bytes_sent = node_sends * hidden_size * size_of::<f32>();
        self.load.count_dispatch(rows.rows, node_sends, bytes_sent);
        self.metrics.count_bytes_sent(bytes_sent);
        let output = fanout
            .run(&self.fanout, &rows.values, batches, deadline)
            .await?;
        // Finite partial sums from the nodes can still add up to infinity.
        moemesh_proto::codec::check_no_overflow(&output.rows, hidden_size)?;
        Ok(output)
    }

    /// The refusal of a forward of `layer`, which is not served here.
    pub fn unknown_layer(&self, layer: usize) -> RouterError {
        RouterError::InvalidArgument(format!(
            "layer {layer} is not served; the MoE layers served are {:?}",
            self.layers
        ))
    }

    /// The refusal of a gated forward of `layer`, which has no gate here.
    fn no_gate(&self, layer: usize) -> RouterError {
        if !self.serves(layer) {
            return self.unknown_layer(layer);
        }
        RouterError::InvalidArgument(format!(
            "layer {layer} has no gate here: the model came as a config without its \
             checkpoint, so only pre-routed forwards are served"
        ))
    }
}

/// Runs `work` on the blocking pool; `what` names it if it panics.
async fn off_the_workers<T: Send + 'static>(
    what: &str,
    work: impl FnOnce() -> RouterResult<T> + Send + 'static,
) -> RouterResult<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| RouterError::Internal(format!("{what} panicked: {error}")))?
}

/// The gates of `layers` from `checkpoint`.
async fn load_gates(
    checkpoint: Checkpoint,
    layers: Vec<usize>,
) -> RouterResult<HashMap<usize, Arc<Gate>>> {
    off_the_workers("gate loading", move || {
        layers
            .into_iter()
            .map(|layer| {
                let weights = checkpoint.load_gate(layer)?;
                Ok((layer, Arc::new(Gate::new(checkpoint.config(), weights))))
            })
            .collect()
    })
    .await
}

/// The gRPC face of a router.
pub struct RouterNodeService {
    model_id: String,
    /// Routes each forward and runs its fan-out.
    forwarder: LayerForwarder,
    /// Admission control: one permit per forward in progress.
    admission: Arc<tokio::sync::Semaphore>,
    max_in_flight: usize,
    metrics: RouterMetrics,
}

impl RouterNodeService {
    /// Loads the gates of the layers to serve and the first routing table:
    /// from the placement file, or from the coordinators (then following them).
    pub async fn load(router_config: RouterConfig) -> RouterResult<Self> {
        let max_in_flight = match router_config.max_in_flight {
            0 => DEFAULT_MAX_IN_FLIGHT,
            limit => limit,
        };
        let forwarder = LayerForwarder::start(ForwarderConfig {
            model_id: router_config.model_id.clone(),
            model: ModelSource::Checkpoint(router_config.model_dir),
            placement: router_config.placement,
            reporter: router_id(),
            group: router_config.group,
            tls: router_config.tls,
            metrics: router_config.metrics.clone(),
        })
        .await?;
        tracing::info!(model = %router_config.model_id, layers = forwarder.layers().len(), epoch = forwarder.placement_epoch(), "router ready");
        Ok(Self {
            model_id: router_config.model_id,
            forwarder,
            admission: Arc::new(tokio::sync::Semaphore::new(max_in_flight)),
            max_in_flight,
            metrics: router_config.metrics,
        })
    }
}

/// Forwards a router runs at once unless configured otherwise.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 256;

/// The longest deadline a forward gets; a longer `grpc-timeout` is
/// clamped to it. No forward needs more, and deadlines stay far inside
/// what `Instant` can represent.
pub const MAX_FORWARD_DEADLINE: Duration = Duration::from_secs(24 * 3600);

/// The client's deadline from a `grpc-timeout` header (`30S`, `500m`, ...),
/// at most [`MAX_FORWARD_DEADLINE`]; None when the header is malformed.
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    // Only ASCII splits safely before its last byte; a valid header is.
    if !value.is_ascii() {
        return None;
    }
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    // The gRPC spec allows 8 digits; more only saturate.
    let amount: u64 = digits.parse().unwrap_or(u64::MAX);
    let timeout = match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    };
    Some(timeout.min(MAX_FORWARD_DEADLINE))
}

/// Refuses inputs so large that the gate's routing weights overflow f32:
/// the experts' outputs would be meaningless.
fn check_routing_finite(routing: &Routing) -> RouterResult<()> {
    let shared = routing.shared_weights.iter().flatten();
    if routing
        .weights
        .iter()
        .chain(shared)
        .all(|weight| weight.is_finite())
    {
        return Ok(());
    }
    Err(RouterError::InvalidArgument(
        "inputs out of range: the gate's routing weights overflow f32".into(),
    ))
}

/// When a forward received at `now` with `metadata` must be done: the
/// client's `grpc-timeout`, or [`DEFAULT_DEADLINE`] without one.
fn forward_deadline(now: Instant, metadata: &MetadataMap) -> Instant {
    let timeout = metadata
        .get("grpc-timeout")
        .and_then(|value| value.to_str().ok())
        .and_then(parse_grpc_timeout)
        .unwrap_or(DEFAULT_DEADLINE);
    now + timeout
}

#[tonic::async_trait]
impl moemesh_proto::RouterService for RouterNodeService {
    #[instrument(skip_all, fields(layer = request.get_ref().layer))]
    async fn forward(
        &self,
        request: Request<ForwardRequest>,
    ) -> Result<Response<ForwardResponse>, Status> {
        let started = Instant::now();
        let _in_flight = self.metrics.start_forward();
        let answer = self.answer_forward(request).await;
        self.count_answer(started, &answer);
        answer
    }

    #[instrument(skip_all, fields(layer = request.get_ref().layer))]
    async fn forward_routed(
        &self,
        request: Request<ForwardRoutedRequest>,
    ) -> Result<Response<ForwardResponse>, Status> {
        let started = Instant::now();
        let _in_flight = self.metrics.start_forward();
        let answer = self.answer_forward_routed(request).await;
        self.count_answer(started, &answer);
        answer
    }
}

impl RouterNodeService {
    /// One forward, from admission to the encoded answer.
    async fn answer_forward(
        &self,
        request: Request<ForwardRequest>,
    ) -> Result<Response<ForwardResponse>, Status> {
        let _admitted = self.admit()?;
        let deadline = forward_deadline(Instant::now(), request.metadata());
        let ForwardRequest {
            model,
            layer,
            hidden,
        } = request.into_inner();
        let layer = self.check_target(&model, layer)?;
        let rows =
            decode_rows(hidden.as_ref(), self.config.hidden_size).map_err(RouterError::from)?;
        let (tokens, dtype) = (rows.rows, rows.wire_dtype);
        let output = self.forward_rows(layer, rows, deadline).await?;
        Ok(self.respond(output, tokens, dtype))
    }

    /// One pre-routed forward, from admission to the encoded answer.
    async fn answer_forward_routed(
        &self,
        request: Request<ForwardRoutedRequest>,
    ) -> Result<Response<ForwardResponse>, Status> {
        let _admitted = self.admit()?;
        let deadline = forward_deadline(Instant::now(), request.metadata());
        let ForwardRoutedRequest {
            model,
            layer,
            hidden,
            top_k,
            expert_ids,
            weights,
        } = request.into_inner();
        let layer = self.check_target(&model, layer)?;
        let rows =
            decode_rows(hidden.as_ref(), self.config.hidden_size).map_err(RouterError::from)?;
        let routing = caller_routing(
            rows.rows,
            top_k,
            expert_ids,
            weights,
            self.config.num_experts,
            self.config.top_k,
        )?;
        let (tokens, dtype) = (rows.rows, rows.wire_dtype);
        let output = self
            .forward_routed_rows(layer, rows, routing, deadline)
            .await?;
        Ok(self.respond(output, tokens, dtype))
    }

    /// Admits one more forward, or refuses at once rather than queue
    /// without bound: memory stays bounded under any load, and the client
    /// backs off.
    fn admit(&self) -> RouterResult<SemaphorePermit<'_>> {
        self.admission.try_acquire().map_err(|_| {
            RouterError::Overloaded(format!(
                "router busy: {} forwards in progress; retry shortly",
                self.max_in_flight
            ))
        })
    }

    /// The layer a request names, if this router serves its model and layer.
    fn check_target(&self, model: &str, layer: u32) -> RouterResult<usize> {
        if !model.is_empty() && model != self.model_id {
            return Err(RouterError::InvalidArgument(format!(
                "unknown model {model:?}; this router serves {:?}",
                self.model_id
            )));
        }
        let layer = layer as usize;
        if !self.gates.contains_key(&layer) {
            return Err(self.unknown_layer(layer));
        }
        Ok(layer)
    }

    /// The answer to a forward of `tokens` rows sent in `dtype`.
    fn respond(
        &self,
        output: LayerOutput,
        tokens: usize,
        dtype: WireDtype,
    ) -> Response<ForwardResponse> {
        Response::new(ForwardResponse {
            output: Some(encode(
                &output.rows,
                &[tokens, self.config.hidden_size],
                dtype,
            )),
            expert_compute_micros: output.slowest_compute_micros,
        })
    }

    /// Counts a finished forward of either kind by its status code.
    fn count_answer<T>(&self, started: Instant, answer: &Result<T, Status>) {
        let code = answer.as_ref().err().map_or(tonic::Code::Ok, Status::code);
        self.metrics.finish_forward(code, started.elapsed());
    }
}

/// Keeps the placement epoch gauge on the routing table's epoch.
fn follow_epoch(
    metrics: RouterMetrics,
    mut table_rx: tokio::sync::watch::Receiver<Arc<RoutingTable>>,
) {
    tokio::spawn(async move {
        loop {
            let epoch = table_rx.borrow_and_update().epoch;
            metrics.set_placement_epoch(epoch);
            if table_rx.changed().await.is_err() {
                return;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_in_every_unit_parse() {
        let cases = [
            ("2H", Duration::from_secs(7200)),
            ("3M", Duration::from_secs(180)),
            ("30S", Duration::from_secs(30)),
            ("500m", Duration::from_millis(500)),
            ("250u", Duration::from_micros(250)),
            ("99999999n", Duration::from_nanos(99_999_999)),
        ];
        for (header, timeout) in cases {
            assert_eq!(parse_grpc_timeout(header), Some(timeout), "{header}");
        }
        for malformed in ["", "S", "5", "5x", "-5S", "+5S", " 5S", "5.0S", "5é"] {
            assert_eq!(parse_grpc_timeout(malformed), None, "{malformed:?}");
        }
    }

    #[test]
    fn the_largest_grpc_timeouts_of_every_unit_are_clamped_not_a_panic() {
        let now = Instant::now();
        for unit in ["H", "M", "S", "m", "u", "n"] {
            for amount in ["99999999".to_string(), u64::MAX.to_string(), "9".repeat(40)] {
                let header = format!("{amount}{unit}");
                let timeout = parse_grpc_timeout(&header).expect("digits and a unit parse");
                assert!(timeout <= MAX_FORWARD_DEADLINE, "{header}: {timeout:?}");
                let mut metadata = MetadataMap::new();
                metadata.insert("grpc-timeout", header.parse().unwrap());
                let deadline = forward_deadline(now, &metadata);
                assert!(deadline > now && deadline <= now + MAX_FORWARD_DEADLINE);
            }
        }
        assert_eq!(
            parse_grpc_timeout(&format!("{}H", u64::MAX)),
            Some(MAX_FORWARD_DEADLINE)
        );
        assert_eq!(
            forward_deadline(now, &MetadataMap::new()),
            now + DEFAULT_DEADLINE
        );
    }
}
