"""How `moemesh.attach` checks that the cluster serves the model's checkpoint,
with numpy only: `client.describe()`, `gate_fingerprint` and
`check_fingerprints` on the Mixtral fixture's gate weights, and `attach`
refusing a mismatched model before it changes anything. The cluster is
conftest.py's, serving that fixture.
"""

import hashlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors.numpy import load_file

import moemesh

MIXTRAL = Path(__file__).resolve().parents[3] / "tests" / "fixtures" / "mixtral"
LAYERS = (0, 1)
GATE = "model.layers.{}.block_sparse_moe.gate.weight"
HIDDEN_SIZE = 64
EXPERTS = 8


@pytest.fixture(scope="module")
def gates():
    checkpoint = load_file(str(MIXTRAL / "model.safetensors"))
    return {layer: checkpoint[GATE.format(layer)] for layer in LAYERS}


def fingerprints(gates):
    return {layer: moemesh.gate_fingerprint(weight) for layer, weight in gates.items()}


def nudged(weight):
    """``weight`` with one value moved to the next float32."""
    changed = weight.copy()
    changed[3, 5] = np.nextafter(changed[3, 5], np.float32(np.inf))
    return changed


def test_describe_names_the_model_and_fingerprints_every_moe_layer(client, gates):
    described = client.describe()
    assert described["family"] == "mixtral"
    assert described["model"]
    assert (described["hidden_size"], described["num_experts"], described["top_k"]) == (64, 8, 2)
    assert sorted(described["layers"]) == list(LAYERS)
    for layer, weight in gates.items():
        expected = hashlib.sha256(weight.astype("<f4").tobytes()).digest()
        assert described["layers"][layer] == expected


def test_gate_fingerprint_hashes_float32_values_weight_then_bias():
    weight = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    bias = np.array([0.5, -1.0, 2.0], dtype=np.float32)
    assert moemesh.gate_fingerprint(weight) == hashlib.sha256(weight.tobytes()).digest()
    both = hashlib.sha256(weight.tobytes() + bias.tobytes()).digest()
    assert moemesh.gate_fingerprint(weight, bias) == both
    # gpt-oss's logit bias comes after the weight (and a score bias, had it one).
    assert moemesh.gate_fingerprint(weight, None, bias) == both
    three = hashlib.sha256(weight.tobytes() + bias.tobytes() + (2 * bias).tobytes()).digest()
    assert moemesh.gate_fingerprint(weight, bias, 2 * bias) == three
    # The same float32 values held in other dtypes or layouts hash alike.
    assert moemesh.gate_fingerprint(weight.astype(np.float64), bias.tolist()) == both
    assert moemesh.gate_fingerprint(np.asfortranarray(weight), bias) == both
    assert moemesh.gate_fingerprint(nudged(np.ones((4, 6), np.float32))) != (
        moemesh.gate_fingerprint(np.ones((4, 6), np.float32))
    )


def test_the_fixtures_own_gates_match_what_the_cluster_serves(client, gates):
    moemesh.check_fingerprints(
        fingerprints(gates), client.describe(), hidden_size=HIDDEN_SIZE, num_experts=EXPERTS
    )


def test_one_changed_gate_value_is_a_mismatch_naming_its_layer(client, gates):
    local = fingerprints({0: gates[0], 1: nudged(gates[1])})
    with pytest.raises(moemesh.ModelMismatch) as raised:
        moemesh.check_fingerprints(local, client.describe())
    mismatch = raised.value
    assert isinstance(mismatch, moemesh.MoemeshError)
    assert mismatch.layer == 1
    assert mismatch.code == "FAILED_PRECONDITION"
    assert mismatch.message.startswith("layer 1: the gate weights differ")
    assert "FAILED_PRECONDITION" in str(mismatch)


def test_a_layer_missing_on_either_side_is_a_mismatch_naming_it(client, gates):
    served = client.describe()
    with pytest.raises(moemesh.ModelMismatch, match="layer 0: the cluster serves MoE layer 0"):
        moemesh.check_fingerprints(fingerprints({1: gates[1]}), served)
    extra = {**fingerprints(gates), 2: moemesh.gate_fingerprint(gates[0])}
    with pytest.raises(moemesh.ModelMismatch, match="layer 2: the model has an MoE layer 2") as raised:
        moemesh.check_fingerprints(extra, served)
    assert raised.value.layer == 2


def test_another_hidden_size_or_expert_count_is_a_mismatch(client, gates):
    served = client.describe()
    with pytest.raises(moemesh.ModelMismatch, match="hidden size 128") as raised:
        moemesh.check_fingerprints(fingerprints(gates), served, hidden_size=128)
    assert raised.value.layer is None
    with pytest.raises(moemesh.ModelMismatch, match="routed experts per layer 16"):
        moemesh.check_fingerprints(fingerprints(gates), served, num_experts=16)


class StandInExperts:
    """Quacks like transformers 5's experts modules; never run here."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        raise AssertionError("a refused model's experts are never called")


class StandInModel:
    """The parts of a transformers model that `attach` reads before it
    changes anything: its named modules, each sparse MoE block's `gate`
    (a numpy weight here) and its `experts`."""

    def __init__(self, gates, experts=StandInExperts):
        self.blocks = {
            layer: SimpleNamespace(gate=SimpleNamespace(weight=weight), experts=experts())
            for layer, weight in gates.items()
        }

    def named_modules(self):
        yield "", self
        for layer, block in self.blocks.items():
            prefix = f"model.layers.{layer}"
            yield f"{prefix}.self_attn", SimpleNamespace()
            yield f"{prefix}.block_sparse_moe", block
            yield f"{prefix}.block_sparse_moe.gate", block.gate
            yield f"{prefix}.block_sparse_moe.experts", block.experts


def test_attach_refuses_a_model_with_another_gate_and_leaves_it_as_it_was(client, gates):
    model = StandInModel({0: gates[0], 1: nudged(gates[1])})
    experts = {layer: block.experts for layer, block in model.blocks.items()}
    with pytest.raises(moemesh.ModelMismatch, match="^FAILED_PRECONDITION: layer 1: ") as raised:
        moemesh.attach(model, client)
    assert raised.value.layer == 1
    assert {layer: block.experts for layer, block in model.blocks.items()} == experts


def test_attach_refuses_a_model_of_another_shape(client, gates):
    wider = {layer: np.zeros((EXPERTS, 2 * HIDDEN_SIZE), np.float32) for layer in LAYERS}
    with pytest.raises(moemesh.ModelMismatch, match="hidden size 128"):
        moemesh.attach(StandInModel(wider), client)
    more_experts = {layer: np.zeros((2 * EXPERTS, HIDDEN_SIZE), np.float32) for layer in LAYERS}
    with pytest.raises(moemesh.ModelMismatch, match="routed experts per layer 16"):
        moemesh.attach(StandInModel(more_experts), client)


def test_attach_refuses_experts_without_the_transformers_5_interface(client, gates):
    class ExpertList:
        """transformers 4's experts: a list of MLPs, not called as one module."""

        def forward(self, *inputs):
            raise NotImplementedError

    with pytest.raises(TypeError, match="transformers 5"):
        moemesh.attach(StandInModel(gates, experts=ExpertList), client)
    with pytest.raises(ValueError, match="no sparse MoE block"):
        moemesh.attach(StandInModel({}), client)


def test_zero_weight_repeats_move_to_experts_the_token_does_not_use():
    from moemesh.attach import distinct_expert_ids

    ids = np.array([[4, 4, 1], [0, 1, 2], [3, 3, 3], [2, 2, 5]])
    weights = np.array(
        [[0.5, 0.0, 0.5], [0.2, 0.3, 0.5], [0.0, 0.7, 0.0], [0.5, 0.5, 0.0]], dtype=np.float32
    )
    moved = distinct_expert_ids(ids, weights, EXPERTS)
    # A zero-weight repeat takes the smallest id the token does not use.
    assert moved[0].tolist() == [4, 0, 1]
    assert moved[1].tolist() == [0, 1, 2]
    # The weighted pick keeps its id; both zero-weight repeats move.
    assert moved[2].tolist() == [0, 3, 1]
    # Repeats with weight are left for the cluster to refuse.
    assert moved[3].tolist() == [2, 2, 5]
    assert ids[0].tolist() == [4, 4, 1], "the input is not changed"
    distinct = ids[1:2]
    assert distinct_expert_ids(distinct, weights[1:2], EXPERTS) is distinct
