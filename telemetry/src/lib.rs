//! What a moemesh process tells the people who operate it.
//!
//! - [`ops`]: a plaintext listener with Prometheus metrics (`GET /metrics`)
//!   and the gRPC health service, for kubelet probes and scrapes, which
//!   present no client certificate when the cluster runs mutual TLS.
//! - [`traces`]: logs on stderr and, when `OTEL_EXPORTER_OTLP_ENDPOINT` is
//!   set, spans exported over OTLP/gRPC; W3C trace context rides in gRPC
//!   metadata from client to router to expert nodes and coordinators.
//!
//! The metric families themselves belong to the crates that update them
//! (router, expert node, coordinator); they register into one
//! `prometheus_client` registry per process, prefixed `moemesh_`.

pub mod ops;
pub mod traces;

pub use prometheus_client;

/// The registry a process's metric families register into: every name
/// starts with `moemesh_`.
pub fn new_registry() -> prometheus_client::registry::Registry {
    prometheus_client::registry::Registry::with_prefix("moemesh")
}
