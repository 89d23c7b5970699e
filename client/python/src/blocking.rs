//! [`BlockingClient`]: forwards that block the calling thread, through a
//! router or in one hop, each driven by a tokio runtime of the client's own.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use moemesh_client::{Client, ClientError, TlsConfig};
use moemesh_core::model::default_model_id;
use moemesh_proto::v1::DescribeResponse;
use moemesh_router_node::{DirectClient, ModelSource, RouterError};

use crate::wire_expert_ids;

/// A client that blocks the calling thread until each call is answered.
pub struct BlockingClient {
    /// Runs the connections' background work (HTTP/2 pings and window
    /// updates, the placement stream of a one-hop client) between calls,
    /// and each call while its caller waits.
    runtime: tokio::runtime::Runtime,
    path: Path,
    /// Bounds each call, retries included.
    deadline: Duration,
}

/// Where a [`BlockingClient`]'s forwards go.
enum Path {
    /// Through a router. Cloned for each call (clones share the
    /// connection), so that calls from several threads run at once;
    /// `model` names the model (empty: the router's only one). Boxed: a
    /// client's channel and settings weigh far more than an `Arc`.
    Router { client: Box<Client>, model: String },
    /// Straight to the expert nodes, following the coordinators'
    /// placement; shared by every call so that replica choice sees all of
    /// them.
    OneHop(Arc<DirectClient>),
}

/// What a one-hop client needs beside the coordinators.
#[derive(Debug, Clone)]
pub struct OneHop {
    /// The coordinators' URLs (any of them answers).
    pub coordinators: Vec<String>,
    /// The model's checkpoint directory as this machine sees it: its
    /// `config.json` and gates are read, never its expert weights.
    pub checkpoint: PathBuf,
    /// The model id the cluster serves it under; empty: the directory's
    /// name, as `moemesh up` and `moectl model load` name it.
    pub model: String,
}

/// The threads that drive the connections: a client waits on the
/// network, it does not compute.
const RUNTIME_THREADS: usize = 2;

fn runtime(
    connect_error: impl Fn(String) -> ClientError,
) -> Result<tokio::runtime::Runtime, ClientError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(RUNTIME_THREADS)
        .thread_name("moemesh-client")
        .enable_all()
        .build()
        .map_err(|error| connect_error(format!("cannot start the client's runtime: {error}")))
}

/// A router error as the SDK reports it, with the same gRPC code.
fn client_error(error: RouterError) -> ClientError {
    ClientError::from(tonic::Status::from(error))
}

impl BlockingClient {
    /// Connects to the router at `router` (`http://host:port`, or
    /// `https://` with TLS), giving up after `deadline`, which also bounds
    /// each call, retries included.
    pub fn connect(
        router: &str,
        model: &str,
        tls: &TlsConfig,
        deadline: Duration,
    ) -> Result<Self, ClientError> {
        let connect_error = |message: String| ClientError::Connect {
            address: router.to_string(),
            message,
        };
        let runtime = runtime(connect_error)?;
        let client = runtime.block_on(async {
            tokio::time::timeout(deadline, Client::connect_with_tls(router, tls))
                .await
                .map_err(|_| connect_error(format!("no connection within {deadline:?}")))?
        })?;
        Ok(Self {
            runtime,
            path: Path::Router {
                client: Box::new(client.with_deadline(deadline)),
                model: model.to_string(),
            },
            deadline,
        })
    }

    /// Follows the coordinators' placement of `one_hop.model` and sends
    /// each forward straight to the expert nodes (see
    /// [`DirectClient`]); waits for the first placement at most
    /// `deadline`, which also bounds each call.
    pub fn connect_one_hop(
        one_hop: OneHop,
        tls: &TlsConfig,
        deadline: Duration,
    ) -> Result<Self, ClientError> {
        let address = one_hop.coordinators.join(",");
        let connect_error = |message: String| ClientError::Connect {
            address: address.clone(),
            message,
        };
        let model = if one_hop.model.is_empty() {
            default_model_id(&one_hop.checkpoint)
        } else {
            one_hop.model
        };
        let runtime = runtime(connect_error)?;
        let checkpoint = one_hop.checkpoint.display().to_string();
        let source = ModelSource::Checkpoint(one_hop.checkpoint);
        let client = runtime.block_on(async {
            let connecting =
                DirectClient::connect(one_hop.coordinators, &model, source, tls.clone());
            match tokio::time::timeout(deadline, connecting).await {
                Err(_) => Err(connect_error(format!(
                    "the placement holds no expert of model {model:?} within {deadline:?}: is it loaded (moectl model load), and under this id?"
                ))),
                Ok(Err(RouterError::Unavailable(message))) => Err(connect_error(message)),
                // The checkpoint is the caller's argument: one this client
                // cannot read is a bad argument, not a failure of the cluster.
                Ok(Err(RouterError::Core(error))) => Err(ClientError::InvalidArgument(format!(
                    "checkpoint {checkpoint}: {error}"
                ))),
                Ok(result) => result.map_err(client_error),
            }
        })?;
        Ok(Self {
            runtime,
            path: Path::OneHop(Arc::new(client)),
            deadline,
        })
    }

    /// MoE layer `layer` of `hidden`, `[tokens, hidden_size]` row-major,
    /// with the gate computed by the cluster (a router) or from the
    /// checkpoint's gates (one hop).
    pub fn forward(
        &self,
        layer: u32,
        hidden: &[f32],
        hidden_size: usize,
    ) -> Result<Vec<f32>, ClientError> {
        match &self.path {
            Path::Router { client, model } => {
                let mut client = Client::clone(client);
                self.runtime
                    .block_on(client.forward_f32(model, layer, hidden, hidden_size))
            }
            Path::OneHop(client) => {
                check_hidden_size(client, hidden_size)?;
                self.runtime
                    .block_on(client.forward_f32(layer, hidden, self.deadline))
                    .map_err(client_error)
            }
        }
    }

    /// The weighted sum of each token's routed experts: `expert_ids` and
    /// `weights` are `[tokens, top_k]` row-major, the gate computed by the
    /// caller. Ids are taken as Python gives them (i64) and refused when
    /// they do not fit the wire's u32.
    pub fn forward_routed(
        &self,
        layer: u32,
        hidden: &[f32],
        hidden_size: usize,
        expert_ids: &[i64],
        weights: &[f32],
        top_k: usize,
    ) -> Result<Vec<f32>, ClientError> {
        let expert_ids = wire_expert_ids(expert_ids, top_k)?;
        match &self.path {
            Path::Router { client, model } => {
                let mut client = Client::clone(client);
                self.runtime.block_on(client.forward_routed_f32(
                    model,
                    layer,
                    hidden,
                    hidden_size,
                    &expert_ids,
                    weights,
                    top_k,
                ))
            }
            Path::OneHop(client) => {
                check_hidden_size(client, hidden_size)?;
                let forward = client.forward_routed_f32(
                    layer,
                    hidden,
                    &expert_ids,
                    weights,
                    top_k,
                    self.deadline,
                );
                self.runtime.block_on(forward).map_err(client_error)
            }
        }
    }

    /// What the cluster serves: the model's shape and each MoE layer's
    /// gate fingerprint, for `moemesh.attach` to check a local model
    /// against. A one-hop client answers from the checkpoint it was given.
    pub fn describe(&self) -> Result<DescribeResponse, ClientError> {
        match &self.path {
            Path::Router { client, model } => {
                let mut client = Client::clone(client);
                self.runtime.block_on(client.describe(model))
            }
            Path::OneHop(client) => client.describe().map_err(client_error),
        }
    }
}

/// Refuses rows of another width than the model's, as a router does.
fn check_hidden_size(client: &DirectClient, hidden_size: usize) -> Result<(), ClientError> {
    let expected = client.config().hidden_size;
    if hidden_size == expected {
        Ok(())
    } else {
        Err(ClientError::InvalidArgument(format!(
            "hidden has {hidden_size} columns; the model's hidden size is {expected}"
        )))
    }
}
