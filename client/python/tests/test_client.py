"""The moemesh Python package against a local cluster (`moemesh up`) serving
the Mixtral golden fixture: outputs match the committed expected outputs,
and errors raise the exceptions that carry their gRPC code.

Needs numpy, safetensors and pytest, and the moemesh binary: MOEMESH_BIN,
or target/debug/moemesh of this repository (conftest.py starts the cluster).
"""

import threading
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import moemesh

REPO = Path(__file__).resolve().parents[3]
MIXTRAL = REPO / "tests" / "fixtures" / "mixtral"
# The golden fixtures hold the reference's outputs in f32.
TOLERANCE = 1e-5
# The Mixtral fixture's MoE layers, experts per layer and experts per token.
LAYERS = (0, 1)
EXPERTS = 8
TOP_K = 2


@pytest.fixture(scope="session")
def expected():
    return load_file(str(MIXTRAL / "expected.safetensors"))


def relative_error(actual, reference):
    return float(np.linalg.norm(actual - reference) / np.linalg.norm(reference))


def mixtral_routing(hidden, layer):
    """Mixtral's gate in numpy: softmax over the experts' logits, the top 2,
    their weights renormalised to sum to 1."""
    checkpoint = load_file(str(MIXTRAL / "model.safetensors"))
    gate = checkpoint[f"model.layers.{layer}.block_sparse_moe.gate.weight"]
    logits = hidden.astype(np.float64) @ gate.T.astype(np.float64)
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    expert_ids = np.argsort(-probabilities, axis=1, kind="stable")[:, :TOP_K]
    weights = np.take_along_axis(probabilities, expert_ids, axis=1)
    weights /= weights.sum(axis=1, keepdims=True)
    return expert_ids, weights.astype(np.float32)


@pytest.mark.parametrize("layer", LAYERS)
def test_forward_matches_the_golden_output(client, expected, layer):
    hidden = expected[f"layer{layer}.input"]
    output = client.forward(layer, hidden)
    assert output.dtype == np.float32
    assert output.shape == hidden.shape
    assert relative_error(output, expected[f"layer{layer}.output"]) < TOLERANCE


@pytest.mark.parametrize("layer", LAYERS)
def test_forward_routed_with_the_gate_in_numpy_matches_the_golden_output(client, expected, layer):
    hidden = expected[f"layer{layer}.input"]
    expert_ids, weights = mixtral_routing(hidden, layer)
    output = client.forward_routed(layer, hidden, expert_ids, weights)
    assert output.shape == hidden.shape
    assert relative_error(output, expected[f"layer{layer}.output"]) < TOLERANCE


def test_float64_strided_and_buffer_inputs_are_converted(client, expected):
    hidden = expected["layer1.input"]
    reference = expected["layer1.output"]
    fortran_order = np.asfortranarray(hidden.astype(np.float64))
    assert relative_error(client.forward(1, fortran_order), reference) < TOLERANCE
    # Every other token: a strided view.
    every_other = np.repeat(hidden, 2, axis=0)[::2]
    assert relative_error(client.forward(1, every_other), reference) < TOLERANCE
    # The buffer protocol, as objects other than numpy arrays offer it.
    assert relative_error(client.forward(1, memoryview(hidden)), reference) < TOLERANCE


def test_one_client_serves_several_threads_at_once(client, expected):
    hidden = expected["layer0.input"]
    outputs = [None] * 4

    def forward(index):
        outputs[index] = client.forward(0, hidden[index::4])

    threads = [threading.Thread(target=forward, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, output in enumerate(outputs):
        assert relative_error(output, expected["layer0.output"][index::4]) < TOLERANCE


def test_a_wrong_hidden_size_is_an_invalid_argument(client):
    with pytest.raises(moemesh.InvalidArgument) as raised:
        client.forward(0, np.zeros((2, 63), dtype=np.float32))
    assert isinstance(raised.value, moemesh.MoemeshError)
    assert raised.value.code == "INVALID_ARGUMENT"
    assert raised.value.message
    assert "INVALID_ARGUMENT" in str(raised.value)


def test_an_unknown_layer_is_an_invalid_argument(client):
    with pytest.raises(moemesh.InvalidArgument):
        client.forward(7, np.zeros((1, 64), dtype=np.float32))


@pytest.mark.parametrize("bad_id", [EXPERTS, -1])
def test_expert_ids_out_of_range_are_invalid_arguments(client, expected, bad_id):
    hidden = expected["layer0.input"][:3]
    expert_ids = np.array([[0, 1], [2, bad_id], [4, 5]])
    weights = np.full((3, TOP_K), 0.5, dtype=np.float32)
    with pytest.raises(moemesh.InvalidArgument) as raised:
        client.forward_routed(0, hidden, expert_ids, weights)
    assert raised.value.code == "INVALID_ARGUMENT"
    assert str(bad_id) in raised.value.message


def test_a_repeated_expert_within_a_token_is_an_invalid_argument(client, expected):
    hidden = expected["layer0.input"][:1]
    with pytest.raises(moemesh.InvalidArgument):
        client.forward_routed(0, hidden, np.array([[3, 3]]), np.array([[0.5, 0.5]]))


def test_shapes_and_dtypes_are_checked_before_sending(client, expected):
    hidden = expected["layer0.input"][:2]
    with pytest.raises(ValueError, match="hidden"):
        client.forward(0, hidden[0])
    with pytest.raises(TypeError, match="hidden"):
        client.forward(0, hidden.astype(np.int32))
    with pytest.raises(TypeError, match="expert_ids"):
        client.forward_routed(0, hidden, np.zeros((2, 2), dtype=np.float32), np.ones((2, 2)))
    with pytest.raises(ValueError, match="weights"):
        client.forward_routed(0, hidden, np.zeros((2, 2), dtype=np.int64), np.ones((2, 3)))
    with pytest.raises(ValueError, match="tokens"):
        client.forward_routed(0, hidden, np.zeros((3, 2), dtype=np.int64), np.ones((3, 2)))


def test_an_unreachable_router_is_unavailable():
    # Nothing listens on port 1 of the loopback: connecting is refused at once.
    with pytest.raises(moemesh.Unavailable) as raised:
        moemesh.Client("http://127.0.0.1:1", cluster_secret="s" * 16)
    assert raised.value.code == "UNAVAILABLE"
    assert "127.0.0.1:1" in raised.value.message


def test_options_are_checked():
    with pytest.raises(ValueError, match="tls_key"):
        moemesh.Client("https://127.0.0.1:1", tls_cert="cert.pem")
    for deadline_s in (0, -1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="deadline_s"):
            moemesh.Client("http://127.0.0.1:1", deadline_s=deadline_s)


def test_the_package_names_its_version_and_exceptions():
    assert moemesh.__version__.count(".") == 2
    for exception in (moemesh.InvalidArgument, moemesh.Unavailable, moemesh.ResourceExhausted,
                      moemesh.DeadlineExceeded, moemesh.PermissionDenied, moemesh.Unauthenticated):
        assert issubclass(exception, moemesh.MoemeshError)
    assert issubclass(moemesh.MoemeshError, Exception)
