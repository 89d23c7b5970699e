//! The PyO3 module `moemesh._native`: [`PyClient`] over a
//! [`BlockingClient`], and the exceptions that carry gRPC codes. The
//! Python package (`python/moemesh/__init__.py`) turns whatever arrays it
//! is given into the C-contiguous float32 and int64 arrays taken here.

use std::path::PathBuf;
use std::time::Duration;

use moemesh_client::ClientError;
use numpy::{IntoPyArray, PyArray2, PyArrayMethods, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::{BlockingClient, OneHop, Security, grpc_code_and_message};

create_exception!(
    moemesh,
    MoemeshError,
    PyException,
    "A call that moemesh refused or could not make. `code` is the gRPC code name \
     (\"INVALID_ARGUMENT\", \"UNAVAILABLE\", ...) and `message` what went wrong."
);
create_exception!(
    moemesh,
    InvalidArgument,
    MoemeshError,
    "The request was malformed: wrong hidden size, unknown layer or model, expert ids out of range."
);
create_exception!(
    moemesh,
    Unavailable,
    MoemeshError,
    "The router, or an expert node it needs, cannot be reached."
);
create_exception!(
    moemesh,
    ResourceExhausted,
    MoemeshError,
    "The cluster stayed overloaded until the deadline; retry later or add expert nodes."
);
create_exception!(
    moemesh,
    DeadlineExceeded,
    MoemeshError,
    "The call did not finish within the client's deadline_s."
);
create_exception!(
    moemesh,
    PermissionDenied,
    MoemeshError,
    "The cluster knows who calls but does not let it make this call."
);
create_exception!(
    moemesh,
    Unauthenticated,
    MoemeshError,
    "The cluster does not know who calls: a wrong or missing cluster secret or certificate."
);

/// The Python exception for `error`, with `code` and `message` set.
fn python_error(py: Python<'_>, error: ClientError) -> PyErr {
    let (code, message) = grpc_code_and_message(&error);
    let text = format!("{code}: {message}");
    let exception = match code.as_str() {
        "INVALID_ARGUMENT" => InvalidArgument::new_err(text),
        "UNAVAILABLE" => Unavailable::new_err(text),
        "RESOURCE_EXHAUSTED" => ResourceExhausted::new_err(text),
        "DEADLINE_EXCEEDED" => DeadlineExceeded::new_err(text),
        "PERMISSION_DENIED" => PermissionDenied::new_err(text),
        "UNAUTHENTICATED" => Unauthenticated::new_err(text),
        _ => MoemeshError::new_err(text),
    };
    let value = exception.value(py);
    if let Err(error) = value
        .setattr("code", code)
        .and_then(|()| value.setattr("message", message))
    {
        return error;
    }
    exception
}

/// The C-contiguous data of `array`, which the Python package guarantees;
/// a caller of `moemesh._native` directly may pass something else.
fn contiguous<'a, T: numpy::Element>(
    array: &'a PyReadonlyArray2<'_, T>,
    name: &str,
) -> PyResult<&'a [T]> {
    array
        .as_slice()
        .map_err(|_| PyValueError::new_err(format!("{name} must be C-contiguous")))
}

/// `values` as a `[rows, columns]` array, without a copy.
fn matrix(
    py: Python<'_>,
    values: Vec<f32>,
    rows: usize,
    columns: usize,
) -> PyResult<Bound<'_, PyArray2<f32>>> {
    values.into_pyarray(py).reshape([rows, columns])
}

/// Where a client's forwards go, from its arguments.
enum ForwardPath {
    Router { router: String, model: String },
    OneHop(OneHop),
}

impl ForwardPath {
    /// A router's URL, or one or more coordinators' URLs (comma-separated)
    /// with the checkpoint directory: one of the two.
    fn of(
        router: Option<String>,
        coordinator: Option<String>,
        checkpoint: Option<PathBuf>,
        model: String,
    ) -> PyResult<Self> {
        match (router, coordinator, checkpoint) {
            (Some(router), None, None) => Ok(Self::Router { router, model }),
            (None, Some(coordinator), Some(checkpoint)) => Ok(Self::OneHop(OneHop {
                coordinators: coordinator
                    .split(',')
                    .map(str::trim)
                    .filter(|url| !url.is_empty())
                    .map(String::from)
                    .collect(),
                checkpoint,
                model,
            })),
            (None, Some(_), None) => Err(PyValueError::new_err(
                "a one-hop client (coordinator=...) needs checkpoint=: the model's directory, for its config.json and gates",
            )),
            (Some(_), None, Some(_)) => Err(PyValueError::new_err(
                "checkpoint= is for a one-hop client (coordinator=...); a router has the model already",
            )),
            (Some(_), Some(_), _) => Err(PyValueError::new_err(
                "give a router's URL or coordinator=, not both",
            )),
            (None, None, _) => Err(PyValueError::new_err(
                "give a router's URL, or coordinator= and checkpoint= for one hop",
            )),
        }
    }
}

/// The native client: see `moemesh.Client` for the documented API.
#[pyclass(module = "moemesh._native", name = "Client", frozen)]
struct PyClient {
    client: BlockingClient,
}

#[pymethods]
impl PyClient {
    #[new]
    #[pyo3(signature = (
        router = None, *, coordinator = None, checkpoint = None, model = String::new(),
        client_id = String::from("python"), cluster_secret = None, tls_ca = None,
        tls_cert = None, tls_key = None, deadline_s = 30.0
    ))]
    #[allow(
        clippy::too_many_arguments,
        reason = "Python's keyword arguments: each option stands alone"
    )]
    fn new(
        py: Python<'_>,
        router: Option<String>,
        coordinator: Option<String>,
        checkpoint: Option<PathBuf>,
        model: String,
        client_id: String,
        cluster_secret: Option<String>,
        tls_ca: Option<PathBuf>,
        tls_cert: Option<PathBuf>,
        tls_key: Option<PathBuf>,
        deadline_s: f64,
    ) -> PyResult<Self> {
        let deadline = Duration::try_from_secs_f64(deadline_s)
            .ok()
            .filter(|deadline| !deadline.is_zero())
            .ok_or_else(|| {
                PyValueError::new_err(format!(
                    "deadline_s must be a positive number of seconds, not {deadline_s}"
                ))
            })?;
        let security = Security {
            client_id,
            cluster_secret,
            tls_ca,
            tls_cert,
            tls_key,
        };
        let tls = security.tls_config().map_err(PyValueError::new_err)?;
        let path = ForwardPath::of(router, coordinator, checkpoint, model)?;
        let client = py
            .detach(|| match path {
                ForwardPath::Router { router, model } => {
                    BlockingClient::connect(&router, &model, &tls, deadline)
                }
                ForwardPath::OneHop(one_hop) => {
                    BlockingClient::connect_one_hop(one_hop, &tls, deadline)
                }
            })
            .map_err(|error| python_error(py, error))?;
        Ok(Self { client })
    }

    /// MoE layer `layer` of `hidden` (float32 `[tokens, hidden_size]`).
    fn forward<'py>(
        &self,
        py: Python<'py>,
        layer: u32,
        hidden: PyReadonlyArray2<'py, f32>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let [tokens, hidden_size] = [hidden.shape()[0], hidden.shape()[1]];
        let values = contiguous(&hidden, "hidden")?;
        let output = py
            .detach(|| self.client.forward(layer, values, hidden_size))
            .map_err(|error| python_error(py, error))?;
        matrix(py, output, tokens, hidden_size)
    }

    /// The routed experts' weighted sum: `expert_ids` (int64) and
    /// `weights` (float32) are `[tokens, top_k]`.
    fn forward_routed<'py>(
        &self,
        py: Python<'py>,
        layer: u32,
        hidden: PyReadonlyArray2<'py, f32>,
        expert_ids: PyReadonlyArray2<'py, i64>,
        weights: PyReadonlyArray2<'py, f32>,
    ) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let [tokens, hidden_size] = [hidden.shape()[0], hidden.shape()[1]];
        let top_k = expert_ids.shape()[1];
        if expert_ids.shape() != weights.shape() || expert_ids.shape()[0] != tokens {
            return Err(PyValueError::new_err(format!(
                "expert_ids {:?} and weights {:?} must both be [tokens, top_k] with the {tokens} tokens of hidden",
                expert_ids.shape(),
                weights.shape()
            )));
        }
        let values = contiguous(&hidden, "hidden")?;
        let ids = contiguous(&expert_ids, "expert_ids")?;
        let weights = contiguous(&weights, "weights")?;
        let output = py
            .detach(|| {
                self.client
                    .forward_routed(layer, values, hidden_size, ids, weights, top_k)
            })
            .map_err(|error| python_error(py, error))?;
        matrix(py, output, tokens, hidden_size)
    }

    /// What the router serves, as a dict: `model`, `family`,
    /// `hidden_size`, `num_experts`, `top_k`, and `layers`, which maps each
    /// MoE layer to the SHA-256 (32 bytes) of its gate.
    fn describe<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let described = py
            .detach(|| self.client.describe())
            .map_err(|error| python_error(py, error))?;
        let layers = PyDict::new(py);
        for gate in &described.layers {
            layers.set_item(gate.layer, PyBytes::new(py, &gate.gate_sha256))?;
        }
        let description = PyDict::new(py);
        description.set_item("model", described.model)?;
        description.set_item("family", described.family)?;
        description.set_item("hidden_size", described.hidden_size)?;
        description.set_item("num_experts", described.num_experts)?;
        description.set_item("top_k", described.top_k)?;
        description.set_item("layers", layers)?;
        Ok(description)
    }
}

#[pymodule]
fn _native(module: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = module.py();
    module.add_class::<PyClient>()?;
    module.add("MoemeshError", py.get_type::<MoemeshError>())?;
    module.add("InvalidArgument", py.get_type::<InvalidArgument>())?;
    module.add("Unavailable", py.get_type::<Unavailable>())?;
    module.add("ResourceExhausted", py.get_type::<ResourceExhausted>())?;
    module.add("DeadlineExceeded", py.get_type::<DeadlineExceeded>())?;
    module.add("PermissionDenied", py.get_type::<PermissionDenied>())?;
    module.add("Unauthenticated", py.get_type::<Unauthenticated>())?;
    module.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
