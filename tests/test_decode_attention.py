"""Our CPU decode attention (glm_core/models/kernels/decode_attention_cpu.cpp): one query a row over the slot
cache's views, equal to the attention written out in float64; the engine's replies with it equal transformers'
SDPA's where it is chosen."""

import pytest
import torch

from glm_core.engine import fast_decode
from glm_core.models import cpu_kernels


@pytest.fixture(scope="module")
def attention_op():
    why_not = cpu_kernels.built_library()
    if isinstance(why_not, str):
        pytest.skip(f"our CPU kernels cannot run here: {why_not}")
    return torch.ops.glm_cpu.decode_attention.default


def written_out(q, k, v, mask, scale):
    rows, heads, _, dim = q.shape
    groups = heads // k.shape[1]
    scores = (q.double().reshape(rows, k.shape[1], groups, dim) @ k.double().transpose(2, 3)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v.double()).reshape(rows, heads, 1, dim).transpose(1, 2)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize(
    "rows, heads, kv_heads, positions, dim", [(1, 9, 3, 256, 64), (5, 8, 2, 300, 32), (2, 4, 4, 40, 128)]
)
def test_equals_the_attention_written_out(attention_op, dtype, tolerance, rows, heads, kv_heads, positions, dim):
    generator = torch.Generator().manual_seed(rows)
    q = torch.randn(rows, heads, 1, dim, generator=generator).to(dtype)
    # The first `rows` slots of a bigger buffer, as the slot cache hands them over.
    keys, values = (torch.randn(rows + 3, kv_heads, positions, dim, generator=generator).to(dtype) for _ in range(2))
    k, v = keys[:rows], values[:rows]
    lengths = torch.randint(1, positions + 1, (rows,), generator=generator)
    mask = (torch.arange(positions)[None, :] < lengths[:, None])[:, None, None, :]
    for m in (mask, None):
        got = attention_op(q, k, v, m, dim**-0.5)
        assert got.shape == (rows, 1, heads, dim) and got.dtype == dtype
        want = written_out(q, k, v, m, dim**-0.5)
        assert (got.double() - want).abs().max().item() < tolerance
    hidden = mask.clone()
    hidden[0, ..., 0] = False  # a hidden position weighs nothing, whatever it holds
    k2 = k.clone()
    k2[0, :, 0] = 1e4
    assert torch.equal(attention_op(q, k2, v, hidden, 0.1), attention_op(q, k, v, hidden, 0.1))


def test_bad_shapes_are_refused(attention_op):
    q = torch.randn(1, 9, 1, 64)
    k = torch.randn(1, 3, 16, 64)
    with pytest.raises(RuntimeError, match="do not match"):
        attention_op(q, k, torch.randn(1, 3, 15, 64), None, 0.1)
    with pytest.raises(RuntimeError, match="bool"):
        attention_op(q, k, k, torch.ones(1, 1, 1, 16), 0.1)


def test_the_models_decode_attention_goes_to_it_and_matches_sdpa(attention_op, monkeypatch):
    """grouped_decode_attention, as a decode step calls it, through our op and through SDPA: the same output."""
    module = type("Attention", (), {"num_key_value_groups": 3})()
    q = torch.randn(4, 9, 1, 64)
    k, v = torch.randn(4, 3, 256, 64), torch.randn(4, 3, 256, 64)
    mask = (torch.arange(256)[None, :] < torch.tensor([3, 100, 256, 1])[:, None])[:, None, None, :]
    monkeypatch.setattr(cpu_kernels, "DECODE_ATTENTION", None)
    want, _ = fast_decode.grouped_decode_attention(module, q, k, v, mask, scaling=0.125)
    calls = []
    monkeypatch.setattr(cpu_kernels, "DECODE_ATTENTION", lambda *args: calls.append(1) or attention_op(*args))
    got, _ = fast_decode.grouped_decode_attention(module, q, k, v, mask, scaling=0.125)
    assert calls and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    prompt = torch.randn(1, 9, 5, 64)  # several queries: transformers' own SDPA, never ours
    calls.clear()
    fast_decode.grouped_decode_attention(module, prompt, k[:1], v[:1], None, scaling=0.125)
    assert not calls
