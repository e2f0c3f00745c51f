"""Benchmarks that print their figures. `bench turns`: what the kept KV cache and the lean decode loop buy."""

from __future__ import annotations

import platform
import statistics
import time
import uuid

import torch

from ..engine.scheduler import Engine
from ..models.loading import LoadedModel
from ..models.openmp import release_pool
from ..protocol import SamplingParams

TURN_PROMPTS = [
    "What is the capital of France?",
    "What is it famous for?",
    "Name three museums there.",
    "Which one is the largest?",
    "How many visitors does it get a year?",
    "What is the best season to visit?",
    "Suggest a one-day walking route.",
    "Where should I eat lunch on that route?",
    "How do I get there from the airport?",
    "Summarize our conversation in two sentences.",
]
DECODE_PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


def _chat_turns(engine: Engine, max_new_tokens: int) -> dict:
    """One 10-turn conversation with the kept cache; before each turn, the same context recomputed from scratch."""
    greedy = SamplingParams(temperature=0, max_new_tokens=max_new_tokens)
    first_token_only = SamplingParams(temperature=0, max_new_tokens=1)
    conversation, messages = uuid.uuid4().hex, []
    reuse, recompute, context, prefill_tokens = [], [], [], []
    for prompt in TURN_PROMPTS:
        messages.append({"role": "user", "content": prompt})
        # Recompute: the whole history prefilled, as the seeds' api.py does (a new conversation asked to recompute:
        # else it would start from the prefix this conversation's kept cache shares with it).
        scratch = uuid.uuid4().hex
        recompute.append(engine.submit(scratch, messages, first_token_only, recompute=True).wait().stats.ttft_s)
        engine.forget(scratch)
        reply = engine.submit(conversation, messages, greedy).wait()
        if reply.error:
            raise RuntimeError(reply.error)
        reuse.append(reply.stats.ttft_s)
        context.append(reply.stats.prompt_tokens)
        prefill_tokens.append(reply.stats.prefill_tokens)
        messages.append({"role": "assistant", "content": reply.text})
    engine.forget(conversation)
    return {
        "ttft_reuse_s": reuse,
        "ttft_recompute_s": recompute,
        "context_tokens": context,
        "prefill_tokens_reuse": prefill_tokens,
    }


class _TokenClock:
    """A transformers streamer that notes when each generated token arrives (its first put is the prompt)."""

    def __init__(self):
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self):
        pass


def _decode_rates(engine: Engine, tokens: int, repeats: int) -> tuple[float, float, int]:
    """Decode tokens/s after the first token: the engine's loop against plain `model.generate`, same prompt."""
    loaded = engine.loaded
    messages = [{"role": "user", "content": DECODE_PROMPT}]
    ids = torch.tensor([engine.encode_chat(messages)], device=loaded.device)
    engine_rates, generate_rates, count = [], [], tokens
    for _ in range(repeats):
        conversation = uuid.uuid4().hex
        reply = engine.submit(conversation, messages, SamplingParams(temperature=0, max_new_tokens=tokens)).wait()
        engine.forget(conversation)
        engine_rates.append(reply.stats.decode_tokens_per_s)
        count = reply.stats.completion_tokens
        # The engine's worker is idle now, so the model can be borrowed for the baseline.
        clock = _TokenClock()
        with torch.inference_mode():
            loaded.model.generate(
                ids,
                max_new_tokens=count,
                min_new_tokens=count,
                do_sample=False,
                streamer=clock,
                attention_mask=torch.ones_like(ids),
                pad_token_id=loaded.tokenizer.pad_token_id or 0,
            )
        generate_rates.append((len(clock.times) - 1) / (clock.times[-1] - clock.times[0]))
        release_pool()  # `generate` ran on this thread: its OpenMP workers would slow the engine's (openmp.py)
    return statistics.median(engine_rates), statistics.median(generate_rates), count


def run_turns_bench(loaded: LoadedModel, max_new_tokens: int = 48, decode_tokens: int = 128, repeats: int = 3) -> dict:
    engine = Engine(loaded, compile="off")  # the eager engine: bench decode measures the compiled path
    try:
        warm = uuid.uuid4().hex  # first calls pay one-off costs (allocator, kernels) that neither side should carry
        engine.submit(
            warm, [{"role": "user", "content": "Hello"}], SamplingParams(temperature=0, max_new_tokens=8)
        ).wait()
        engine.forget(warm)
        runs = [_chat_turns(engine, max_new_tokens) for _ in range(repeats)]
        turns = dict(runs[-1])
        for key in ("ttft_reuse_s", "ttft_recompute_s"):  # per-turn median over the repeated conversations
            turns[key] = [statistics.median(values) for values in zip(*(run[key] for run in runs))]
        engine_tps, generate_tps, count = _decode_rates(engine, decode_tokens, repeats)
    finally:
        engine.close()
    reuse, recompute = turns["ttft_reuse_s"], turns["ttft_recompute_s"]
    return {
        "model": loaded.name,
        "precision": loaded.precision.label,
        "device": str(loaded.device),
        "torch": torch.__version__,
        "repeats": repeats,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        **turns,
        "engine_tokens_per_s": engine_tps,
        "generate_tokens_per_s": generate_tps,
        "decode_tokens": count,
        "reuse_turn10_over_turn1": reuse[-1] / reuse[0],
        "recompute_over_reuse_turn10": recompute[-1] / reuse[-1],
        "engine_over_generate": engine_tps / generate_tps,
    }


def format_turns_report(r: dict) -> str:
    lines = [
        f"bench turns: {r['model']} {r['precision']} on {r['device']} (torch {r['torch']}, {r['threads']} threads, "
        f"median of {r['repeats']} runs)",
        "turn  context  prefilled  ttft reuse  ttft recompute  ratio",
    ]
    for i, (ctx, pre, a, b) in enumerate(
        zip(r["context_tokens"], r["prefill_tokens_reuse"], r["ttft_reuse_s"], r["ttft_recompute_s"]), start=1
    ):
        lines.append(f"{i:>4}  {ctx:>7}  {pre:>9}  {a * 1000:>8.1f}ms  {b * 1000:>12.1f}ms  {b / a:>5.2f}x")
    lines += [
        f"TTFT reuse, turn 10 / turn 1:      {r['reuse_turn10_over_turn1']:.2f}  (goal <= 1.3)",
        f"TTFT recompute / reuse at turn 10: {r['recompute_over_reuse_turn10']:.2f}  (goal >= 3)",
        f"decode ({r['decode_tokens']} tokens): engine {r['engine_tokens_per_s']:.1f} tok/s, "
        f"generate {r['generate_tokens_per_s']:.1f} tok/s, ratio {r['engine_over_generate']:.2f}  (goal >= 0.95)",
    ]
    return "\n".join(lines)
