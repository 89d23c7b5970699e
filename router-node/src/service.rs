//! `RouterService`: the gRPC face of a router. Admission control, decoding,
//! gating (or the caller's routing, checked by [`crate::routed`]), the
//! fan-out to the expert nodes ([`crate::fanout`]), encoding, and the
//! mapping of errors to status codes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moemesh_core::model::checkpoint::Checkpoint;
use moemesh_core::model::config::ModelConfig;
use moemesh_core::model::gating::{Gate, Routing};
use moemesh_proto::DEFAULT_DEADLINE;
use moemesh_proto::codec::{Rows, WireDtype, decode_rows, encode};
use moemesh_proto::v1::{ForwardRequest, ForwardResponse, ForwardRoutedRequest};
use tokio::sync::SemaphorePermit;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::fanout::{ExpertFanOut, LayerOutput};
use crate::load::LoadCounters;
use crate::metrics::RouterMetrics;
use crate::routed::caller_routing;
use crate::table::{RoutingSetup, RoutingTable};
use crate::{RouterConfig, RouterError, RouterResult};

/// Routing and splitting with at most this much work (a gate's
/// multiply-adds, or the row values a pre-routed split reads: about 50 µs)
/// run on the async worker that received the request.
const INLINE_ROUTING_WORK: usize = 1 << 20;

/// The gRPC face of a router.
pub struct RouterNodeService {
    model_id: String,
    config: ModelConfig,
    /// The gate of every layer this router serves.
    gates: HashMap<usize, Arc<Gate>>,
    /// Sends each forward's routed rows to the expert nodes and gathers
    /// their answers.
    fanout: ExpertFanOut,
    /// Tokens sent to each expert, reported to the coordinators.
    load: Arc<LoadCounters>,
    /// Admission control: one permit per forward in progress.
    admission: Arc<tokio::sync::Semaphore>,
    max_in_flight: usize,
    metrics: RouterMetrics,
}

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
        let RoutingSetup {
            layers,
            table_rx,
            health,
        } = RoutingSetup::start(
            router_config.placement,
            &router_config.model_id,
            &config,
            &router_config.tls,
            &load,
        )
        .await?;
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
        follow_epoch(router_config.metrics.clone(), table_rx.clone());
        let fanout = ExpertFanOut::new(
            router_config.model_id.clone(),
            router_config.group,
            table_rx,
            health,
        );
        Ok(Self {
            model_id: router_config.model_id,
            config,
            gates,
            fanout,
            load,
            admission: Arc::new(tokio::sync::Semaphore::new(max_in_flight)),
            max_in_flight,
            metrics: router_config.metrics,
        })
    }

    /// Computes layer `layer` for `rows`.
    pub async fn forward_rows(
        &self,
        layer: usize,
        rows: Rows,
        deadline: Instant,
    ) -> RouterResult<LayerOutput> {
        let gate = Arc::clone(
            self.gates
                .get(&layer)
                .ok_or_else(|| self.unknown_layer(layer))?,
        );
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
    /// caller's `routing` (see [`caller_routing`]): no gate, no shared
    /// expert.
    pub async fn forward_routed_rows(
        &self,
        layer: usize,
        rows: Rows,
        routing: Routing,
        deadline: Instant,
    ) -> RouterResult<LayerOutput> {
        if !self.gates.contains_key(&layer) {
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

    fn unknown_layer(&self, layer: usize) -> RouterError {
        let mut served: Vec<&usize> = self.gates.keys().collect();
        served.sort();
        RouterError::InvalidArgument(format!(
            "layer {layer} is not served; this router serves MoE layers {served:?}"
        ))
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
