//! The operations listener: `GET /metrics` in the Prometheus (OpenMetrics)
//! text format and `grpc.health.v1.Health` (with gRPC reflection listing
//! it), in plaintext and without
//! authentication. It carries no activations and changes nothing, so it can
//! stay open to the kubelet and to Prometheus while the data and admin ports
//! require mutual TLS.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::HealthServer;
pub use tonic_health::server::HealthReporter;
use tonic_health::server::HealthService;

/// What `GET /metrics` answers with: the OpenMetrics text format, which
/// Prometheus negotiates and parses.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A bound operations listener whose health starts NOT_SERVING: the process
/// calls [`OpsListener::set_ready`] once it can do its work (weights
/// loaded, placement known), so a probe never routes traffic to it early.
pub struct OpsListener {
    listener: TcpListener,
    health: HealthReporter,
}

impl OpsListener {
    /// Binds `address` (`0.0.0.0:9090` in a pod; port 0 picks a free port).
    pub async fn bind(address: &str) -> std::io::Result<Self> {
        let listener = TcpListener::bind(address).await?;
        let health = HealthReporter::new();
        health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        Ok(Self { listener, health })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// A handle that changes what the health service reports.
    pub fn health(&self) -> HealthReporter {
        self.health.clone()
    }

    /// Reports the whole process (service "") SERVING.
    pub async fn set_ready(&self) {
        set_serving(&self.health).await;
    }

    /// Serves metrics from `registry` and health until `shutdown`
    /// completes; health turns NOT_SERVING as shutdown begins.
    pub async fn serve(
        self,
        registry: Arc<Registry>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), tonic::transport::Error> {
        let health = self.health.clone();
        let shutdown = async move {
            shutdown.await;
            health
                .set_service_status("", ServingStatus::NotServing)
                .await;
        };
        let metrics = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let registry = registry.clone();
                async move { encode_metrics(&registry) }
            }),
        );
        let health_service = HealthServer::new(HealthService::from_health_reporter(self.health));
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .expect("tonic-health's descriptors are valid");
        let routes = tonic::service::Routes::new(health_service)
            .add_service(reflection)
            .into_axum_router()
            .merge(metrics);
        tonic::transport::Server::builder()
            .accept_http1(true)
            .add_routes(tonic::service::Routes::from(routes))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(self.listener),
                shutdown,
            )
            .await
    }
}

/// Reports the whole process (service "") SERVING through `health`.
pub async fn set_serving(health: &HealthReporter) {
    health.set_service_status("", ServingStatus::Serving).await;
}

/// The registry in the text format, or 500 if a metric fails to encode.
fn encode_metrics(registry: &Registry) -> Response {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, registry) {
        Ok(()) => (
            [(CONTENT_TYPE, HeaderValue::from_static(METRICS_CONTENT_TYPE))],
            body,
        )
            .into_response(),
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode metrics: {error}"),
        )
            .into_response(),
    }
}
