"""`moemesh.attach` on a real transformers Mixtral model holding the Mixtral
fixture's gates and experts, against conftest.py's cluster serving that
fixture: the attached model computes what the local one does, `detach`
restores the very modules it replaced, and a model with other gates or in
another dtype is refused untouched. Skipped where torch or transformers
is not installed (examples/generate.py covers every family end to end).
"""

from pathlib import Path

import pytest
from safetensors.numpy import load_file

import moemesh

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

MIXTRAL = Path(__file__).resolve().parents[3] / "tests" / "fixtures" / "mixtral"
LAYERS = (0, 1)
EXPERTS = 8
# The cluster and torch sum the same f32 products in different orders.
TOLERANCE = 1e-4


def mixtral_model(seed, with_fixture_weights):
    """A two-layer Mixtral of the fixture's config, random apart from the
    MoE blocks, which hold the fixture's gates and experts when asked."""
    torch.manual_seed(seed)
    config = transformers.MixtralConfig.from_pretrained(MIXTRAL)
    config.vocab_size = 128
    model = transformers.MixtralForCausalLM(config).eval()
    if not with_fixture_weights:
        return model
    checkpoint = load_file(str(MIXTRAL / "model.safetensors"))
    with torch.no_grad():
        for layer in LAYERS:
            prefix = f"model.layers.{layer}.block_sparse_moe"
            block = model.model.layers[layer].mlp
            block.gate.weight.copy_(torch.from_numpy(checkpoint[f"{prefix}.gate.weight"]))
            for expert in range(EXPERTS):
                weights = {
                    name: torch.from_numpy(checkpoint[f"{prefix}.experts.{expert}.{name}.weight"])
                    for name in ("w1", "w2", "w3")
                }
                block.experts.gate_up_proj[expert].copy_(torch.cat([weights["w1"], weights["w3"]]))
                block.experts.down_proj[expert].copy_(weights["w2"])
    return model


def logits(model):
    tokens = torch.arange(3, 3 + 2 * 9).reshape(2, 9) % 128
    with torch.no_grad():
        return model(tokens).logits


def test_an_attached_model_computes_what_the_local_one_does_until_detached(client):
    model = mixtral_model(seed=1, with_fixture_weights=True)
    local = logits(model)
    originals = [model.model.layers[layer].mlp.experts for layer in LAYERS]
    parameters = sum(parameter.numel() for parameter in model.parameters())

    assert moemesh.attach(model, client) is model
    remote = [model.model.layers[layer].mlp.experts for layer in LAYERS]
    assert [type(experts).__name__ for experts in remote] == ["RemoteExperts"] * 2
    assert [experts.layer for experts in remote] == list(LAYERS)
    assert sum(parameter.numel() for parameter in model.parameters()) < parameters
    attached = logits(model)
    assert attached.dtype == local.dtype
    assert torch.allclose(attached, local, atol=TOLERANCE, rtol=0)
    with pytest.raises(ValueError, match="already attached"):
        moemesh.attach(model, client)

    assert moemesh.detach(model) is model
    assert [model.model.layers[layer].mlp.experts for layer in LAYERS] == originals
    assert torch.equal(logits(model), local)
    moemesh.detach(model)  # not attached: nothing to undo


def test_remote_experts_answer_in_the_inputs_dtype(client):
    model = moemesh.attach(mixtral_model(seed=1, with_fixture_weights=True), client)
    experts = model.model.layers[0].mlp.experts
    hidden = torch.randn(3, 64, dtype=torch.bfloat16)
    top_k_index = torch.tensor([[0, 1], [2, 3], [7, 4]])
    top_k_weights = torch.full((3, 2), 0.5, dtype=torch.bfloat16)
    output = experts(hidden, top_k_index, top_k_weights)
    assert output.dtype == torch.bfloat16 and output.shape == hidden.shape
    expected = experts.original(hidden.float(), top_k_index, top_k_weights.float())
    assert torch.allclose(output.float(), expected, atol=1e-2, rtol=1e-2)
    assert experts(hidden[:0], top_k_index[:0], top_k_weights[:0]).shape == (0, 64)


def test_a_model_with_other_gates_is_refused_untouched(client):
    model = mixtral_model(seed=2, with_fixture_weights=False)
    experts = model.model.layers[0].mlp.experts
    with pytest.raises(moemesh.ModelMismatch, match="layer 0: the gate weights differ") as raised:
        moemesh.attach(model, client)
    assert raised.value.layer == 0
    assert model.model.layers[0].mlp.experts is experts


def test_the_checkpoint_loaded_in_bfloat16_is_refused(client):
    # The fixture stores float32: rounded gates are not what the cluster serves.
    model = mixtral_model(seed=1, with_fixture_weights=True).to(torch.bfloat16)
    with pytest.raises(moemesh.ModelMismatch, match="in the dtype it is stored in"):
        moemesh.attach(model, client)
