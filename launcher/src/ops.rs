//! The operations side of a role process: its metrics registry, the
//! plaintext `--metrics-addr` listener (Prometheus metrics and gRPC
//! health), and the shutdown that the node and that listener share.

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use moemesh_telemetry::ops::OpsListener;
use moemesh_telemetry::prometheus_client::registry::Registry;
use tokio::sync::watch;

/// Printed on stdout, followed by the metrics URL, once the operations
/// listener is bound (before the node's [`crate::roles::READY_LINE_PREFIX`] line).
pub const METRICS_LINE_PREFIX: &str = "metrics on ";

#[derive(clap::Args, Clone, Debug, Default)]
pub struct OpsArgs {
    /// Address of the operations listener: Prometheus metrics at
    /// `/metrics` and the gRPC health service, in plaintext and without
    /// authentication (kubelet probes and Prometheus present no client
    /// certificate); it serves no data and changes nothing. `0.0.0.0:9090`
    /// in a pod, port 0 picks a free port. Off unless given.
    #[arg(long, env = "MOEMESH_METRICS_ADDR", value_name = "ADDR")]
    metrics_addr: Option<String>,
}

/// A role's registry, and its operations listener when one was asked for.
pub struct Ops {
    registry: Registry,
    listener: Option<OpsListener>,
}

impl OpsArgs {
    /// Binds the operations listener (if `--metrics-addr` was given) and
    /// announces its URL; health reports NOT_SERVING until [`RunningOps::set_ready`].
    pub async fn bind(&self) -> anyhow::Result<Ops> {
        let listener = match &self.metrics_addr {
            Some(address) => {
                let listener = OpsListener::bind(address)
                    .await
                    .with_context(|| format!("cannot listen on --metrics-addr {address}"))?;
                println!(
                    "{METRICS_LINE_PREFIX}http://{}/metrics",
                    listener.local_addr()?
                );
                Some(listener)
            }
            None => None,
        };
        Ok(Ops {
            registry: moemesh_telemetry::new_registry(),
            listener,
        })
    }
}

impl Ops {
    /// The registry the role's metric families register into.
    pub fn registry(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Starts serving metrics and health until `shutdown` says so.
    pub fn serve(self, shutdown: &Shutdown) -> RunningOps {
        let Some(listener) = self.listener else {
            return RunningOps { health: None };
        };
        let health = listener.health();
        let registry = Arc::new(self.registry);
        let stopped = shutdown.wait();
        tokio::spawn(async move {
            if let Err(error) = listener.serve(registry, stopped).await {
                tracing::error!(%error, "the metrics and health listener failed");
            }
        });
        RunningOps {
            health: Some(health),
        }
    }
}

/// A serving operations listener.
pub struct RunningOps {
    health: Option<moemesh_telemetry::ops::HealthReporter>,
}

impl RunningOps {
    /// Reports the process SERVING: it can do its work now.
    pub async fn set_ready(&self) {
        if let Some(health) = &self.health {
            moemesh_telemetry::ops::set_serving(health).await;
        }
    }
}

/// One shutdown signal for everything a process serves.
#[derive(Clone)]
pub struct Shutdown {
    stopping: watch::Receiver<bool>,
}

impl Shutdown {
    /// Listens for `signal` (Ctrl-C, SIGTERM, the parent gone) once.
    pub fn on(signal: impl Future<Output = ()> + Send + 'static) -> Self {
        let (stop_tx, stopping) = watch::channel(false);
        tokio::spawn(async move {
            signal.await;
            let _ = stop_tx.send(true);
        });
        Self { stopping }
    }

    /// Completes once the signal has come.
    pub fn wait(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut stopping = self.stopping.clone();
        async move {
            // An error means the sender is gone, which only happens after sending.
            let _ = stopping.wait_for(|&stop| stop).await;
        }
    }
}
