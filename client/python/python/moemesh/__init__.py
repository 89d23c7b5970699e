"""Run the experts of a mixture-of-experts model on a moemesh cluster.

    import moemesh
    client = moemesh.Client("http://127.0.0.1:50051")
    output = client.forward(1, hidden)  # hidden: [tokens, hidden_size]

    moemesh.attach(model, client)  # a transformers model's experts, remote

Arrays go in as numpy arrays, torch tensors or anything else numpy can read,
and come back as float32 numpy arrays; ``torch.from_numpy(output)`` wraps the
result without a copy. Calls release the GIL while they wait on the network,
so other Python threads run meanwhile, and one client may be shared by
several threads.

Errors the cluster reports raise :class:`MoemeshError` (or one of its
subclasses), whose ``code`` is the gRPC code name and ``message`` the reason.

:func:`attach` runs the routed experts of a Hugging Face transformers model
on the cluster (after checking with :func:`check_fingerprints` that the
cluster serves the same checkpoint) and :func:`detach` undoes it.
"""

import os

import numpy as np

from ._native import (
    DeadlineExceeded,
    InvalidArgument,
    MoemeshError,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    __version__,
)
from ._native import Client as _NativeClient
from .attach import attach, detach
from .fingerprint import ModelMismatch, check_fingerprints, gate_fingerprint

__all__ = [
    "Client",
    "MoemeshError",
    "InvalidArgument",
    "Unavailable",
    "ResourceExhausted",
    "DeadlineExceeded",
    "PermissionDenied",
    "Unauthenticated",
    "ModelMismatch",
    "attach",
    "detach",
    "check_fingerprints",
    "gate_fingerprint",
    "__version__",
]

# The environment `moemesh up` and the other moemesh tools read, for the
# keyword arguments of the same meaning.
_ENVIRONMENT = {
    "cluster_secret": "MOEMESH_CLUSTER_SECRET",
    "tls_ca": "MOEMESH_TLS_CA",
    "tls_cert": "MOEMESH_TLS_CERT",
    "tls_key": "MOEMESH_TLS_KEY",
}


class Client:
    """A connection to a moemesh cluster, which runs MoE layers.

    Through a router: ``Client("http://host:port")`` (``https://`` with
    mutual TLS). In one hop, with no router in between:
    ``Client(coordinator="http://host:port", checkpoint=DIR)``: the client
    follows the coordinators' placement (several URLs may be given,
    comma-separated) and sends each token straight to the expert nodes that
    hold its experts, choosing replicas and retrying failed ones as a
    router does. ``checkpoint`` is the model's directory as this machine
    sees it (the one a transformers model loads from): its ``config.json``
    and gates are read, never its expert weights, and the cluster must
    serve that checkpoint. Keyword arguments:

    - ``model``: the model id every call names; through a router, empty
      selects the router's only model; in one hop, empty is the checkpoint
      directory's name, the id ``moemesh up`` and ``moectl model load``
      give it.
    - ``cluster_secret``: the secret ``moemesh up`` prints, for clusters in
      plaintext; the client then calls as the member ``client/<client_id>``.
    - ``tls_ca``, ``tls_cert``, ``tls_key``: PEM files for mutual TLS (all
      three; ``moemesh certs issue --role client --id NAME`` writes them).
    - When none of these four is given, they are read from
      ``MOEMESH_CLUSTER_SECRET`` and ``MOEMESH_TLS_CA``/``_CERT``/``_KEY``,
      as every moemesh tool reads them.
    - ``deadline_s``: how long connecting, and then each call (retries of an
      overloaded cluster included), may take.

    Connecting happens here: an unreachable router raises
    :class:`Unavailable` at once; a one-hop client waits (at most
    ``deadline_s``) for the coordinators' first placement of the model.
    """

    def __init__(
        self,
        router=None,
        *,
        coordinator=None,
        checkpoint=None,
        model="",
        client_id="python",
        cluster_secret=None,
        tls_ca=None,
        tls_cert=None,
        tls_key=None,
        deadline_s=30.0,
    ):
        security = {
            "cluster_secret": cluster_secret,
            "tls_ca": tls_ca,
            "tls_cert": tls_cert,
            "tls_key": tls_key,
        }
        if all(value is None for value in security.values()):
            security = {name: os.environ.get(variable) for name, variable in _ENVIRONMENT.items()}
        for name in ("tls_ca", "tls_cert", "tls_key"):
            if security[name] is not None:
                security[name] = os.fspath(security[name])
        self.router = router
        self.coordinator = coordinator
        self.model = model
        if checkpoint is not None:
            checkpoint = os.fspath(checkpoint)
        self._native = _NativeClient(
            router,
            coordinator=coordinator,
            checkpoint=checkpoint,
            model=model,
            client_id=client_id,
            deadline_s=float(deadline_s),
            **security,
        )

    def forward(self, layer, hidden):
        """Runs MoE layer ``layer`` on ``hidden``, the gate computed by moemesh.

        ``hidden`` is ``[tokens, hidden_size]`` of any float dtype (computed
        in float32). Returns float32 ``[tokens, hidden_size]``: the weighted
        sum of each token's top-k experts, plus the shared experts for
        models that have them.
        """
        return self._native.forward(layer, _float_rows(hidden, "hidden", "[tokens, hidden_size]"))

    def forward_routed(self, layer, hidden, expert_ids, weights):
        """Runs the routed experts of layer ``layer``, the gate computed by you.

        ``expert_ids`` (integers) and ``weights`` (floats) are
        ``[tokens, top_k]``: token ``t`` gets
        ``sum_k weights[t, k] * expert[expert_ids[t, k]](hidden[t])``, as the
        experts interface of transformers and vLLM's fused MoE compute it.
        Routed experts only: a model's shared experts stay with the caller.
        Ids out of range or repeated within a token raise
        :class:`InvalidArgument`. Returns float32 ``[tokens, hidden_size]``.
        """
        hidden = _float_rows(hidden, "hidden", "[tokens, hidden_size]")
        ids = _to_numpy(expert_ids)
        if ids.ndim != 2 or ids.dtype.kind not in "iu":
            raise _shape_error("expert_ids", "an integer", "[tokens, top_k]", ids)
        weights = _float_rows(weights, "weights", "[tokens, top_k]")
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        return self._native.forward_routed(layer, hidden, ids, weights)

    def describe(self):
        """What the cluster serves, as a dict: ``model`` (its id),
        ``family`` (``config.json``'s ``model_type``), ``hidden_size``,
        ``num_experts`` (routed experts per MoE layer), ``top_k`` and
        ``layers``, which maps every MoE layer served to the SHA-256 of its
        gate (32 bytes; :func:`gate_fingerprint` computes the same locally).
        """
        return self._native.describe()

    def __repr__(self):
        if self.router is None:
            return f"moemesh.Client(coordinator={self.coordinator!r}, model={self.model!r})"
        return f"moemesh.Client({self.router!r}, model={self.model!r})"


def _to_numpy(value):
    """``value`` as a numpy array, without a copy where numpy can view it."""
    try:
        return np.asarray(value)
    except (TypeError, RuntimeError):
        # torch tensors on a GPU, in bfloat16 or requiring grad have no
        # numpy view: copy them to the host, in float32 for bfloat16.
        if not hasattr(value, "detach"):
            raise
    tensor = value.detach().cpu()
    try:
        return np.asarray(tensor)
    except TypeError:
        return np.asarray(tensor.float())


def _float_rows(value, name, shape):
    """``value`` as a C-contiguous float32 matrix; a no-op for one already."""
    array = _to_numpy(value)
    is_float = array.dtype.kind == "f" or array.dtype.name == "bfloat16"
    if array.ndim != 2 or not is_float:
        raise _shape_error(name, "a float", shape, array)
    return np.ascontiguousarray(array, dtype=np.float32)


def _shape_error(name, kind, shape, array):
    """What to raise for an argument that is not a 2-D array of ``kind``:
    ValueError for the wrong number of dimensions, TypeError for the dtype."""
    message = f"{name} must be {kind} array of shape {shape}, not {array.dtype} {list(array.shape)}"
    return ValueError(message) if array.ndim != 2 else TypeError(message)
