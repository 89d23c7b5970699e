//! `RouterService`: the gRPC face of a router. Admission control, decoding,
//! encoding and the mapping of errors to status codes around a
//! [`LayerForwarder`], which gates (or takes the caller's routing) and runs
//! the fan-out to the expert nodes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moemesh_proto::DEFAULT_DEADLINE;
use moemesh_proto::codec::{Rows, WireDtype, decode_rows, encode};
use moemesh_proto::v1::{
    DescribeRequest, DescribeResponse, ForwardRequest, ForwardResponse, ForwardRoutedRequest,
    Tensor,
};
use tokio::sync::SemaphorePermit;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::describe::describe;
use crate::fanout::LayerOutput;
use crate::forwarder::{ForwarderConfig, LayerForwarder, ModelSource};
use crate::load::router_id;
use crate::metrics::RouterMetrics;
use crate::{RouterConfig, RouterError, RouterResult};

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
            model: ModelSource::Checkpoint(router_config.model_dir.clone()),
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

    async fn describe(
        &self,
        request: Request<DescribeRequest>,
    ) -> Result<Response<DescribeResponse>, Status> {
        let description = describe(
            &request.into_inner().model,
            &self.model_id,
            self.forwarder.config(),
            self.forwarder.gate_fingerprints(),
        )?;
        Ok(Response::new(description))
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
        let rows = self.decode(hidden.as_ref())?;
        let (tokens, dtype) = (rows.rows, rows.wire_dtype);
        let output = self.forwarder.forward_rows(layer, rows, deadline).await?;
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
        let rows = self.decode(hidden.as_ref())?;
        let (tokens, dtype) = (rows.rows, rows.wire_dtype);
        let output = self
            .forwarder
            .forward_routed(layer, rows, top_k as usize, expert_ids, weights, deadline)
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
        if !self.forwarder.serves(layer) {
            return Err(self.forwarder.unknown_layer(layer));
        }
        Ok(layer)
    }

    /// A request's `[tokens, hidden_size]` rows, checked and decoded.
    fn decode(&self, hidden: Option<&Tensor>) -> RouterResult<Rows> {
        Ok(decode_rows(hidden, self.forwarder.config().hidden_size)?)
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
                &[tokens, self.forwarder.config().hidden_size],
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
