"""One hop: `moemesh.Client(coordinator=..., checkpoint=...)` follows the
coordinators' placement of conftest.py's cluster and sends each token
straight to the expert nodes. It answers what the router answers, bit for
bit, and refuses what the router refuses.
"""

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import moemesh

MIXTRAL = Path(__file__).resolve().parents[3] / "tests" / "fixtures" / "mixtral"
LAYERS = (0, 1)
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def expected():
    return load_file(str(MIXTRAL / "expected.safetensors"))


def relative_error(actual, reference):
    return float(np.linalg.norm(actual - reference) / np.linalg.norm(reference))


@pytest.mark.parametrize("layer", LAYERS)
def test_one_hop_forward_is_the_routers_bit_for_bit(one_hop_client, client, expected, layer):
    hidden = expected[f"layer{layer}.input"]
    output = one_hop_client.forward(layer, hidden)
    assert output.dtype == np.float32 and output.shape == hidden.shape
    assert relative_error(output, expected[f"layer{layer}.output"]) < TOLERANCE
    np.testing.assert_array_equal(output, client.forward(layer, hidden))


def test_one_hop_forward_routed_is_the_routers_bit_for_bit(one_hop_client, client, expected):
    hidden = expected["layer1.input"]
    tokens = hidden.shape[0]
    rng = np.random.default_rng(3)
    expert_ids = np.stack([rng.choice(8, size=2, replace=False) for _ in range(tokens)])
    weights = rng.random((tokens, 2), dtype=np.float32)
    output = one_hop_client.forward_routed(1, hidden, expert_ids, weights)
    np.testing.assert_array_equal(output, client.forward_routed(1, hidden, expert_ids, weights))


def test_one_hop_describes_the_checkpoint_as_the_router_does(one_hop_client, client):
    assert one_hop_client.describe() == client.describe()


def test_one_hop_refuses_what_the_router_refuses(one_hop_client, expected):
    hidden = expected["layer1.input"]
    with pytest.raises(moemesh.InvalidArgument) as raised:
        one_hop_client.forward(7, hidden)
    assert raised.value.code == "INVALID_ARGUMENT"
    with pytest.raises(moemesh.InvalidArgument, match="hidden size"):
        one_hop_client.forward(1, hidden[:, :32])
    ids = np.array([[0, 8]] * hidden.shape[0])
    weights = np.ones(ids.shape, dtype=np.float32)
    with pytest.raises(moemesh.InvalidArgument, match="out of range"):
        one_hop_client.forward_routed(1, hidden, ids, weights)


def test_a_model_the_coordinators_do_not_place_is_unavailable_after_the_deadline(cluster):
    with pytest.raises(moemesh.Unavailable) as raised:
        cluster.one_hop_client(model="no-such-model", deadline_s=3)
    assert "no-such-model" in raised.value.message


def test_one_hop_needs_the_checkpoint_and_one_destination(cluster):
    with pytest.raises(ValueError, match="checkpoint"):
        moemesh.Client(coordinator=cluster.coordinators, cluster_secret=cluster.cluster_secret)
    with pytest.raises(ValueError, match="not both"):
        moemesh.Client(cluster.router, coordinator=cluster.coordinators, checkpoint=MIXTRAL)
    with pytest.raises(ValueError, match="router's URL"):
        moemesh.Client()
    with pytest.raises(ValueError, match="one-hop"):
        moemesh.Client(cluster.router, checkpoint=MIXTRAL)


def test_a_checkpoint_the_client_cannot_read_is_an_invalid_argument(cluster, tmp_path):
    with pytest.raises(moemesh.InvalidArgument) as raised:
        cluster.one_hop_client(checkpoint=tmp_path, model="mixtral", deadline_s=5)
    assert str(tmp_path) in raised.value.message
    assert "config.json" in raised.value.message
