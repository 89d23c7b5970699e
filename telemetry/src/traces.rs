//! Logs and traces. Every process logs to stderr (filtered by `RUST_LOG`,
//! `info` by default; in colour only on a terminal). When
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`)
//! is set, its spans also go to that OTLP/gRPC collector, in batches; when
//! neither is set, nothing is exported and nothing is spent building spans
//! for export.
//!
//! Spans cross process boundaries as W3C trace context (`traceparent`,
//! `tracestate`) in gRPC metadata: [`inject`] stamps the current span's
//! context on an outgoing call, and [`TraceContextLayer`] makes each
//! incoming call's span a child of the caller's.

use std::io::IsTerminal;
use std::task::{Context, Poll};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Instrument;
use tracing::instrument::Instrumented;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The variables that turn export on, as the OpenTelemetry SDKs name them.
const ENDPOINT_VARIABLES: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

/// Why tracing could not start.
#[derive(Debug, thiserror::Error)]
pub enum TracingError {
    #[error("cannot build the OTLP span exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("cannot install the tracing subscriber: {0}")]
    Subscriber(#[from] tracing_subscriber::util::TryInitError),
}

/// Keeps the span exporter alive; dropping it flushes the spans not yet
/// sent, so drop it before the tokio runtime that carries them.
#[must_use = "dropping the guard stops exporting spans"]
pub struct TracingGuard {
    provider: Option<SdkTracerProvider>,
}

impl TracingGuard {
    /// Whether spans leave the process.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for TracingGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(error) = provider.shutdown()
        {
            eprintln!("warning: spans may be lost: {error}");
        }
    }
}

/// Whether the environment asks for spans to be exported.
pub fn export_requested() -> bool {
    ENDPOINT_VARIABLES
        .iter()
        .any(|name| std::env::var_os(name).is_some_and(|value| !value.is_empty()))
}

/// Installs logging and, when the environment asks for it, OTLP export
/// under `service_name` (unless `OTEL_SERVICE_NAME` names the service).
/// Exporting needs a tokio runtime: call it inside one (`Runtime::enter`).
pub fn init(service_name: &str) -> Result<TracingGuard, TracingError> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let log_filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(log_colors(
            std::io::stderr().is_terminal(),
            std::env::var_os("NO_COLOR"),
        ))
        .with_filter(log_filter);
    let provider = export_requested()
        .then(|| tracer_provider(service_name))
        .transpose()?;
    // Spans are exported at info and above whatever RUST_LOG keeps in the
    // logs: quiet logs must not cut the traces.
    let spans = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("moemesh"))
            .with_filter(tracing_subscriber::filter::LevelFilter::INFO)
    });
    tracing_subscriber::registry()
        .with(logs)
        .with(spans)
        .try_init()?;
    Ok(TracingGuard { provider })
}

/// Whether log lines carry colours: only on a terminal, so that logs a
/// file, a pipe or Kubernetes collects stay plain text, and not when
/// `NO_COLOR` is set and not empty (no-color.org).
fn log_colors(stderr_is_terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|value| value.is_empty())
}

fn tracer_provider(service_name: &str) -> Result<SdkTracerProvider, TracingError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service_name.to_string());
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}

/// Stamps the current span's trace context on an outgoing call's metadata.
/// Does nothing when the span is not being exported.
pub fn inject(metadata: &mut tonic::metadata::MetadataMap) {
    let context = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&context, &mut MetadataInjector(metadata));
}

/// The trace context an incoming call carries, if any.
pub fn extract(headers: &http::HeaderMap) -> opentelemetry::Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            value.parse(),
        ) {
            self.0.insert(key, value);
        }
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|key| key.as_str()).collect()
    }
}

/// A tower layer for tonic servers: each call runs in a `grpc.server`
/// span named after its method, child of the caller's span when the call
/// carries trace context. Health checks and reflection get no span: a
/// kubelet probing every few seconds would bury the traces that matter.
#[derive(Clone, Copy, Debug, Default)]
pub struct TraceContextLayer;

impl<S> tower::Layer<S> for TraceContextLayer {
    type Service = TraceContextService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TraceContextService { inner }
    }
}

/// The service [`TraceContextLayer`] wraps around each server.
#[derive(Clone, Debug)]
pub struct TraceContextService<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for TraceContextService<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Instrumented<S::Future>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = request.uri().path();
        let span = if is_infrastructure(method) {
            tracing::Span::none()
        } else {
            let span = tracing::info_span!(
                "grpc.server",
                otel.name = method,
                otel.kind = "server",
                rpc.system = "grpc",
            );
            // An error means the span is disabled (not exported): no parent to keep.
            let _ = span.set_parent(extract(request.headers()));
            span
        };
        self.inner.call(request).instrument(span)
    }
}

/// Health checks and reflection: calls that say nothing about a request.
fn is_infrastructure(method: &str) -> bool {
    method.starts_with("/grpc.health.") || method.starts_with("/grpc.reflection.")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_are_coloured_only_on_a_terminal_without_no_color() {
        assert!(log_colors(true, None));
        assert!(log_colors(true, Some("".into())));
        assert!(!log_colors(false, None));
        assert!(!log_colors(true, Some("1".into())));
    }
}
