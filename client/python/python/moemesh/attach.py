"""Run the routed experts of a Hugging Face transformers model on a cluster.

transformers 5 splits every sparse MoE block into a router (``gate``, or
``router`` in PhiMoE, Granite MoE, DBRX, gpt-oss and LongCat-Flash, whose
weight is ``[num_experts, hidden_size]``) and an ``experts`` module called
as ``experts(hidden_states, top_k_index, top_k_weights)`` (Mixtral,
Qwen2-MoE, Qwen3-MoE, DeepSeek-V3 and others). Llama 4's block computes its
experts on inputs already scaled by their weights and is not covered. :func:`attach`
keeps the gate, the shared experts and everything else local and swaps
each ``experts`` module for one that sends the same three tensors to the
cluster (``Client.forward_routed``). torch is imported only when a model is
attached: checking a model against the cluster needs numpy alone.
"""

import functools
import inspect
import re

import numpy as np

from .fingerprint import check_fingerprints, gate_fingerprint

# transformers' experts interface: the arguments of `experts.forward`
# (gpt-oss names the last two differently).
_EXPERTS_ARGUMENTS = (
    ("hidden_states", "top_k_index", "top_k_weights"),
    ("hidden_states", "router_indices", "routing_weights"),
)
# A decoder layer's modules are named `….layers.N.…` (DBRX: `….blocks.N.…`).
_LAYER_IN_PATH = re.compile(r"(?:^|\.)(?:layers|blocks)\.(\d+)\.")


def attach(model, client):
    """Runs the routed experts of ``model`` on the cluster behind ``client``.

    ``model`` is a transformers model (5.x); ``client`` a
    :class:`moemesh.Client` whose cluster serves the same checkpoint. Each
    sparse MoE block's gate fingerprint is compared with the cluster's
    (``client.describe()``) first: a differing gate, an MoE layer missing
    on either side, or another hidden size or expert count raises
    :class:`moemesh.ModelMismatch` naming the first differing layer, and
    the model is left as it was. Then every block's ``experts`` module is
    replaced by a ``RemoteExperts`` module; gates, shared experts,
    attention and the rest stay local. Outputs come back in the dtype and
    on the device of the block's input. The replaced modules are kept, on
    their device, for :func:`detach`. Inference only: no gradients flow
    through the cluster. Returns ``model``.
    """
    if _attached(model):
        raise ValueError("the model is already attached; call moemesh.detach(model) first")
    blocks = _sparse_moe_blocks(model)
    local = {layer: gate_fingerprint(*_router_weights(block)) for layer, block in blocks.items()}
    first = next(iter(blocks.values()))
    gate_experts, hidden_size = _router_weights(first)[0].shape
    # LongCat-Flash's router also scores its zero experts, which are not
    # routed experts; transformers keeps the routed count on the block
    # (5.25) or on its experts module (earlier 5.x).
    routed_counts = (getattr(module, "num_routed_experts", None) for module in (first, first.experts))
    num_experts = next((count for count in routed_counts if count is not None), gate_experts)
    check_fingerprints(local, client.describe(), hidden_size=hidden_size, num_experts=num_experts)
    remote_experts = _remote_experts_class()
    for layer, block in blocks.items():
        block.experts = remote_experts(client, layer, block.experts, num_experts)
    return model


def detach(model):
    """Undoes :func:`attach`: every block gets back its local ``experts``
    module. A model that is not attached is left as it is. Returns ``model``."""
    for _, module in list(model.named_modules()):
        experts = getattr(module, "experts", None)
        if getattr(experts, "is_moemesh_remote", False):
            module.experts = experts.original
    return model


def _attached(model):
    """Whether some block of ``model`` runs its experts on a cluster."""
    return any(
        getattr(getattr(module, "experts", None), "is_moemesh_remote", False)
        for _, module in model.named_modules()
    )


def _sparse_moe_blocks(model):
    """``{decoder layer: block}`` for every sparse MoE block of ``model``: a
    module with a router (see :func:`_router_weights`) and an ``experts``
    module. Refuses a block whose experts lack transformers 5's interface,
    or whose decoder layer its name does not tell."""
    blocks = {}
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        if experts is None or _router_weights(module) is None:
            continue
        if not _has_experts_interface(experts):
            raise TypeError(
                f"{name}.experts ({type(experts).__name__}) is not called as experts(hidden_states, "
                "top_k_index, top_k_weights): moemesh.attach covers sparse MoE blocks of that "
                "interface (transformers 5 or later; not Llama 4's, whose experts take inputs "
                "already scaled by their weights); Client.forward serves any family"
            )
        found = _LAYER_IN_PATH.search(name + ".")
        if found is None:
            raise ValueError(f"cannot tell the decoder layer of the MoE block {name!r}")
        layer = int(found.group(1))
        if layer in blocks:
            raise ValueError(f"decoder layer {layer} has two MoE blocks; the second is {name!r}")
        blocks[layer] = module
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} has no sparse MoE block (a module with a `gate` or `router` "
            "and `experts`)"
        )
    return blocks


def _router_weights(block):
    """(weight, score correction bias, logit bias) of a sparse MoE block's
    router, as the router fingerprints them, or None for a module without
    one: its ``gate`` or ``router``, whose 2-D weight may sit in a ``layer``
    (DBRX) or a ``classifier`` (LongCat-Flash, whose classifier bias is
    unused); only a router holding its weight itself adds a ``bias`` to its
    logits (gpt-oss)."""
    for router in (getattr(block, "gate", None), getattr(block, "router", None)):
        if router is None:
            continue
        for holder in (router, getattr(router, "layer", None), getattr(router, "classifier", None)):
            weight = getattr(holder, "weight", None)
            if len(getattr(weight, "shape", ())) == 2:
                logit_bias = getattr(router, "bias", None) if holder is router else None
                return weight, getattr(router, "e_score_correction_bias", None), logit_bias
    return None


def _has_experts_interface(experts):
    """Whether ``experts`` is called as transformers 5's experts modules are."""
    forward = getattr(experts, "forward", None)
    if forward is None:
        return False
    try:
        parameters = list(inspect.signature(forward).parameters)
    except (TypeError, ValueError):
        return False
    return tuple(parameters[:3]) in _EXPERTS_ARGUMENTS


def distinct_expert_ids(expert_ids, weights, num_experts):
    """``expert_ids`` (numpy ``[tokens, top_k]``) with every repeat of an
    id within a token that has weight 0 moved to an expert the token does
    not use. A zero weight adds nothing wherever it points, and the cluster
    takes each token's experts once: LongCat-Flash in transformers 5.25
    points its zero experts' picks at routed experts with weight 0, which
    may repeat one of the token's real picks. Other repeats are left for
    the cluster to refuse. Returns ``expert_ids`` itself when nothing
    repeats."""
    ordered = np.sort(expert_ids, axis=1)
    repeating = np.nonzero((ordered[:, 1:] == ordered[:, :-1]).any(axis=1))[0]
    if repeating.size == 0:
        return expert_ids
    expert_ids = expert_ids.copy()
    for token in repeating:
        ids, token_weights = expert_ids[token], weights[token]
        # Weighted picks keep their ids; then each id's first zero-weight pick.
        keep = token_weights != 0
        for pick in np.nonzero(~keep)[0]:
            if ids[pick] not in ids[keep]:
                keep[pick] = True
        used = set(ids[keep].tolist())
        free = (expert for expert in range(num_experts) if expert not in used)
        for pick in np.nonzero(~keep)[0]:
            ids[pick] = next(free, ids[pick])
    return expert_ids


@functools.lru_cache(maxsize=None)
def _remote_experts_class():
    """``RemoteExperts``, defined on first use so that importing moemesh
    does not import torch."""
    import torch

    class RemoteExperts(torch.nn.Module):
        """A sparse MoE block's routed experts, computed by a moemesh
        cluster: the weighted sum of each token's ``top_k`` experts, as the
        local experts module computes it. ``original`` is that module,
        kept (unregistered, so outside ``parameters()`` and
        ``state_dict()``) for :func:`moemesh.detach`."""

        is_moemesh_remote = True

        def __init__(self, client, layer, original, num_experts):
            super().__init__()
            self.client = client
            self.layer = layer
            self.num_experts = num_experts
            # Plain attribute: registering it would keep its weights in the
            # attached model's parameters and state dict.
            object.__setattr__(self, "original", original)

        def forward(self, hidden_states, top_k_index, top_k_weights):
            if hidden_states.numel() == 0:
                return torch.zeros_like(hidden_states)
            # Rows of tokens, whatever leading dimensions the block keeps (DBRX keeps the batch's).
            tokens = hidden_states.reshape(-1, hidden_states.shape[-1])
            with torch.no_grad():
                hidden = tokens.detach().to("cpu", torch.float32).contiguous().numpy()
                expert_ids = top_k_index.detach().reshape(tokens.shape[0], -1)
                expert_ids = expert_ids.to("cpu", torch.int64).contiguous().numpy()
                weights = top_k_weights.detach().reshape(tokens.shape[0], -1)
                weights = weights.to("cpu", torch.float32).contiguous().numpy()
            expert_ids = distinct_expert_ids(expert_ids, weights, self.num_experts)
            output = self.client.forward_routed(self.layer, hidden, expert_ids, weights)
            output = torch.from_numpy(output).reshape(hidden_states.shape)
            return output.to(hidden_states.device, hidden_states.dtype)

        def extra_repr(self):
            return f"layer={self.layer}, client={self.client!r}"

    return RemoteExperts
