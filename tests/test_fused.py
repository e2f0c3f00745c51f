"""INT4 products fused by layer (glm_core/models/fused.py): the same logits, prompt and decode steps, as the layers
made one by one, on our CPU kernel; left alone where the parts cannot be joined exactly."""

import pytest
import torch
from test_quant import our_int4_op

from glm_core import ModelSpec
from glm_core.models import cpu_kernels, loading
from glm_core.models.fused import FusedGateUpMLP, FusedQKVAttention, _fused_linear, fuse_projections
from glm_core.models.quant import WeightOnlyInt4Linear


def greedy_with_logits(model, ids: torch.Tensor, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' greedy `generate` of exactly `tokens` tokens: the sequences and each decode step's logits."""
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=2,
    )
    return out.sequences, torch.stack(out.logits)


@pytest.fixture
def our_kernel(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_chosen", True)
    monkeypatch.setattr(cpu_kernels, "INT4_MM", our_int4_op())


def test_fused_layers_give_the_same_logits_as_the_layers_one_by_one(tiny_model_dir, our_kernel, monkeypatch):
    fused = loading.load_model(ModelSpec(str(tiny_model_dir), "int4", "cpu"))
    layers = fused.model.model.layers
    assert all(isinstance(layer.self_attn, FusedQKVAttention) for layer in layers)
    assert all(isinstance(layer.mlp, FusedGateUpMLP) for layer in layers)
    assert "fused in 4 modules" in fused.card().kernel
    monkeypatch.setattr(loading, "fuse_projections", lambda model: 0)
    apart = loading.load_model(ModelSpec(str(tiny_model_dir), "int4", "cpu"))
    assert not isinstance(apart.model.model.layers[0].self_attn, FusedQKVAttention)
    assert fused.weights == apart.weights  # the same bytes, joined

    ids = torch.tensor([fused.chat_format.encode([{"role": "user", "content": "Name three rivers of Europe."}])])
    with torch.inference_mode():
        assert torch.equal(fused.model(ids).logits, apart.model(ids).logits)  # the prompt: several rows at once
        steps = {
            name: greedy_with_logits(loaded.model, ids, 8) for name, loaded in (("fused", fused), ("apart", apart))
        }
    assert torch.equal(steps["fused"][0], steps["apart"][0])
    assert torch.equal(steps["fused"][1], steps["apart"][1])  # each decode step's logits, one row each


def test_parts_that_cannot_be_joined_exactly_stay_apart(our_kernel):
    def layer(out_features, bias=False, in_features=64):
        module = WeightOnlyInt4Linear(in_features, out_features, bias, torch.float32, group_size=32)
        module.set_weight(torch.randn(out_features, in_features))
        if bias:
            module.bias.data.normal_()
        return module

    x = torch.randn(3, 64)
    joined = _fused_linear([layer(16, True), layer(8, True)])
    assert joined is not None and joined.out_features == 24
    parts = [layer(16, True), layer(8, True)]
    joined = _fused_linear(parts)
    assert torch.equal(joined(x), torch.cat([p(x) for p in parts], dim=-1))
    assert _fused_linear([layer(16), layer(12)]) is None  # 12 rows: not whole tiles of 8
    assert _fused_linear([layer(16), layer(8, True)]) is None  # one with a bias, one without
    assert _fused_linear([layer(16), layer(16, in_features=96)]) is None  # other inputs


def test_nothing_is_fused_on_pytorchs_int4_kernel(tiny_loaded, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "INT4_MM", None)
    assert fuse_projections(tiny_loaded.model) == 0


@pytest.mark.slow  # compiles a graph: left out of `make test-fast`
def test_compiled_steps_of_fused_layers_give_the_eager_tokens(tiny_model_dir, our_kernel):
    from test_fast_decode import check_exact

    loaded = loading.load_model(ModelSpec(str(tiny_model_dir), "int4", "cpu"))
    assert isinstance(loaded.model.model.layers[0].mlp, FusedGateUpMLP)
    check_exact(loaded, [12, 4], max_batch=1)  # one graph (each batch size is another compile)
