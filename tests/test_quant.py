"""INT8/INT4 weight-only layers, the quantization policy, and quantized models that still chat."""

import gc
import subprocess
import sys
import uuid
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

import glm_core.models.quant as quant
from glm_core import ModelSpec, SamplingParams
from glm_core.backends.hub import BackendHub
from glm_core.engine import Engine
from glm_core.models import Precision, cpu_kernels, load_model
from glm_core.models.loading import STREAMED, convert_gguf, embedded_gguf_path
from glm_core.models.quant import (
    WeightOnlyInt4Linear,
    WeightOnlyInt8Embedding,
    WeightOnlyInt8Linear,
    dequantize_int4,
    quantize_int4,
    quantize_int8,
    quantize_loaded_model,
    weight_bytes,
)
from glm_core.settings import load_settings


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def our_int4_op():
    """Our INT4 kernel's op wherever it can run, used here whether or not this process chose it for speed (under a
    busy suite the timing may choose PyTorch's); skips where it cannot run (no AVX2, not Linux)."""
    library = cpu_kernels.built_library()
    if isinstance(library, str):
        pytest.skip(f"our CPU kernels cannot run here: {library}")
    return library.int4_mm.default


@pytest.fixture(params=["ours", "pytorch"])
def int4_kernel(request, monkeypatch):
    """The CPU INT4 kernel (and layout) a test runs with: ours (int8 activations) or PyTorch's."""
    monkeypatch.setattr(cpu_kernels, "_chosen", True)
    monkeypatch.setattr(cpu_kernels, "INT4_MM", our_int4_op() if request.param == "ours" else None)
    monkeypatch.setattr(cpu_kernels, "INT4_MM_VNNI", None)  # the AVX2 path (both paths: the kernel's own test)
    return request.param


@pytest.mark.parametrize(
    "precision, layer_type, tolerance",
    [
        (Precision.INT8, WeightOnlyInt8Linear, 0.02),
        (Precision.INT4, WeightOnlyInt4Linear, 0.15),
    ],
)
@pytest.mark.parametrize("in_features", [576, 1024])
def test_quantized_linear_matches_float(precision, layer_type, tolerance, in_features, int4_kernel):
    torch.manual_seed(0)
    model = nn.Module()
    model.layers = nn.ModuleList([nn.Module()])
    model.layers[0].proj = nn.Linear(in_features, 384, bias=True)
    model.lm_head = nn.Linear(384, 100, bias=False)
    x = torch.randn(2, 7, in_features)
    expected = model.layers[0].proj(x)
    assert quantize_loaded_model(model, precision, torch.bfloat16, group_size=64) == 2
    layer = model.layers[0].proj
    assert isinstance(layer, layer_type)
    assert isinstance(model.lm_head, WeightOnlyInt8Linear)  # an untied output layer: INT8 at both levels
    out = layer(x)
    assert out.shape == expected.shape and out.dtype == x.dtype
    assert relative_error(out, expected) < tolerance


@pytest.mark.slow  # over 4 s here: left out of `make test-fast`
def test_tied_output_layer_shares_the_int8_embedding(embedded_levels):
    model = embedded_levels["int4"].model
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, WeightOnlyInt8Embedding) and isinstance(model.lm_head, WeightOnlyInt8Linear)
    assert model.lm_head.weight is embedding.weight and model.lm_head.scales is embedding.scales
    float_model = embedded_levels["bf16"].model
    ids = torch.tensor([[1, 500, 9000, 40000]])
    expected = float_model.get_input_embeddings()(ids).float()
    assert relative_error(embedding(ids), expected) < 0.03


def test_int4_round_trip_per_group():
    w = torch.randn(64, 256)
    q, scales_and_zeros = quantize_int4(w, 32)
    assert q.min() >= 0 and q.max() <= 15 and scales_and_zeros.shape == (8, 64, 2)
    back = dequantize_int4(q, scales_and_zeros, 32)
    step = (w.reshape(64, 8, 32).amax(-1) - w.reshape(64, 8, 32).amin(-1)) / 15
    assert ((back - w).abs().reshape(64, 8, 32) <= step[..., None] / 2 + 1e-5).all()  # within half a step


@pytest.fixture(scope="module")
def embedded_levels():
    return {level: load_model(ModelSpec("embedded", level, "cpu")) for level in ("bf16", "int8", "int4")}


def test_embedded_weights_shrink_as_promised(embedded_levels):
    sizes = {level: weight_bytes(m.model)["total"] for level, m in embedded_levels.items()}
    assert sizes["int8"] <= 0.62 * sizes["bf16"]
    assert sizes["int4"] <= 0.45 * sizes["bf16"]
    assert embedded_levels["int4"].spec.group_size == 32  # the default
    assert weight_bytes(embedded_levels["bf16"].model)["quantized"] == 0


@pytest.mark.parametrize("level", ["int8", "int4"])
def test_quantized_embedded_model_still_knows_paris(embedded_levels, level):
    loaded = embedded_levels[level]
    assert loaded.precision.label == level.upper()
    engine = Engine(loaded)
    try:
        reply = engine.submit(
            uuid.uuid4().hex,
            [{"role": "user", "content": "What is the capital of France?"}],
            SamplingParams(temperature=0, max_new_tokens=30),
        ).wait()
        assert "Paris" in reply.text
    finally:
        engine.close()


@pytest.mark.slow  # over 4 s here: left out of `make test-fast`
def test_switching_precision_frees_the_old_model(tiny_model_dir):
    hub = BackendHub()
    try:
        first = hub.load(ModelSpec(str(tiny_model_dir), "bf16", "cpu"))
        tensors = [weakref.ref(p) for p in first.loaded.model.parameters()]
        model_ref = weakref.ref(first.loaded.model)
        del first
        second = hub.load(ModelSpec(str(tiny_model_dir), "int8", "cpu"))
        gc.collect()
        assert model_ref() is None and all(t() is None for t in tensors)  # no leftover tensors
        assert second.loaded.precision is Precision.INT8
    finally:
        hub.unload()


def test_engine_reports_weights_kv_and_memory(embedded_levels):
    card = embedded_levels["int8"].card()
    bf16 = embedded_levels["bf16"].card()
    assert 0 < card.quantized_weights_bytes < card.weights_bytes < bf16.weights_bytes
    # SmolLM2-135M: 30 layers, 3 KV heads of 64, keys and values, 2 bytes each.
    assert bf16.kv_bytes_per_token == 2 * 30 * 3 * 64 * 2
    # INT4 on a CPU: the card says whose kernel its layers use, and the timing that chose it.
    kernel = embedded_levels["int4"].card().kernel
    assert kernel.startswith("INT4 layers: ") and ("int8-activation" in kernel or "PyTorch" in kernel)
    assert "INT8 output layer: " in kernel and card.kernel.startswith("INT8 output layer: ")
    # BF16: our product where it measured faster (see test_bf16_kernel.py), else none of ours.
    if cpu_kernels.BF16_MM is None:
        assert bf16.kernel is None
    else:
        assert bf16.kernel.startswith("211 BF16 layers: our BF16 product") and "fused in 60 modules" in bf16.kernel
    engine = Engine(embedded_levels["int8"])
    try:
        report = engine.memory_report()
        assert report.source == "process RSS" and report.peak >= report.current > card.weights_bytes
        assert report.kv_cache_conversations == 0 and report.own_bytes(card.weights_bytes) == card.weights_bytes
    finally:
        engine.close()


def _logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([[1, 500, 9000, 40000, 17, 3, 28]])).logits


@pytest.mark.parametrize("level", ["int8", "int4"])
def test_quantizing_while_reading_equals_quantizing_the_loaded_model(embedded_levels, tiny_model_dir, level):
    """The streamed load quantizes each weight from the checkpoint's own values (FP32 here) as it is read: the
    same model, bit for bit, as loading the checkpoint whole and then quantizing it (norms at BF16, as the level
    keeps them)."""
    from transformers import AutoModelForCausalLM

    embedded_folder = convert_gguf(embedded_gguf_path(), load_settings().cache_dir)
    tiny = load_model(ModelSpec(str(tiny_model_dir), level, "cpu"))
    for loaded, folder in ((embedded_levels[level], embedded_folder), (tiny, tiny_model_dir)):
        assert loaded.extra["loader"] == STREAMED
        reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        quantize_loaded_model(reference, loaded.precision, torch.bfloat16, loaded.spec.group_size)
        for parameter in reference.parameters():
            parameter.data = parameter.data.to(torch.bfloat16)
        assert torch.equal(_logits(loaded.model), _logits(reference))
        assert weight_bytes(loaded.model) == weight_bytes(reference)


PEAK_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
from glm_core import ModelSpec
from glm_core.models import load_model
import transformers.models.llama.modeling_llama  # imported before the baseline, as everything but the model

def high_water_mark():
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))

baseline = high_water_mark()
load_model(ModelSpec("embedded", "int4", "cpu"))
print(high_water_mark() - baseline)
"""


@pytest.mark.slow  # over 4 s here: left out of `make test-fast`
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux's VmHWM")
def test_int4_load_peaks_below_the_bf16_model(embedded_levels):
    """Quantizing while reading: the embedded model's INT4 load, in a fresh process, never holds as much as the
    BF16 weights (the FP32 file is read one tensor at a time): the ratio the README states, below 1x."""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(root)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    growth = int(done.stdout.strip().splitlines()[-1])
    ratio = growth / embedded_levels["bf16"].weights["total"]
    print(f"\nINT4 load growth / BF16 weights: {ratio:.2f}x")
    assert ratio < 1.0


def test_cpu_int4_layout_is_understood():
    """The prefill path unpacks PyTorch's internal CPU int4 layout; if a torch upgrade changes it, INT4 prefill
    silently goes back to the fused kernel, and this test says so."""
    assert quant.cpu_int4_block_rows() in (32, 64)
    q = torch.randint(0, 16, (192, 576), dtype=torch.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(q, quant.int4_inner_k_tiles(576))
    assert torch.equal(quant.unpack_int4_for_cpu(packed, 576).int(), q)


@pytest.mark.parametrize(
    "layer_type, out_features, dense_expected",
    [
        (WeightOnlyInt8Linear, 200, True),
        (WeightOnlyInt4Linear, 192, True),
        # PyTorch's layout, not a whole number of 64-row blocks: its kernel at any row count; ours: dense
        (WeightOnlyInt4Linear, 208, None),
        # ours only (PyTorch's packing wants 16 rows at a time): the last block, a tile and 5 single rows
        (WeightOnlyInt4Linear, 205, None),
    ],
)
def test_prefill_rows_dequantize_in_blocks_and_match_the_kernel(
    monkeypatch, layer_type, out_features, dense_expected, int4_kernel
):
    if int4_kernel == "pytorch" and layer_type is WeightOnlyInt4Linear and out_features % 16:
        pytest.skip("PyTorch's int4 packing takes a multiple of 16 rows")
    torch.manual_seed(0)
    layer = layer_type(256, out_features, True, torch.bfloat16)
    layer.set_weight(torch.randn(out_features, 256))
    layer.bias.copy_(torch.randn(out_features))
    x = torch.randn(3, 40, 256)
    monkeypatch.setattr(quant, "INT8_DENSE_MIN_ROWS", 10**9)
    monkeypatch.setattr(quant, "INT8_DENSE_MIN_ROWS_FP32", 10**9)
    monkeypatch.setattr(quant, "INT4_DENSE_MIN_ROWS", 10**9)
    monkeypatch.setattr(quant, "OUR_INT4_DENSE_MIN_ROWS", 10**9)
    kernel = layer(x)
    blocks = []
    monkeypatch.setattr(quant, "INT8_DENSE_MIN_ROWS", 120)
    monkeypatch.setattr(quant, "INT8_DENSE_MIN_ROWS_FP32", 120)
    monkeypatch.setattr(quant, "INT4_DENSE_MIN_ROWS", 120)
    monkeypatch.setattr(quant, "OUR_INT4_DENSE_MIN_ROWS", 120)
    monkeypatch.setattr(quant, "DENSE_BLOCK_BYTES", 64 * 256 * 2)  # 64-row blocks: several, and a partial last one
    real = quant.dense_in_blocks
    monkeypatch.setattr(quant, "dense_in_blocks", lambda *a, **k: blocks.append(1) or real(*a, **k))
    assert torch.equal(layer(x[:, :39]), kernel[:, :39])  # 117 rows: below the switch, the kernel
    assert not blocks
    dense = layer(x)  # 120 rows
    assert bool(blocks) is (int4_kernel == "ours" if dense_expected is None else dense_expected)
    assert dense.shape == kernel.shape and dense.dtype == x.dtype
    # Our INT4 kernel rounds the activations to int8 blocks (as llama.cpp's): the dense path does not.
    assert relative_error(dense, kernel) < (
        0.02 if layer_type is WeightOnlyInt4Linear and int4_kernel == "ours" else 0.01
    )


def quantize_activations_as_the_kernel_does(x: torch.Tensor) -> torch.Tensor:
    """x rounded to int8 in blocks of 32, one scale (max |x| / 127) a block: the activations our kernel sees."""
    blocks = x.float().reshape(x.shape[0], -1, 32)
    scales = blocks.abs().amax(-1, keepdim=True) / 127
    return (torch.round(blocks / scales.clamp(min=1e-30)) * scales).reshape(x.shape)


def our_vnni_op():
    """Our INT4 kernel's AVX-512 VNNI path wherever it can run (whatever this process chose); skips elsewhere."""
    our_int4_op()
    if not torch.ops.glm_cpu.vnni_supported():
        pytest.skip("this CPU has no AVX-512 VNNI")
    return torch.ops.glm_cpu.int4_mm_vnni.default


@pytest.mark.parametrize("path", ["avx2", "vnni"])
@pytest.mark.parametrize("rows", [1, 3, 6, 16, 21])
@pytest.mark.parametrize("in_features, out_features, group_size", [(576, 192, 32), (1536, 577, 64), (256, 5, 128)])
def test_our_int4_kernel_is_the_dot_product_of_int8_activations_and_the_nibbles(
    rows, in_features, out_features, group_size, path
):
    """Exact but for float summation order, on both paths: tiles of 8 weight rows and the single rows after the
    last, group sizes of one and several blocks, activation rows 4 (AVX2) or 8 (VNNI) at a time and those left
    over."""
    op = our_int4_op() if path == "avx2" else our_vnni_op()
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(out_features, in_features, generator=generator)
    q, scales_and_zeros = quantize_int4(weight, group_size)
    packed, scales_offsets = quant.pack_int4_blocks(q, scales_and_zeros, torch.bfloat16)
    dequantized = quant.unpack_int4_blocks(packed, scales_offsets, torch.float64)
    x = torch.randn(rows, in_features, generator=generator) * torch.linspace(0.01, 10, in_features)
    x[0, :32] = 0  # an all-zero block: scale 0, no division by zero
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        got = op(xd, packed, scales_offsets, group_size)
        assert got.dtype == dtype and got.shape == (rows, out_features)
        # The scales multiply the int8 activations; the offsets, the exact activations' sums.
        by_row = quant.scales_offsets_by_row(scales_offsets).double()
        scales, offsets = (t.repeat_interleave(group_size, 1) for t in by_row.unbind(-1))
        nibbles = (dequantized - offsets) / scales
        exact = quantize_activations_as_the_kernel_does(xd).double() @ (nibbles * scales).T + xd.double() @ offsets.T
        assert torch.equal(nibbles.round(), nibbles) and torch.equal(nibbles.to(q.dtype), q)  # the layout, undone
        assert torch.equal(by_row[..., 0], scales_and_zeros[..., 0].T.to(torch.bfloat16).double())
        assert relative_error(got, exact) < (1e-5 if dtype is torch.float32 else 5e-3)
        # ... and close to the float product: the activations' rounding is all it adds.
        assert relative_error(got, xd.double() @ dequantized.T) < 0.03
        if path == "vnni":  # the same integers, then the same float operations: the same bits as the AVX2 path
            assert torch.equal(got, our_int4_op()(xd, packed, scales_offsets, group_size))


@pytest.mark.parametrize("path", ["avx2", "vnni"])
@pytest.mark.parametrize("rows", [1, 5, 16])
@pytest.mark.parametrize("out_features, in_features", [(203, 576), (3, 64)])
def test_our_int8_kernel_is_the_dot_product_of_int8_activations_and_the_weight(rows, out_features, in_features, path):
    """Exact but for float summation order: 4 output rows at a time and those left over, float32 and BF16
    activations and scales; the VNNI path gives the AVX2 path's bits."""
    library = cpu_kernels.built_library()
    if isinstance(library, str):
        pytest.skip(f"our CPU kernels cannot run here: {library}")
    if path == "vnni" and not library.vnni_supported():
        pytest.skip("this CPU has no AVX-512 VNNI")
    op = library.int8_mm if path == "avx2" else library.int8_mm_vnni
    generator = torch.Generator().manual_seed(rows)
    q, scales = quantize_int8(torch.randn(out_features, in_features, generator=generator))
    x = torch.randn(rows, in_features, generator=generator) * torch.linspace(0.01, 10, in_features)
    x[0, :32] = 0  # an all-zero block
    for dtype in (torch.float32, torch.bfloat16):
        xd, sd = x.to(dtype), scales.to(dtype)
        got = op(xd, q, sd)
        assert got.dtype == dtype and got.shape == (rows, out_features)
        exact = quantize_activations_as_the_kernel_does(xd).double() @ (q.double() * sd.double()[:, None]).T
        assert relative_error(got, exact) < (1e-5 if dtype is torch.float32 else 5e-3)
        assert relative_error(got, xd.double() @ (q.double() * sd.double()[:, None]).T) < 0.03
        if path == "vnni":
            assert torch.equal(got, library.int8_mm(xd, q, sd))
    with pytest.raises(RuntimeError, match="tile by 32"):
        op(torch.randn(2, 40), torch.zeros(3, 40, dtype=torch.int8), torch.ones(3))


@pytest.mark.parametrize("min_rows", [1, 2])
def test_only_the_output_layer_takes_our_int8_kernel_from_the_rows_it_was_chosen_for(monkeypatch, min_rows):
    """Every other INT8 layer keeps PyTorch's exact float product; the output layer takes ours from the fewest rows
    it measured faster at (one, or 2: a lone conversation's step keeps PyTorch's), up to the dense path."""
    library = cpu_kernels.built_library()
    if isinstance(library, str):
        pytest.skip(f"our CPU kernels cannot run here: {library}")
    monkeypatch.setattr(cpu_kernels, "INT8_MM", library.int8_mm.default)
    monkeypatch.setattr(cpu_kernels, "INT8_MM_VNNI", None)
    monkeypatch.setattr(cpu_kernels, "INT8_MIN_ROWS", min_rows)
    monkeypatch.setattr(quant, "DENSE_DTYPE", torch.bfloat16)
    calls = []
    monkeypatch.setattr(cpu_kernels, "int8_op", lambda rows: lambda *a: calls.append(rows) or library.int8_mm(*a))
    layer = WeightOnlyInt8Linear(64, 40, False, torch.bfloat16)
    layer.set_weight(torch.randn(40, 64))
    for rows in (1, 2, 16, quant.OUR_INT8_DENSE_MIN_ROWS):
        layer(torch.randn(rows, 64, dtype=torch.bfloat16))
    assert calls == []
    layer.int8_activations = True  # as the quantization policy marks the output layer
    for rows in (1, 2, 16, quant.OUR_INT8_DENSE_MIN_ROWS):
        layer(torch.randn(rows, 64, dtype=torch.bfloat16))
    assert calls == [2, 16] if min_rows == 2 else [1, 2, 16]


def test_the_vnni_path_takes_the_row_counts_from_which_it_measured_faster(monkeypatch):
    """VNNI from the fewest timed rows at which it was faster there and at every larger count; never where it lost
    at the most rows; the AVX2 path below, PyTorch's layout never."""
    avx2, vnni = our_int4_op(), our_vnni_op()
    figures = {1: (30.0, 20.0), 4: (50.0, 60.0), 16: (100.0, 150.0)}  # (VNNI us, AVX2 us)
    monkeypatch.setattr(cpu_kernels, "_time_paths", lambda ours, theirs, args, repeats: figures[args[0].shape[0]])

    def case(rows):
        return (torch.empty(rows, 32),)

    op, rows, why = cpu_kernels._choose_vnni("INT4", avx2, "int4_mm_vnni", case)
    assert (op, rows) == (vnni, 4) and "VNNI from 4 rows" in why
    monkeypatch.setattr(cpu_kernels, "INT4_MM", avx2)
    monkeypatch.setattr(cpu_kernels, "INT4_MM_VNNI", op)
    monkeypatch.setattr(cpu_kernels, "INT4_VNNI_ROWS", rows)
    assert [cpu_kernels.int4_op(n) for n in (1, 3, 4, 64)] == [avx2, avx2, vnni, vnni]
    monkeypatch.setattr(cpu_kernels, "INT4_MM", None)  # PyTorch's kernel chosen: its layout, no path of ours
    assert cpu_kernels.int4_op(64) is None
    figures[16] = (200.0, 150.0)
    assert cpu_kernels._choose_vnni("INT4", avx2, "int4_mm_vnni", case)[:2] == (None, 0)
