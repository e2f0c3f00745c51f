"""INT8/INT4 weight-only layers, the quantization policy, and quantized models that still chat."""

import gc
import uuid
import weakref

import pytest
import torch
from torch import nn

from glm_core import Engine, ModelSpec, Precision, SamplingParams, load_model
from glm_core.hub import EngineHub
from glm_core.quant import (
    WeightOnlyInt4Linear, WeightOnlyInt8Embedding, WeightOnlyInt8Linear, dequantize_int4, quantize_int4, quantize_loaded_model, weight_bytes,
)


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("precision, layer_type, tolerance", [
    (Precision.INT8, WeightOnlyInt8Linear, 0.02),
    (Precision.INT4, WeightOnlyInt4Linear, 0.15),
])
@pytest.mark.parametrize("in_features", [576, 1024])
def test_quantized_linear_matches_float(precision, layer_type, tolerance, in_features):
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
        reply = engine.submit(uuid.uuid4().hex, [{"role": "user", "content": "What is the capital of France?"}],
                              SamplingParams(temperature=0, max_new_tokens=30)).wait()
        assert "Paris" in reply.text
    finally:
        engine.close()


def test_switching_precision_frees_the_old_model(tiny_model_dir):
    hub = EngineHub()
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
    assert 0 < card["quantized_weights_bytes"] < card["weights_bytes"] < bf16["weights_bytes"]
    # SmolLM2-135M: 30 layers, 3 KV heads of 64, keys and values, 2 bytes each.
    assert bf16["kv_bytes_per_token"] == 2 * 30 * 3 * 64 * 2
    engine = Engine(embedded_levels["int8"])
    try:
        report = engine.memory_report()
        assert report["source"] == "process RSS" and report["peak"] >= report["current"] > card["weights_bytes"]
        assert report["kv_cache_conversations"] == 0
    finally:
        engine.close()
