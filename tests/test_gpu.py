"""The GPU set: what only a CUDA device can check. Skipped, saying so, where torch sees no CUDA device (CI); run it
where one is lent with `scripts/gpu_check.sh` (it writes its figures to gpu-figures.json beside the log).

- the CUDA INT8/INT4 weight-only layers against the float layer they replace;
- NVML read for real: this GPU's name and memory, and this process among its users once it holds memory;
- the CUDA allocator's figures per precision level for an architecture preset (random weights), ordered as the
  levels' weights and near the estimator's prediction;
- the compiled decode path with CUDA graphs: greedy tokens equal to eager at every batch bucket;
- a ChatGLM2-6B-shaped model (random weights, FP16) decoding 1, 16 and 64 streams at once: tokens/s printed.
"""

import json
import os
import time
import uuid

import pytest
import torch
from torch import nn

# GLM_GPU_SET_DEVICE=cpu runs the set's logic on the CPU (a check of the tests themselves, not of a GPU)
DEVICE = os.environ.get("GLM_GPU_SET_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        DEVICE == "cuda" and not torch.cuda.is_available(), reason="no CUDA device: the GPU set runs where one is lent"
    ),
]

FIGURES = os.environ.get("GLM_GPU_FIGURES", "gpu-figures.json")


def record(name: str, value) -> None:
    """Keep a figure for the run's report (scripts/gpu_check.sh collects the file)."""
    try:
        with open(FIGURES) as file:
            figures = json.load(file)
    except (OSError, ValueError):
        figures = {}
    figures[name] = value
    with open(FIGURES, "w") as file:
        json.dump(figures, file, indent=1)
    print(f"\n{name}: {value}")


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("level, tolerance", [("int8", 0.02), ("int4", 0.15)])
def test_cuda_weight_only_layers_match_float(level, tolerance):
    from glm_core.models.precision import Precision
    from glm_core.models.quant import WeightOnlyInt4Linear, WeightOnlyInt8Linear, quantize_loaded_model

    torch.manual_seed(0)
    model = nn.Module()
    model.layers = nn.ModuleList([nn.Module()])
    model.layers[0].proj = nn.Linear(4096, 4096, bias=False)
    model.lm_head = nn.Linear(4096, 1000, bias=False)
    model = model.to(DEVICE, torch.float16)
    x = torch.randn(3, 17, 4096, device=DEVICE, dtype=torch.float16)
    expected = model.layers[0].proj(x)
    quantize_loaded_model(model, Precision(level), torch.float16, group_size=128)
    layer = model.layers[0].proj
    assert isinstance(layer, WeightOnlyInt8Linear if level == "int8" else WeightOnlyInt4Linear)
    out = layer(x)
    assert out.device.type == DEVICE and out.dtype == torch.float16
    error = relative_error(out, expected)
    record(f"cuda_{level}_linear_relative_error", round(error, 5))
    assert error < tolerance


@pytest.mark.skipif(DEVICE != "cuda", reason="NVML reads NVIDIA GPUs")
def test_nvml_reads_this_gpu_and_this_process():
    from glm_core.telemetry.gpu_monitor import NvmlReader, this_process_gpu_bytes

    held = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")  # 256 MiB this process holds
    reading = NvmlReader().read()
    assert reading.error is None and reading.gpus
    gpu = reading.gpus[torch.cuda.current_device()]
    assert gpu.name and "NVIDIA" in gpu.name.upper()
    assert gpu.memory_total > gpu.memory_used > 256 * 2**20
    mine = this_process_gpu_bytes(torch.cuda.current_device())
    assert mine is None or mine >= 256 * 2**20  # None: the driver hides processes inside this container
    record("nvml", {"name": gpu.name, "memory_total_mib": gpu.memory_total // 2**20, "this_process_bytes": mine})
    del held


def test_cuda_allocator_figures_per_level_follow_the_weights():
    from glm_core.bench.memory import MemoryBenchRequest, run_memory_bench

    source, encode, generate = ("chatglm2-6b", 512, 2048) if DEVICE == "cuda" else ("embedded", 32, 128)
    request = MemoryBenchRequest(
        source, levels=("fp16", "int8", "int4"), encode=encode, generate=generate, device=DEVICE, eval_tokens=0
    )
    run = run_memory_bench(request)
    assert run.state == "done", run.error
    results = {r["level"]: r for r in run.results}
    assert all("error" not in r for r in results.values()), results
    weights = [results[level]["weights_bytes"] for level in ("fp16", "int8", "int4")]
    assert weights[0] > weights[1] > weights[2]
    for level, result in results.items():
        predicted = run.estimates[level]["weights_bytes"]
        assert abs(result["weights_bytes"] - predicted) <= 0.05 * predicted, (level, result, predicted)
    record("cuda_levels", {level: {k: v for k, v in r.items() if k.endswith("bytes")} for level, r in results.items()})


def test_compiled_decode_with_cuda_graphs_equals_eager(tiny_model_dir):
    from glm_core import ModelSpec, SamplingParams
    from glm_core.engine import Engine
    from glm_core.models import load_model

    loaded = load_model(ModelSpec(str(tiny_model_dir), "fp32", DEVICE))
    params = SamplingParams(temperature=0, max_new_tokens=32, repetition_penalty=1.0)
    prompts = [f"Count to {n}." for n in range(1, 9)]

    def replies(compile_mode):
        engine = Engine(loaded, max_batch=8, compile=compile_mode)
        try:
            if compile_mode == "on":
                assert engine.fast.wait_ready(900) == "ready", engine.card()["fast_path"]
            requests = [engine.submit(uuid.uuid4().hex, [{"role": "user", "content": p}], params) for p in prompts]
            return [(r.text, r.finish_reason) for r in (request.wait(300) for request in requests)]
        finally:
            engine.close()

    assert replies("on") == replies("off")


@pytest.mark.skipif(DEVICE != "cuda", reason="a 6B model: on the GPU only")
@pytest.mark.parametrize("streams", [1, 16, 64])
def test_chatglm2_6b_shape_decodes_on_the_gpu(streams):
    from glm_core.bench.estimator import PRESETS
    from glm_core.bench.memory import source_config
    from glm_core.bench.memory.child import build_random_model
    from glm_core.models.precision import Precision

    assert "chatglm2-6b" in PRESETS
    _, config = source_config("chatglm2-6b")
    from transformers import DynamicCache

    model = build_random_model(config, Precision.FP16, 128, torch.device("cuda"))
    tokens = torch.randint(0, 1000, (streams, 128), device="cuda")
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=tokens, past_key_values=cache, use_cache=True, logits_to_keep=1)
        step = tokens[:, -1:]
        torch.cuda.synchronize()
        started, steps = time.perf_counter(), 32
        for _ in range(steps):
            logits = model(input_ids=step, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
            step = logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    figures = {
        "tokens_per_s": round(streams * steps / seconds, 1),
        "step_ms": round(1000 * seconds / steps, 2),
        # one stream reads every weight once per step: the bandwidth that took, against the GPU's peak
        "weights_gb_per_s": round(weights * steps / seconds / 1e9, 1),
    }
    record(f"chatglm2_6b_fp16_{streams}_streams", figures)
    assert figures["tokens_per_s"] > 0
