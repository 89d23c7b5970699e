//! moemesh-router-node: serves `RouterService`. A router holds the gate
//! weights of the layers it serves, routes each token, sends every expert
//! node the rows it needs (one RPC per node, all in parallel) and sums the
//! partial rows the nodes return.
//!
//! - [`service`]: the gRPC handlers: admission, decoding, encoding and
//!   status codes around a [`LayerForwarder`].
//! - [`forwarder`]: one layer's forward: gating or the caller's routing,
//!   load counting, then the fan-out.
//! - [`describe`]: `Describe`: the model's shape and a fingerprint of each
//!   served gate, so that callers gating locally check the checkpoint.
//! - [`direct`]: one hop: a client that runs a `LayerForwarder` itself,
//!   following the coordinators' placement, with no router in between.
//! - [`routed`]: pre-routed forwards: the caller's routing, checked and
//!   ordered for the fan-out.
//! - [`fanout`]: one forward's fan-out: every node's share sent at once,
//!   failed shares retried on other replicas within the deadline, answers
//!   summed.
//! - [`node_call`]: one expert node's `Compute` call, and whether its
//!   failure is retried on another replica or fails the forward.
//! - [`health`]: nodes that did not answer are avoided for a while and
//!   reported to the coordinators.
//! - [`dispatch`]: choosing replicas, splitting a routed batch per node,
//!   and adding the nodes' answers in expert order.
//! - [`table`]: the routing table and how it follows the coordinators.
//! - [`load`]: the per-expert token counts reported to the coordinators.
//! - [`metrics`]: what the router tells Prometheus.
//! - [`run`]: serves a router on a listener until shutdown.

pub mod describe;
pub mod direct;
pub mod dispatch;
mod error;
pub mod fanout;
pub mod forwarder;
pub mod health;
pub mod load;
pub mod metrics;
pub mod node_call;
pub mod routed;
pub mod service;
pub mod table;

use std::future::Future;
use std::path::PathBuf;

use moemesh_core::model::placement::PlacementFile;
use moemesh_proto::tls::TlsConfig;
use moemesh_proto::{MAX_MESSAGE_BYTES, RouterServiceServer};
use tokio::net::TcpListener;
use tonic::server::NamedService;
use tonic::service::Routes;

pub use direct::DirectClient;
pub use error::{RouterError, RouterResult};
pub use forwarder::{ForwarderConfig, LayerForwarder, ModelSource};
pub use service::RouterNodeService;

/// Where a router learns which node holds which expert.
#[derive(Debug, Clone)]
pub enum PlacementSource {
    /// A fixed placement file.
    File(PlacementFile),
    /// The coordinators' placement stream (any of these URLs); the router
    /// follows every new epoch.
    Coordinators(Vec<String>),
}

/// What a router serves.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// The Hugging Face model directory (only gate weights are read).
    pub model_dir: PathBuf,
    /// The model id clients use; an empty id in a request also selects it.
    pub model_id: String,
    /// Expert nodes and which experts each holds.
    pub placement: PlacementSource,
    /// This router's topology group (host or rack): among equally busy
    /// replicas it prefers nodes of its own group. Empty: no preference.
    pub group: String,
    /// Forwards in progress at once; more are refused with
    /// RESOURCE_EXHAUSTED (clients back off and retry). 0: 256.
    pub max_in_flight: usize,
    /// How connections to and from this router are secured.
    pub tls: TlsConfig,
    /// Where the router counts what it does (`RouterMetrics::default()`
    /// when nobody scrapes it).
    pub metrics: metrics::RouterMetrics,
}

/// A router with its gates and first routing table loaded.
pub struct Router {
    service: RouterNodeService,
    tls: TlsConfig,
}

impl Router {
    /// Loads the gates and the first routing table: from the placement
    /// file, or from the coordinators, whose placement it then follows.
    pub async fn load(config: RouterConfig) -> RouterResult<Self> {
        let tls = config.tls.clone();
        let service = RouterNodeService::load(config).await?;
        Ok(Self { service, tls })
    }

    /// Serves `RouterService` (and gRPC health) on `listener` until
    /// `shutdown` completes; in-flight calls finish first.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> RouterResult<()> {
        let server = RouterServiceServer::new(self.service)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let shutdown = async move {
            shutdown.await;
            tracing::info!("router shutting down");
        };
        let builder = moemesh_proto::data_path_server(&self.tls)
            .map_err(|error| RouterError::Internal(format!("TLS setup failed: {error}")))?;
        let services = [<RouterServiceServer<RouterNodeService> as NamedService>::NAME];
        moemesh_proto::serve_with_health(
            builder,
            Routes::new(server),
            &services,
            listener,
            shutdown,
        )
        .await
        .map_err(|error| RouterError::Internal(format!("server failed: {error}")))
    }
}

/// Loads a router ([`Router::load`]) and serves it on `listener` until
/// `shutdown` completes; in-flight calls finish first.
pub async fn run(
    config: RouterConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> RouterResult<()> {
    Router::load(config).await?.serve(listener, shutdown).await
}
