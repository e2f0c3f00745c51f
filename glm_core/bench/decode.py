"""`bench decode`: what the compiled decode path buys, per precision level and number of streams, in one run.

Per level, one process, one loaded model: plain transformers `generate` (one stream, the baseline; at BF16 and
FP32 also with our dense product switched off, that is on PyTorch's products as transformers runs them), the engine
decoding eagerly and the engine on its compiled graphs (alternated run by run, so both see the same machine
load; medians), and the compile time of the engine's graphs on a cold inductor cache (a fresh folder) and on a
warm one (the same folder, dynamo's in-memory state reset: what a restart costs). Streams are greedy replies of a
fixed length decoded together (bench concurrency's runs).
"""

from __future__ import annotations

import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ..engine import Engine
from ..engine.fast_decode import FastDecode, configure_compile_cache
from ..models import cpu_kernels
from ..models.dense_linear import KernelLinear
from ..models.loading import load_model
from ..models.openmp import release_pool
from ..protocol import ModelSpec
from .concurrency import _NoStop, _run
from .turns import DECODE_PROMPT, _TokenClock

LEVELS = ("bf16", "int8", "int4")


def _generate_rate(loaded, tokens: int) -> float:
    ids = torch.tensor([loaded.chat_format.encode([{"role": "user", "content": DECODE_PROMPT}])], device=loaded.device)
    clock = _TokenClock()
    with torch.inference_mode():
        loaded.model.generate(
            ids,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            streamer=clock,
            attention_mask=torch.ones_like(ids),
            pad_token_id=loaded.tokenizer.pad_token_id or 0,
        )
    return (len(clock.times) - 1) / (clock.times[-1] - clock.times[0])


def _pytorch_generate_rate(loaded, tokens: int) -> float | None:
    """`_generate_rate` with our dense products switched off (PyTorch's), where the model's layers use them."""
    rows, f32_rows = cpu_kernels.BF16_MAX_ROWS, cpu_kernels.F32_MAX_ROWS
    if not any(isinstance(m, KernelLinear) for m in loaded.model.modules()):
        return None
    cpu_kernels.BF16_MAX_ROWS = cpu_kernels.F32_MAX_ROWS = 0
    try:
        return _generate_rate(loaded, tokens)
    finally:
        cpu_kernels.BF16_MAX_ROWS, cpu_kernels.F32_MAX_ROWS = rows, f32_rows


def _compile_time(loaded, max_batch: int) -> float:
    """Seconds to compile every graph an engine of `max_batch` rows starts with, from dynamo's empty state."""
    torch._dynamo.reset()
    started = time.perf_counter()
    fast = FastDecode(loaded.model, loaded.device, max_batch)
    status = fast.wait_ready()
    fast.close()
    if status != "ready":
        raise RuntimeError(f"compiling failed: {status}")
    return time.perf_counter() - started


def measure_level(spec: ModelSpec, streams: list[int], tokens: int, repeats: int, cache_root: Path) -> list[dict]:
    loaded = load_model(spec)
    loaded.chat_format = _NoStop(loaded.chat_format)  # every stream decodes exactly `tokens`
    max_batch = max(streams)
    configure_compile_cache(cache_root, exact=True)  # a fresh folder: the first compile is cold
    cold = _compile_time(loaded, max_batch)
    warm = _compile_time(loaded, max_batch)
    eager = Engine(loaded, max_batch=max_batch, compile="off")
    compiled = Engine(loaded, max_batch=max_batch, compile="on")
    try:
        if compiled.fast.wait_ready() != "ready":  # dynamo's in-memory cache has them: no compile here
            raise RuntimeError(compiled.card().fast_path)
        for engine in (eager, compiled):  # one-off costs (allocator, first calls) no figure should carry
            _run(engine, 1, 8)
        generate = statistics.median(_generate_rate(loaded, tokens) for _ in range(repeats))
        pytorch = [_pytorch_generate_rate(loaded, tokens) for _ in range(repeats)]
        release_pool()  # `generate` ran on this thread: its OpenMP workers would slow the engines' (openmp.py)
        rows = []
        for n in streams:
            runs: dict[str, list[dict]] = {"eager": [], "compiled": []}
            for _ in range(repeats):
                runs["eager"].append(_run(eager, n, tokens))
                steps = compiled.fast.steps
                runs["compiled"].append(_run(compiled, n, tokens))
                if compiled.fast.steps - steps < tokens - 2:
                    raise RuntimeError("the compiled engine decoded eagerly: its graphs were not used")
            rates = {name: [run["aggregate_tokens_per_s"] for run in done] for name, done in runs.items()}
            split = {  # each run's step against its forward (the runner's clock), the median of the repeats
                name: {
                    key: statistics.median(run[key] for run in done) for key in ("step_ms", "forward_ms", "overhead")
                }
                for name, done in runs.items()
            }
            rows.append(
                {
                    "level": spec.precision,
                    "streams": n,
                    "tokens": tokens,
                    "generate_tokens_per_s": generate,
                    "pytorch_generate_tokens_per_s": None if None in pytorch else statistics.median(pytorch),
                    "eager_tokens_per_s": statistics.median(rates["eager"]),
                    "compiled_tokens_per_s": statistics.median(rates["compiled"]),
                    **{f"{name}_{key}": value for name, figures in split.items() for key, value in figures.items()},
                    "compile_cold_s": cold,
                    "compile_warm_s": warm,
                    "graphs": len(compiled.fast.ready_keys()),
                    "model": loaded.name,
                    "device": str(loaded.device),
                    "threads": torch.get_num_threads(),
                    "torch": torch.__version__,
                    "cpu": platform.processor() or platform.machine(),
                    "repeats": repeats,
                }
            )
    finally:
        eager.close()
        compiled.close()
        loaded.release()
    return rows


def run_decode_bench(
    model: str, levels: list[str], device: str, streams: list[int], tokens: int, repeats: int, group_size: int
) -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory(prefix="glm-bench-decode-") as folder:
        for level in levels:
            results += measure_level(
                ModelSpec(model, level, device, group_size=group_size), streams, tokens, repeats, Path(folder) / level
            )
    base = next((r["generate_tokens_per_s"] for r in results if r["level"] == "bf16"), None)
    one = {r["level"]: r["compiled_tokens_per_s"] for r in results if r["streams"] == 1}
    for r in results:
        r["compiled_over_eager"] = r["compiled_tokens_per_s"] / r["eager_tokens_per_s"]
        r["compiled_over_generate"] = r["compiled_tokens_per_s"] / r["generate_tokens_per_s"]
        stock = r["pytorch_generate_tokens_per_s"]
        r["compiled_over_pytorch_generate"] = r["compiled_tokens_per_s"] / stock if stock else None
        r["compiled_over_bf16_generate"] = r["compiled_tokens_per_s"] / base if base else None
        r["compiled_over_one_stream"] = r["compiled_tokens_per_s"] / one[r["level"]] if r["level"] in one else None
        r["warm_over_cold"] = r["compile_warm_s"] / r["compile_cold_s"]
    return results


def format_decode_report(results: list[dict]) -> str:
    first = results[0]
    lines = [
        f"bench decode: {first['model']} on {first['device']} (torch {first['torch']}, {first['threads']} threads), "
        f"{first['tokens']} greedy tokens per stream, median of {first['repeats']}",
        "level  streams  generate  eager tok/s  compiled tok/s  compiled/eager  /bf16 generate  /1 stream  "
        "compile cold  warm (warm/cold)",
    ]
    split = ["", "decode step against model forward (ms a step, the runner's clock; goal: overhead <= 10 %):"]
    for r in results:
        vs_bf16 = f"{r['compiled_over_bf16_generate']:.2f}x" if r["compiled_over_bf16_generate"] else "-"
        vs_one = f"{r['compiled_over_one_stream']:.2f}x" if r["compiled_over_one_stream"] else "-"
        lines.append(
            f"{r['level']:<5}  {r['streams']:>7}  {r['generate_tokens_per_s']:>8.1f}  {r['eager_tokens_per_s']:>11.1f}  "
            f"{r['compiled_tokens_per_s']:>14.1f}  {r['compiled_over_eager']:>13.2f}x  {vs_bf16:>14}  {vs_one:>9}  "
            f"{r['compile_cold_s']:>11.1f}s  {r['compile_warm_s']:.1f}s ({r['warm_over_cold']:.0%}, {r['graphs']} graphs)"
        )
        split.append(
            f"{r['level']:<5}  {r['streams']:>3} streams  eager {r['eager_step_ms']:.1f} / {r['eager_forward_ms']:.1f} "
            f"({r['eager_overhead']:.0%} overhead)  compiled {r['compiled_step_ms']:.1f} / "
            f"{r['compiled_forward_ms']:.1f} ({r['compiled_overhead']:.0%} overhead)"
        )
    lines += split
    for r in results:
        if r["compiled_over_pytorch_generate"] and r["streams"] == min(x["streams"] for x in results):
            lines.append(
                f"{r['level']}: generate on PyTorch's products (our dense product off) "
                f"{r['pytorch_generate_tokens_per_s']:.1f} tok/s; compiled {r['streams']} stream over it "
                f"{r['compiled_over_pytorch_generate']:.2f}x"
            )
    lines.append(
        "goals: bf16 1 stream compiled >= 1.5x bf16 generate; int4 1 stream >= 3x bf16 generate; "
        "warm <= 20% of cold; 4 streams >= 3x one stream"
    )
    return "\n".join(lines)
