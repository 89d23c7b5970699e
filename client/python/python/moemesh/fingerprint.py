"""Gate fingerprints: does a local model hold the checkpoint a cluster serves?

A router fingerprints each MoE layer's gate as it loads it
(``Client.describe()``); :func:`gate_fingerprint` computes the same SHA-256
from local weights and :func:`check_fingerprints` compares the two. numpy
only, so that the check runs (and is tested) without torch.
"""

import hashlib

import numpy as np

from ._native import MoemeshError


class ModelMismatch(MoemeshError):
    """The local model is not the checkpoint the cluster serves: a gate
    differs, a layer is missing on one side, or the shapes differ.

    ``layer`` is the first differing layer (None when the shapes differ);
    ``code`` is ``"FAILED_PRECONDITION"``, as for other refusals.
    """

    def __init__(self, message, layer=None):
        super().__init__(f"FAILED_PRECONDITION: {message}")
        self.code = "FAILED_PRECONDITION"
        self.message = message
        self.layer = layer


def gate_fingerprint(weight, bias=None, logit_bias=None):
    """SHA-256 of one MoE layer's gate, as the router computes it.

    ``weight`` is the gate's ``[num_experts, hidden_size]`` matrix (the
    router's weight, whatever the family calls it), ``bias`` its score
    correction bias (DeepSeek-V3's, GLM-4.5's and LongCat-Flash's
    ``e_score_correction_bias``; None for the other families) and
    ``logit_bias`` the bias added to its logits (gpt-oss's ``router.bias``):
    numpy arrays, torch tensors (any device, bfloat16 included) or anything
    numpy reads. The values are widened to float32 and hashed as
    little-endian bytes, row-major, in that order. Returns 32 bytes.
    """
    hasher = hashlib.sha256()
    for tensor in (weight, bias, logit_bias):
        if tensor is not None:
            hasher.update(_float32_bytes(tensor))
    return hasher.digest()


def check_fingerprints(local, served, *, hidden_size=None, num_experts=None):
    """Raises :class:`ModelMismatch` unless a model whose MoE layers have the
    gate fingerprints ``local`` (``{layer: 32 bytes}``) is what ``served``
    (``Client.describe()``'s dict) describes: the same MoE layers, each with
    the same gate, and, when given, the same hidden size and routed expert
    count. The message names the first layer that differs.
    """
    shapes = (
        ("hidden size", hidden_size, served["hidden_size"]),
        ("routed experts per layer", num_experts, served["num_experts"]),
    )
    for name, mine, theirs in shapes:
        if mine is not None and int(mine) != int(theirs):
            raise ModelMismatch(
                f"the model has {name} {mine} but the cluster serves {served['model']!r} "
                f"({served['family']}) with {name} {theirs}"
            )
    served_layers = {int(layer): bytes(digest) for layer, digest in served["layers"].items()}
    local = {int(layer): bytes(digest) for layer, digest in local.items()}
    for layer in sorted(set(local) | set(served_layers)):
        if layer not in served_layers:
            raise ModelMismatch(
                f"layer {layer}: the model has an MoE layer {layer} that the cluster does not "
                f"serve (it serves layers {sorted(served_layers)})",
                layer,
            )
        if layer not in local:
            raise ModelMismatch(
                f"layer {layer}: the cluster serves MoE layer {layer}, which the model does not "
                f"have (its MoE layers are {sorted(local)})",
                layer,
            )
        if local[layer] != served_layers[layer]:
            raise ModelMismatch(
                f"layer {layer}: the gate weights differ from those of {served['model']!r}, the "
                f"checkpoint the cluster serves (sha256 {local[layer].hex()[:16]}... here, "
                f"{served_layers[layer].hex()[:16]}... there). Load the checkpoint the cluster was "
                "started with, in the dtype it is stored in",
                layer,
            )


def _float32_bytes(tensor):
    """``tensor``'s values as C-ordered little-endian float32 bytes."""
    try:
        array = np.asarray(tensor)
    except (TypeError, RuntimeError):
        # torch tensors that numpy cannot view: on a device, requiring grad,
        # or in bfloat16 (widened to float32, which is exact).
        if not hasattr(tensor, "detach"):
            raise
        tensor = tensor.detach().cpu()
        if str(tensor.dtype) == "torch.bfloat16":
            tensor = tensor.float()
        array = np.asarray(tensor)
    return np.ascontiguousarray(array, dtype="<f4").tobytes()
