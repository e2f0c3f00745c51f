"""`bench concurrency`: N conversations submitted at once, decoded together; and a newcomer joining three others.

Every figure of one run comes from the same loaded model and the same process, so the ratios to one stream are
measured side by side. Greedy decoding with a fixed number of new tokens (the stop tokens are never sampled: the
reply runs to its limit whatever the model would say), so every stream does the same amount of work.

With a remote server (`--backend URL`) the same runs go through the RemoteBackend, client side: the figures
include the network, and a server may end a reply at its end-of-turn token before the limit (the tokens it
reported are what is counted).
"""

from __future__ import annotations

import itertools
import platform
import statistics
import time
import uuid

import torch

from ..engine import Engine
from ..models.loading import LoadedModel
from ..protocol import Backend, Delta, SamplingParams

TOPICS = [
    "a lighthouse keeper",
    "a lost robot",
    "the history of tea",
    "a city under the sea",
    "a chess match",
    "a mountain village",
    "the first computer",
    "a desert caravan",
]


def _prompt(number: int, run: int | None = None) -> list[dict]:
    """Stream `number`'s prompt; with `run` (fresh prompts) each run's prompts differ from every earlier one, so no
    server answers them from a prompt it kept (what the same prompts again measure instead)."""
    topic = TOPICS[number % len(TOPICS)]
    told = f"story number {number + 1}" + (f", run {run}" if run is not None else "")
    return [{"role": "user", "content": f"Write a long story about {topic} ({told})."}]


class ReplyFailed(RuntimeError):
    """A reply of a benchmark run ended in an error (a server that is down, out of memory): no figure from it."""


class _NoStop:
    """Wraps a chat format so no token ends a reply: every stream decodes exactly its token budget."""

    def __init__(self, chat_format):
        self._format = chat_format
        self.stop_token_ids = frozenset()

    def __getattr__(self, name):
        return getattr(self._format, name)


def step_split(timing) -> dict:
    """A decode step's time against its model forward's (the runner's own clock, engine.runner.timing): what the
    engine adds per step, the goal being at most 10 % of it."""
    if not timing.steps:
        return {"step_ms": 0.0, "forward_ms": 0.0, "overhead": 0.0}
    step, forward = timing.decode_s / timing.steps, timing.forward_s / timing.steps
    return {"step_ms": 1000 * step, "forward_ms": 1000 * forward, "overhead": 1 - forward / step if step else 0.0}


def _run(engine: Backend, streams: int, max_new_tokens: int, run: int | None = None) -> dict:
    params = SamplingParams(temperature=0, max_new_tokens=max_new_tokens)
    timing = getattr(getattr(engine, "runner", None), "timing", None)  # the local engine's step clock
    if timing is not None:
        timing.reset()
        timing.sync = True  # on CUDA the forward's figure waits for its kernels (a benchmark's engine only)
    started = time.perf_counter()
    requests = [engine.submit(uuid.uuid4().hex, _prompt(i, run), params) for i in range(streams)]
    replies = [r.wait() for r in requests]
    wall = time.perf_counter() - started
    for reply in replies:
        if reply.error:
            raise ReplyFailed(reply.error)
    for request in requests:
        engine.forget(request.conversation_id)
    ttfts = [r.stats.queue_s + r.stats.ttft_s for r in replies]
    # Decode throughput: tokens after each stream's first one, over the time from the first first-token to the
    # last reply's end.
    tokens = sum(r.stats.completion_tokens for r in replies)
    decode_window = wall - min(ttfts)
    return {
        "streams": streams,
        "completion_tokens": tokens,
        "wall_s": wall,
        "aggregate_tokens_per_s": (tokens - streams) / decode_window if decode_window > 0 else 0.0,
        "per_stream_tokens_per_s": statistics.median(r.stats.decode_tokens_per_s for r in replies),
        "ttft_median_s": statistics.median(ttfts),
        "ttft_max_s": max(ttfts),
        **(step_split(timing) if timing is not None else {}),
    }


def _first_text(request) -> None:
    """Wait for a request's first text (or its end, for a reply that has none)."""
    next((e for e in request.events() if isinstance(e, Delta)), None)


def _newcomer(engine: Backend, max_new_tokens: int, run: int | None = None) -> float:
    """Three streams decoding; a fourth arrives once all three have streamed text: its time to first token."""
    long = SamplingParams(temperature=0, max_new_tokens=max(max_new_tokens, 64) * 4)
    running = [engine.submit(uuid.uuid4().hex, _prompt(i, run), long) for i in range(3)]
    for request in running:
        _first_text(request)
    newcomer = engine.submit(uuid.uuid4().hex, _prompt(3, run), SamplingParams(temperature=0, max_new_tokens=8))
    arrived = time.perf_counter()
    _first_text(newcomer)
    ttft = time.perf_counter() - arrived
    newcomer.wait()
    for request in running:
        request.stop()
        request.wait()
    return ttft


def _measure(
    backend: Backend, streams: list[int], max_new_tokens: int, repeats: int, fresh_prompts: bool = False
) -> dict:
    """The runs per stream count (with their ratio to one stream) and the newcomer's time to first token.
    `fresh_prompts`: every run's prompts are new (no kept prompt answers them); else the same ones each run."""
    counter = itertools.count(1)
    run = (lambda: next(counter)) if fresh_prompts else (lambda: None)
    _run(backend, 1, 8, run())  # warm-up: one-off costs (allocator, kernels, connections) no figure should carry
    runs = []
    for n in streams:
        measured = [_run(backend, n, max_new_tokens, run()) for _ in range(repeats)]
        runs.append(min(measured, key=lambda r: r["wall_s"]) if repeats > 1 else measured[0])
    newcomer = statistics.median(_newcomer(backend, max_new_tokens, run()) for _ in range(max(repeats, 1)))
    base = runs[0]["aggregate_tokens_per_s"] if runs and runs[0]["streams"] == 1 else None
    for r in runs:
        r["ratio_to_one_stream"] = r["aggregate_tokens_per_s"] / base if base else None
    return {"max_new_tokens": max_new_tokens, "fresh_prompts": fresh_prompts, "runs": runs, "newcomer_ttft_s": newcomer}


def run_remote_concurrency_bench(
    url: str,
    streams: list[int],
    max_new_tokens: int = 128,
    repeats: int = 1,
    api_key: str | None = None,
    fresh_prompts: bool = False,
) -> dict:
    """The same runs against an OpenAI-compatible server (`http(s)://host:port/v1#model`), client side."""
    from ..backends.remote import RemoteBackend

    backend = RemoteBackend(url, api_key=api_key)
    try:
        figures = _measure(backend, streams, max_new_tokens, repeats, fresh_prompts)
        card = backend.card()
    finally:
        backend.close()
    return {
        "model": card.name,
        "precision": card.precision,
        "device": f"remote {card.source}",
        "torch": "-",
        "cpu": "-",
        "threads": "-",
        "batched_decode": None,
        **figures,
    }


def run_concurrency_bench(loaded: LoadedModel, streams: list[int], max_new_tokens: int = 128, repeats: int = 1) -> dict:
    loaded.chat_format = _NoStop(loaded.chat_format)
    engine = Engine(loaded, max_batch=max(streams + [4]), compile="off")  # bench decode measures compiled
    try:
        figures = _measure(engine, streams, max_new_tokens, repeats)
    finally:
        engine.close()
        loaded.chat_format = loaded.chat_format._format
    return {
        "model": loaded.name,
        "precision": loaded.precision.label,
        "device": str(loaded.device),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "batched_decode": engine.runner.batched,
        **figures,
    }


def format_concurrency_report(r: dict) -> str:
    where = (
        f"{r['device']}, client side"
        if r["device"].startswith("remote")
        else f"{r['device']} (torch {r['torch']}, {r['threads']} threads)"
    )
    lines = [
        f"bench concurrency: {r['model']} {r['precision']} on {where}, {r['max_new_tokens']} new tokens per stream, "
        "greedy",
        "streams  aggregate tok/s  ratio to 1  per-stream tok/s  ttft median  ttft max  step ms  forward ms  "
        "overhead (goal <= 10 %)",
    ]
    for run in r["runs"]:
        ratio = f"{run['ratio_to_one_stream']:.2f}x" if run["ratio_to_one_stream"] else "-"
        lines.append(
            f"{run['streams']:>7}  {run['aggregate_tokens_per_s']:>15.1f}  {ratio:>10}  "
            f"{run['per_stream_tokens_per_s']:>16.1f}  {run['ttft_median_s']:>10.2f}s  {run['ttft_max_s']:>7.2f}s"
            + (
                f"  {run['step_ms']:>7.1f}  {run['forward_ms']:>10.1f}  {run['overhead']:>8.1%}"
                if "step_ms" in run
                else ""
            )
        )
    lines.append(
        f"newcomer (3 streams running, a 4th arrives): time to first token {r['newcomer_ttft_s']:.2f} s (goal <= 1 s)"
    )
    return "\n".join(lines)
