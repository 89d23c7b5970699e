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

/// A gRPC status code as Prometheus label values conventionally spell it:
/// `ok`, `invalid_argument`, `resource_exhausted`.
pub fn code_label(code: tonic::Code) -> String {
    let name = format!("{code:?}");
    let mut snake = String::with_capacity(name.len() + 4);
    for (index, character) in name.chars().enumerate() {
        if character.is_ascii_uppercase() && index > 0 {
            snake.push('_');
        }
        snake.push(character.to_ascii_lowercase());
    }
    snake
}

/// Holds a gauge one higher while it lives: a call in flight, a request
/// in a queue. Dropping it, on every path out, counts the item out.
#[derive(Debug)]
#[must_use = "dropping the guard lowers the gauge at once"]
pub struct GaugeGuard(prometheus_client::metrics::gauge::Gauge);

impl GaugeGuard {
    /// Raises `gauge` until the guard drops.
    pub fn raise(gauge: &prometheus_client::metrics::gauge::Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_snake_case() {
        assert_eq!(code_label(tonic::Code::Ok), "ok");
        assert_eq!(code_label(tonic::Code::InvalidArgument), "invalid_argument");
        assert_eq!(
            code_label(tonic::Code::FailedPrecondition),
            "failed_precondition"
        );
    }

    #[test]
    fn a_guard_counts_in_and_out() {
        let gauge = prometheus_client::metrics::gauge::Gauge::<i64>::default();
        let first = GaugeGuard::raise(&gauge);
        let second = GaugeGuard::raise(&gauge);
        assert_eq!(gauge.get(), 2);
        drop(first);
        drop(second);
        assert_eq!(gauge.get(), 0);
    }
}
