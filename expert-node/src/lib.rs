//! moemesh-expert-node: an expert node keeps the experts it is assigned
//! resident on a compute backend and runs its share of each forward.
//!
//! - [`worker`]: the [`worker::DeviceWorker`] that owns the resident
//!   experts and computes queued work on its own thread.
//! - [`service`]: the `ExpertService` gRPC handlers, which validate
//!   requests and hand them to the worker.
//! - [`registration`]: joining a cluster through its coordinators.
//! - [`run`]: serves a node on a listener until shutdown.

mod error;
pub mod registration;
pub mod service;
pub mod worker;

use std::future::Future;
use std::path::PathBuf;

use std::sync::Arc;

use moemesh_core::backend::{ComputeBackend, CpuBackend, WeightFormat};
use moemesh_core::checkpoint::Checkpoint;
use moemesh_proto::{ExpertServiceServer, MAX_MESSAGE_BYTES};
use tokio::net::TcpListener;

pub use error::{ExpertNodeError, ExpertNodeResult};
pub use service::ExpertNodeService;

/// What an expert node serves and how.
#[derive(Debug, Clone)]
pub struct ExpertNodeConfig {
    /// The Hugging Face model directory.
    pub model_dir: PathBuf,
    /// The model id requests use; empty requests match any.
    pub model_id: String,
    /// (layer, expert) pairs to hold at start; the shared expert is
    /// `num_experts`. Empty for a node that takes its experts from the coordinators.
    pub experts: Vec<(usize, u32)>,
    /// Compute threads (0: one per core).
    pub threads: usize,
    /// Requests that may wait for the worker before new ones are refused.
    pub queue_capacity: usize,
    /// How the experts' weights are kept in memory.
    pub weight_format: WeightFormat,
}

/// Loads the node's experts, then serves `ExpertService` (and gRPC health)
/// on `listener` until `shutdown` completes; in-flight calls finish first.
pub async fn run(
    config: ExpertNodeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> ExpertNodeResult<()> {
    let service = load(config).await?;
    serve(service, listener, shutdown).await
}

/// Loads the experts of `config` onto a CPU backend, off the async runtime.
pub async fn load(config: ExpertNodeConfig) -> ExpertNodeResult<ExpertNodeService> {
    tokio::task::spawn_blocking(move || {
        let checkpoint = Arc::new(Checkpoint::open(&config.model_dir)?);
        let backend: Arc<dyn ComputeBackend> = Arc::new(CpuBackend::with_format(
            config.threads,
            config.weight_format,
        )?);
        ExpertNodeService::load(checkpoint, backend, &config)
    })
    .await
    .map_err(|error| ExpertNodeError::Internal(format!("expert loading panicked: {error}")))?
}

/// Serves an already loaded node on `listener` until `shutdown` completes.
pub async fn serve(
    service: ExpertNodeService,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> ExpertNodeResult<()> {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<ExpertServiceServer<ExpertNodeService>>()
        .await;
    let server = ExpertServiceServer::new(service)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let shutdown = async move {
        shutdown.await;
        health_reporter
            .set_not_serving::<ExpertServiceServer<ExpertNodeService>>()
            .await;
        tracing::info!("expert node shutting down");
    };
    moemesh_proto::data_path_server()
        .map_err(|error| ExpertNodeError::Internal(format!("TLS setup failed: {error}")))?
        .add_service(health_service)
        .add_service(server)
        .serve_with_incoming_shutdown(moemesh_proto::incoming_without_delay(listener), shutdown)
        .await
        .map_err(|error| ExpertNodeError::Internal(format!("server failed: {error}")))
}

/// Hands the allocator's free memory back to the OS. Loading an expert
/// copies its projections out of the checkpoint and lays them out again;
/// the freed copies leave holes below the resident weights that the
/// allocator would otherwise keep, a third again of the weights' size.
pub(crate) fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages; it touches no live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}
