"""Our BF16 product (glm_core/models/kernels/bf16_cpu.cpp) and the BF16 model layers that use it
(glm_core/models/bf16_linear.py): each path equal to the product in float64 rounded to BFloat16, up to the order
of float additions; each output row the same bits wherever it sits (what fusing relies on); a model on it gives
PyTorch's product's logits within that bound, and the compiled step gives its eager tokens."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from glm_core import ModelSpec
from glm_core.models import cpu_kernels, loading
from glm_core.models.bf16_linear import KernelBf16Linear, takes_kernel, use_bf16_kernel
from glm_core.models.fused import FusedGateUpMLP, FusedQKVAttention, _fused_linear


def paths() -> list:
    why_not = cpu_kernels.built_library()
    if isinstance(why_not, str):
        pytest.skip(f"our CPU kernels cannot run here: {why_not}")
    ops = [("avx2", torch.ops.glm_cpu.bf16_mm.default)]
    if torch.ops.glm_cpu.avx512_bf16_supported():
        ops.append(("avx512", torch.ops.glm_cpu.bf16_mm_avx512.default))
    return ops


@pytest.fixture(scope="module")
def ops():
    return paths()


@pytest.fixture
def our_product(ops, monkeypatch):
    """Our product chosen (its fastest path here), for up to 16 rows, whatever it measured."""
    monkeypatch.setattr(cpu_kernels, "_bf16_chosen", True)
    monkeypatch.setattr(cpu_kernels, "BF16_MM", ops[-1][1])
    monkeypatch.setattr(cpu_kernels, "BF16_MAX_ROWS", 16)
    return ops[-1][1]


def within_rounding(got: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    """`got` is x @ weight.T rounded to BFloat16, but for float sums in another order: within one BFloat16 step
    of the exact product, plus the float error of summing |x| |w|."""
    exact = x.double() @ weight.double().T
    bound = exact.abs() * 2**-8 + (x.double().abs() @ weight.double().abs().T) * 2**-20
    assert got.dtype == torch.bfloat16 and got.shape == exact.shape
    assert ((got.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, 16])
@pytest.mark.parametrize("out_features, in_features", [(576, 576), (50, 96), (3, 32)])
def test_each_path_is_the_product_rounded_to_bfloat16(ops, rows, out_features, in_features):
    generator = torch.Generator().manual_seed(rows * out_features)
    x = torch.randn(rows, in_features, generator=generator).to(torch.bfloat16)
    weight = torch.randn(out_features, in_features, generator=generator).to(torch.bfloat16)
    for _, op in ops:
        within_rounding(op(x, weight), x, weight)
    within_rounding(F.linear(x, weight), x, weight)  # the bound holds PyTorch's product too


def test_a_row_gives_the_same_bits_wherever_it_sits(ops):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(6, 128, generator=generator).to(torch.bfloat16)
    weight = torch.randn(23, 128, generator=generator).to(torch.bfloat16)  # 5 tiles of 4 and 3 single rows
    for _, op in ops:
        whole = op(x, weight)
        assert torch.equal(whole[:, 20:], op(x, weight[20:]))  # the single rows as a tile's
        assert torch.equal(whole[:, 3:7], op(x, weight[3:7].contiguous()))
        assert torch.equal(whole[4:5], op(x[4:5], weight))  # an activation row alone or among others


def test_bad_arguments_are_refused(ops):
    weight = torch.randn(8, 64).to(torch.bfloat16)
    for _, op in ops:
        with pytest.raises(RuntimeError, match="bfloat16"):
            op(torch.randn(1, 64), weight)
        with pytest.raises(RuntimeError, match="tile by 32"):
            op(torch.randn(1, 48).to(torch.bfloat16), torch.randn(8, 48).to(torch.bfloat16))
        with pytest.raises(RuntimeError, match="tile by 32"):
            op(torch.randn(1, 32).to(torch.bfloat16), weight)
        with pytest.raises(RuntimeError, match="contiguous"):
            op(torch.randn(1, 8).to(torch.bfloat16), weight.T)
        assert op(torch.empty(0, 64, dtype=torch.bfloat16), weight).shape == (0, 8)


def test_the_layer_takes_decode_rows_and_leaves_a_prompt_to_pytorch(our_product, monkeypatch):
    linear = nn.Linear(64, 24, bias=True, dtype=torch.bfloat16)
    assert takes_kernel(linear) and not takes_kernel(nn.Linear(48, 8, dtype=torch.bfloat16))
    assert not takes_kernel(nn.Linear(64, 8))  # float32
    model = nn.Sequential(linear)
    assert use_bf16_kernel(model) == 1 and type(linear) is KernelBf16Linear
    calls = []
    monkeypatch.setattr(cpu_kernels, "BF16_MM", lambda x, w: calls.append(x.shape[0]) or our_product(x, w))
    x = torch.randn(2, 8, 64).to(torch.bfloat16)
    y = linear(x[:, :1])  # two rows, a step of two streams
    assert calls == [2] and y.shape == (2, 1, 24)
    assert torch.equal(y, (our_product(x[:, 0], linear.weight) + linear.bias)[:, None])
    linear(x)  # 16 rows: still ours
    linear(torch.randn(17, 64).to(torch.bfloat16))  # more: PyTorch's
    assert calls == [2, 16]
    monkeypatch.setattr(cpu_kernels, "BF16_MM", None)
    assert use_bf16_kernel(nn.Sequential(nn.Linear(64, 8, dtype=torch.bfloat16))) == 0


def test_fused_bf16_parts_give_each_parts_bits(our_product):
    parts = [KernelBf16Linear(64, n, bias=True, dtype=torch.bfloat16) for n in (24, 6, 6)]
    joined = _fused_linear(parts)
    x = torch.randn(3, 64).to(torch.bfloat16)
    assert joined.out_features == 36 and torch.equal(joined(x), torch.cat([p(x) for p in parts], dim=-1))
    assert _fused_linear([parts[0], KernelBf16Linear(64, 8, bias=False, dtype=torch.bfloat16)]) is None


def test_a_bf16_model_on_it_gives_pytorchs_logits_within_rounding(tiny_model_dir, our_product, monkeypatch):
    ours = loading.load_model(ModelSpec(str(tiny_model_dir), "bf16", "cpu"))
    layer = ours.model.model.layers[0]
    assert isinstance(layer.self_attn, FusedQKVAttention) and isinstance(layer.mlp, FusedGateUpMLP)
    assert type(layer.self_attn.o_proj) is KernelBf16Linear and "BF16 layers" in ours.card().kernel
    monkeypatch.setattr(cpu_kernels, "BF16_MM", None)
    theirs = loading.load_model(ModelSpec(str(tiny_model_dir), "bf16", "cpu"))
    assert type(theirs.model.model.layers[0].self_attn.o_proj) is nn.Linear and not theirs.card().kernel
    ids = torch.tensor([ours.chat_format.encode([{"role": "user", "content": "Name three rivers of Europe."}])])
    steps = {}
    with torch.inference_mode():
        for name, loaded, product in (("ours", ours, our_product), ("theirs", theirs, None)):
            monkeypatch.setattr(cpu_kernels, "BF16_MM", product)
            out = loaded.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=6,
                min_new_tokens=6,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=2,
            )
            steps[name] = torch.stack(out.logits).float()
    # Decode steps (one row: our product) agree with PyTorch's to BFloat16's precision, accumulated over layers.
    torch.testing.assert_close(steps["ours"], steps["theirs"], rtol=0.05, atol=0.05)


@pytest.mark.slow  # compiles a graph: left out of `make test-fast`
def test_compiled_steps_on_our_bf16_product_give_the_eager_tokens(tiny_model_dir, our_product):
    from test_fast_decode import check_exact

    loaded = loading.load_model(ModelSpec(str(tiny_model_dir), "bf16", "cpu"))
    assert type(loaded.model.model.layers[0].self_attn.o_proj) is KernelBf16Linear
    check_exact(loaded, [12, 4], max_batch=1)
