"""Our dense product (glm_core/models/kernels/dense_cpu.cpp) and the BF16 and FP32 model layers that use it
(glm_core/models/dense_linear.py): each path equal to the product in float64 (BF16: rounded to BFloat16), up to
the order of float additions; each output row the same bits wherever it sits (what fusing relies on); a model on
it gives PyTorch's product's logits within that bound, and the compiled step gives its eager tokens."""

import pytest
import torch
import torch.nn.functional as F
from test_fused import greedy_with_logits
from torch import nn

from glm_core import ModelSpec
from glm_core.models import cpu_kernels, loading
from glm_core.models.dense_linear import KernelLinear, takes_kernel, use_dense_kernel
from glm_core.models.fused import FusedGateUpMLP, FusedQKVAttention, _fused_linear


def like_a_loaded_model(reference: nn.Module) -> nn.Module:
    """A transformers model (a test's reference) with what `load_model` does to a float model's layers on the CPU:
    our dense product where chosen, q/k/v and gate/up fused; so both multiply alike and compare bit for bit."""
    from glm_core.models.fused import fuse_projections

    use_dense_kernel(reference)
    fuse_projections(reference)
    return reference


def paths() -> list:
    why_not = cpu_kernels.built_library()
    if isinstance(why_not, str):
        pytest.skip(f"our CPU kernels cannot run here: {why_not}")
    ops = [(torch.bfloat16, torch.ops.glm_cpu.bf16_mm.default)]
    if torch.ops.glm_cpu.avx512_bf16_supported():
        ops.append((torch.bfloat16, torch.ops.glm_cpu.bf16_mm_avx512.default))
    return [*ops, (torch.float32, torch.ops.glm_cpu.f32_mm.default)]


@pytest.fixture(scope="module")
def ops():
    return paths()


@pytest.fixture
def our_product(ops, monkeypatch):
    """Our products chosen (BF16: its fastest path here), for up to 16 rows, whatever they measured; the BF16 op."""
    monkeypatch.setattr(cpu_kernels, "_dense_chosen", {torch.bfloat16, torch.float32})
    monkeypatch.setattr(cpu_kernels, "BF16_MM", ops[-2][1])
    monkeypatch.setattr(cpu_kernels, "F32_MM", ops[-1][1])
    monkeypatch.setattr(cpu_kernels, "BF16_MAX_ROWS", 16)
    monkeypatch.setattr(cpu_kernels, "F32_MAX_ROWS", 16)
    return ops[-2][1]


def within_rounding(got: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    """`got` is x @ weight.T in x's dtype, but for float sums in another order: within one step of that dtype
    (BF16) of the exact product, plus the float error of summing |x| |w|."""
    exact = x.double() @ weight.double().T
    step = 2**-8 if x.dtype == torch.bfloat16 else 0.0
    bound = exact.abs() * step + (x.double().abs() @ weight.double().abs().T) * 2**-20
    assert got.dtype == x.dtype and got.shape == exact.shape
    assert ((got.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, 16])
@pytest.mark.parametrize("out_features, in_features", [(576, 576), (50, 96), (3, 32)])
def test_each_path_is_the_product_rounded_to_bfloat16(ops, rows, out_features, in_features):
    generator = torch.Generator().manual_seed(rows * out_features)
    x = torch.randn(rows, in_features, generator=generator)
    weight = torch.randn(out_features, in_features, generator=generator)
    for dtype, op in ops:
        within_rounding(op(x.to(dtype), weight.to(dtype)), x.to(dtype), weight.to(dtype))
        within_rounding(F.linear(x.to(dtype), weight.to(dtype)), x.to(dtype), weight.to(dtype))  # PyTorch's too


def test_a_row_gives_the_same_bits_wherever_it_sits(ops):
    generator = torch.Generator().manual_seed(1)
    for dtype, op in ops:
        x = torch.randn(6, 128, generator=generator).to(dtype)
        weight = torch.randn(23, 128, generator=generator).to(dtype)
        whole = op(x, weight)  # activation rows 0-3 together, then 4-5
        assert torch.equal(whole[:, 20:], op(x, weight[20:]))  # an output row wherever it sits in the weight
        assert torch.equal(whole[:, 3:7], op(x, weight[3:7].contiguous()))
        for row in (1, 4):  # an activation row alone, among 4 or among 2
            assert torch.equal(whole[row : row + 1], op(x[row : row + 1], weight))
        assert torch.equal(whole[2:5], op(x[2:5], weight))  # among 3


def test_bad_arguments_are_refused(ops):
    for dtype, op in ops:
        weight = torch.randn(8, 64).to(dtype)
        other = torch.float16
        with pytest.raises(RuntimeError, match="bfloat16" if dtype == torch.bfloat16 else "float32"):
            op(torch.randn(1, 64).to(other), weight)
        with pytest.raises(RuntimeError, match="tile by 32"):
            op(torch.randn(1, 48).to(dtype), torch.randn(8, 48).to(dtype))
        with pytest.raises(RuntimeError, match="tile by 32"):
            op(torch.randn(1, 32).to(dtype), weight)
        with pytest.raises(RuntimeError, match="contiguous"):
            op(torch.randn(1, 8).to(dtype), weight.T)
        assert op(torch.empty(0, 64, dtype=dtype), weight).shape == (0, 8)


def test_the_layer_takes_decode_rows_and_leaves_a_prompt_to_pytorch(our_product, monkeypatch):
    linear = nn.Linear(64, 24, bias=True, dtype=torch.bfloat16)
    assert takes_kernel(linear) and not takes_kernel(nn.Linear(48, 8, dtype=torch.bfloat16))
    assert takes_kernel(nn.Linear(64, 8)) and not takes_kernel(nn.Linear(64, 8, dtype=torch.float16))
    model = nn.Sequential(linear)
    assert use_dense_kernel(model) == 1 and type(linear) is KernelLinear
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
    assert use_dense_kernel(nn.Sequential(nn.Linear(64, 8, dtype=torch.bfloat16))) == 0
    assert use_dense_kernel(nn.Sequential(nn.Linear(64, 8))) == 1  # FP32: our op still chosen


def test_fused_bf16_parts_give_each_parts_bits(our_product):
    parts = [KernelLinear(64, n, bias=True, dtype=torch.bfloat16) for n in (24, 6, 6)]
    joined = _fused_linear(parts)
    x = torch.randn(3, 64).to(torch.bfloat16)
    assert joined.out_features == 36 and torch.equal(joined(x), torch.cat([p(x) for p in parts], dim=-1))
    assert _fused_linear([parts[0], KernelLinear(64, 8, bias=False, dtype=torch.bfloat16)]) is None


@pytest.mark.parametrize("level, op_name, tolerance", [("bf16", "BF16_MM", 0.05), ("fp32", "F32_MM", 1e-4)])
def test_a_model_on_it_gives_pytorchs_logits_within_rounding(
    tiny_model_dir, our_product, monkeypatch, level, op_name, tolerance
):
    ours = loading.load_model(ModelSpec(str(tiny_model_dir), level, "cpu"))
    layer = ours.model.model.layers[0]
    assert isinstance(layer.self_attn, FusedQKVAttention) and isinstance(layer.mlp, FusedGateUpMLP)
    assert type(layer.self_attn.o_proj) is KernelLinear and f"{level.upper()} layers" in ours.card().kernel
    product = getattr(cpu_kernels, op_name)
    monkeypatch.setattr(cpu_kernels, op_name, None)
    theirs = loading.load_model(ModelSpec(str(tiny_model_dir), level, "cpu"))
    assert type(theirs.model.model.layers[0].self_attn.o_proj) is nn.Linear and not theirs.card().kernel
    ids = torch.tensor([ours.chat_format.encode([{"role": "user", "content": "Name three rivers of Europe."}])])
    steps = {}
    with torch.inference_mode():
        for name, loaded, op in (("ours", ours, product), ("theirs", theirs, None)):
            monkeypatch.setattr(cpu_kernels, op_name, op)
            steps[name] = greedy_with_logits(loaded.model, ids, 6)[1].float()
    # Decode steps (one row: our product) agree with PyTorch's to the level's precision, accumulated over layers.
    torch.testing.assert_close(steps["ours"], steps["theirs"], rtol=tolerance, atol=tolerance)


@pytest.mark.slow  # compiles a graph: left out of `make test-fast`
def test_compiled_steps_on_our_dense_product_give_the_eager_tokens(tiny_model_dir, our_product):
    from test_fast_decode import check_exact

    loaded = loading.load_model(ModelSpec(str(tiny_model_dir), "bf16", "cpu"))
    assert type(loaded.model.model.layers[0].self_attn.o_proj) is KernelLinear
    check_exact(loaded, [12, 4], max_batch=1)
