//! moemesh-expert-node: an expert node keeps the experts it is assigned
//! resident on a compute backend and runs its share of each forward.
//!
//! - [`worker`]: the [`worker::DeviceWorker`] that owns the resident
//!   experts and computes queued work on its own thread.
//! - [`service`]: the `ExpertService` gRPC handlers, which validate
//!   requests and hand them to the worker.
//! - [`registration`]: joining a cluster through its coordinators:
//!   registering, heartbeats, following the placement.
//! - [`metrics`]: what the node tells Prometheus ([`ExpertMetrics`]).
//! - [`ExpertNode`]: a loaded (and registered) node; [`run`] starts one
//!   and serves it on a listener until shutdown.

pub mod client_load;
mod error;
pub mod metrics;
pub mod registration;
pub mod residency;
pub mod service;
pub mod worker;

use std::future::Future;
use std::path::PathBuf;

use std::sync::Arc;

use moemesh_client::CoordinatorClient;
use moemesh_core::compute::{BackendOptions, Device, WeightFormat, open_backend};
use moemesh_core::model::checkpoint::Checkpoint;
use moemesh_core::model::placement::LayerExpert;
use moemesh_proto::tls::TlsConfig;
use moemesh_proto::{ExpertServiceServer, MAX_MESSAGE_BYTES};
use tokio::net::TcpListener;
use tonic::server::NamedService;
use tonic::service::Routes;

use crate::registration::{Registration, follow_placement_task, heartbeat_task, register};

pub use error::{ExpertNodeError, ExpertNodeResult};
pub use metrics::ExpertMetrics;
pub use service::{ExpertNodeService, WorkCounters};

/// What an expert node serves and how.
#[derive(Debug, Clone)]
pub struct ExpertNodeConfig {
    /// The Hugging Face model directory.
    pub model_dir: PathBuf,
    /// The model id requests use; empty requests match any.
    pub model_id: String,
    /// Experts to hold at start. Empty for a node that takes its experts
    /// from the coordinators.
    pub experts: Vec<LayerExpert>,
    /// Compute threads (0: one per core).
    pub threads: usize,
    /// Requests that may wait for the worker before new ones are refused.
    pub queue_capacity: usize,
    /// How the experts' weights are kept in memory.
    pub weight_format: WeightFormat,
    /// Where the experts compute.
    pub device: Device,
    /// Host memory for expert weights: the resident budget of a CPU node,
    /// the pinned tier of a GPU node. None: no limit.
    pub memory_budget: Option<u64>,
    /// GPU memory for expert weights of a GPU node. None: no limit.
    pub device_memory_budget: Option<u64>,
    /// How connections to and from this node are secured.
    pub tls: TlsConfig,
    /// The coordinators this node joins; None for a node that serves its
    /// `experts` alone (a placement file names it to routers).
    pub registration: Option<Registration>,
    /// Where the node counts its work; the default counts for no one.
    pub metrics: ExpertMetrics,
}

impl ExpertNodeConfig {
    /// The budget of the tier experts compute from: host memory on the
    /// CPU, GPU memory on a GPU.
    pub fn resident_budget(&self) -> Option<u64> {
        match self.device {
            Device::Cpu => self.memory_budget,
            Device::Cuda(_) => self.device_memory_budget,
        }
    }

    /// The budget of the pinned host tier a GPU node's cold experts wait
    /// in; a CPU node's wait in the page cache, which has none.
    pub fn host_tier_budget(&self) -> Option<u64> {
        match self.device {
            Device::Cpu => None,
            Device::Cuda(_) => self.memory_budget,
        }
    }

    /// The weight format the node's experts compute in, as it registers
    /// it: `weight_format` on the CPU; a GPU computes in bf16 whatever it
    /// was told.
    pub fn computed_weight_format(&self) -> WeightFormat {
        match self.device {
            Device::Cpu => self.weight_format,
            Device::Cuda(_) => WeightFormat::Bf16,
        }
    }
}

/// An expert node with its experts loaded and, when it has coordinators,
/// registered with them, heartbeating and following their placement.
pub struct ExpertNode {
    service: ExpertNodeService,
    /// Taken by [`ExpertNode::serve`].
    listener: Option<TcpListener>,
    tls: TlsConfig,
    /// The epoch that holds this node's registration; None without coordinators.
    registered_epoch: Option<u64>,
    /// Heartbeats and placement following; they end when the node stops
    /// serving or is dropped.
    membership_tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl ExpertNode {
    /// Loads the node's experts and, with coordinators, registers them
    /// (heartbeats start first: registering many experts can take a while).
    /// Connections on `listener` wait until [`ExpertNode::serve`].
    pub async fn start(config: ExpertNodeConfig, listener: TcpListener) -> ExpertNodeResult<Self> {
        let tls = config.tls.clone();
        let registration = config.registration.clone();
        let weight_format = config.computed_weight_format();
        let service = load(config).await?;
        let mut node = Self {
            service,
            listener: Some(listener),
            tls,
            registered_epoch: None,
            membership_tasks: Vec::new(),
        };
        if let Some(registration) = registration {
            node.join(registration, weight_format).await?;
        }
        Ok(node)
    }

    async fn join(
        &mut self,
        registration: Registration,
        weight_format: WeightFormat,
    ) -> ExpertNodeResult<()> {
        let mut coordinators =
            CoordinatorClient::new(registration.coordinators.clone(), self.tls.clone())
                .map_err(|error| ExpertNodeError::InvalidArgument(error.to_string()))?;
        self.membership_tasks.push(tokio::spawn(heartbeat_task(
            registration.clone(),
            self.service.clone(),
            coordinators.clone(),
        )));
        let registered = register(
            &self.service,
            &registration,
            weight_format,
            &mut coordinators,
        );
        let epoch = match registered.await {
            Ok(epoch) => epoch,
            Err(error) => {
                self.stop_membership();
                return Err(ExpertNodeError::Internal(format!(
                    "registration with the coordinators failed: {error}"
                )));
            }
        };
        tracing::info!(node = %registration.node_id, epoch, "registered with the coordinators");
        self.registered_epoch = Some(epoch);
        self.service.metrics().set_placement_epoch(epoch);
        self.membership_tasks
            .push(tokio::spawn(follow_placement_task(
                self.service.clone(),
                registration.node_id,
                coordinators,
                epoch,
            )));
        Ok(())
    }

    /// The node's gRPC service, for calling it in process.
    pub fn service(&self) -> &ExpertNodeService {
        &self.service
    }

    /// The placement epoch that holds this node's registration; None for a
    /// node without coordinators.
    pub fn registered_epoch(&self) -> Option<u64> {
        self.registered_epoch
    }

    /// Serves `ExpertService` (and gRPC health) until `shutdown` completes
    /// and in-flight calls finish; then stops heartbeating, so the
    /// coordinators soon count the node dead.
    pub async fn serve(
        mut self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> ExpertNodeResult<()> {
        let listener = self.listener.take().expect("a node serves once");
        serve(self.service.clone(), listener, &self.tls, shutdown).await
    }

    fn stop_membership(&mut self) {
        self.membership_tasks
            .drain(..)
            .for_each(|task| task.abort());
    }
}

impl Drop for ExpertNode {
    fn drop(&mut self) {
        self.stop_membership();
    }
}

/// Starts a node ([`ExpertNode::start`]) and serves it on `listener` until
/// `shutdown` completes; in-flight calls finish first.
pub async fn run(
    config: ExpertNodeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> ExpertNodeResult<()> {
    ExpertNode::start(config, listener)
        .await?
        .serve(shutdown)
        .await
}

/// Loads the experts of `config` onto the backend of its device, off the
/// async runtime.
async fn load(config: ExpertNodeConfig) -> ExpertNodeResult<ExpertNodeService> {
    tokio::task::spawn_blocking(move || {
        let checkpoint = Arc::new(Checkpoint::open(&config.model_dir)?);
        let backend = open_backend(BackendOptions {
            device: config.device,
            threads: config.threads,
            weight_format: config.weight_format,
            host_budget: config.host_tier_budget(),
        })?;
        ExpertNodeService::load(checkpoint, backend, &config)
    })
    .await
    .map_err(|error| ExpertNodeError::Internal(format!("expert loading panicked: {error}")))?
}

/// Serves a loaded node on `listener` until `shutdown` completes.
async fn serve(
    service: ExpertNodeService,
    listener: TcpListener,
    tls: &TlsConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> ExpertNodeResult<()> {
    let max_request_bytes = service.max_request_bytes();
    let server = ExpertServiceServer::new(service)
        .max_decoding_message_size(max_request_bytes)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    // Non-members are refused before their requests are decoded.
    let server = tonic::service::interceptor::InterceptedService::new(server, tls.members_only());
    let shutdown = async move {
        shutdown.await;
        tracing::info!("expert node shutting down");
    };
    let builder = moemesh_proto::data_path_server(tls)
        .map_err(|error| ExpertNodeError::Internal(format!("TLS setup failed: {error}")))?;
    let services = [<ExpertServiceServer<ExpertNodeService> as NamedService>::NAME];
    moemesh_proto::serve_with_health(builder, Routes::new(server), &services, listener, shutdown)
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
