"""How fast a reply decodes while the engine's decode graphs compile in the background, against the same reply on
an engine that compiles nothing, in one run.

    .venv/bin/python scripts/bench_compile_contention.py [--precision bf16] [--tokens 200] [--repeats 3]
                                                       [--hooks C,Python,none]

A graph starts compiling once the engine has been idle for a second; a request that comes meanwhile decodes
eagerly beside the compile, which is Python in a thread of the same process. Each run makes an engine whose
inductor cache is empty (so its first graph compiles cold), waits until that compile has begun, then sends one
greedy reply; the baseline is an engine with `compile="off"`. Prints each run's decode rate (tokens after the first
over their time, the reply's own stats) and the median ratio. Run it alone.

Each hook that gives the cores back to the engine during a compile (glm_core/engine/compile_yield.py: "C", the
one used where it builds; "Python", its fallback; "none") is measured in turn, with its price: the first graph's
cold compile on an idle engine, in seconds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import uuid

from glm_core import ModelSpec, SamplingParams
from glm_core.engine import Engine, compile_yield, fast_decode
from glm_core.engine.fast_decode import IDLE_BEFORE_COMPILE_S, _finish_compiles
from glm_core.models import load_model
from glm_core.models.precision import cpu_flags

PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


def rate(engine: Engine, tokens: int) -> float:
    params = SamplingParams(temperature=0, max_new_tokens=tokens)
    reply = engine.submit(uuid.uuid4().hex, PROMPT, params).wait(600)
    if reply.error:
        raise SystemExit(f"the reply failed: {reply.error}")
    return reply.stats.decode_tokens_per_s


def cold_engine(loaded) -> tuple[Engine, str]:
    """An engine whose first graph compiles cold, in a fresh inductor cache (the folder to remove after)."""
    cache = tempfile.mkdtemp(prefix="glm-contention-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    return Engine(loaded, compile="on"), cache


def close(engine: Engine, cache: str) -> None:
    engine.close()
    _finish_compiles()  # the graph being compiled, before its cache goes
    shutil.rmtree(cache, ignore_errors=True)


def measure(loaded, tokens: int) -> tuple[float, float, float]:
    """A reply alone; the same reply while the first graph compiles cold; that first graph's cold compile on an
    idle engine (seconds)."""
    engine = Engine(loaded, compile="off")
    alone = rate(engine, tokens)
    engine.close()
    engine, cache = cold_engine(loaded)
    time.sleep(IDLE_BEFORE_COMPILE_S + 2)  # the first graph is compiling now
    assert engine.card().fast_path == "compiling", engine.card().fast_path
    beside = rate(engine, tokens)
    close(engine, cache)
    engine, cache = cold_engine(loaded)
    engine.fast.wait_ready(1800)
    compile_s = engine.fast.compile_seconds[engine.fast.buckets[0], fast_decode.MIN_CAPACITY]
    close(engine, cache)
    return alone, beside, compile_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hooks", default="C,Python,none", help="which hooks, of C, Python, none")
    args = parser.parse_args()
    loaded = load_model(ModelSpec(precision=args.precision))
    flags = ", ".join(sorted(f for f in cpu_flags() if f.startswith(("avx", "amx"))))
    print(f"bench compile contention: {loaded.name} {args.precision} on {flags}; {args.tokens} greedy tokens")
    hooks = args.hooks.split(",")
    runs: dict[str, list[tuple[float, float, float]]] = {hook: [] for hook in hooks}
    for _ in range(args.repeats):
        for hook in hooks:  # interleaved, so that a change in the host's speed falls on every hook alike
            compile_yield.KIND = hook
            runs[hook].append(measure(loaded, args.tokens))
            alone, beside, compile_s = runs[hook][-1]
            print(
                f"  {hook:6s} alone {alone:6.1f} tok/s   while compiling {beside:6.1f} tok/s   "
                f"first graph cold, engine idle: {compile_s:6.1f} s"
            )
    print("medians:")
    bare = statistics.median(c for *_, c in runs["none"]) if "none" in runs else None
    for hook, measured in runs.items():
        alone, beside, compile_s = (statistics.median(column) for column in zip(*measured))
        price = f", {compile_s / bare:.2f}x the compile without a hook" if bare else ""
        print(
            f"  {hook:6s} alone {alone:.1f}, while compiling {beside:.1f} tok/s: {beside / alone:.2f}x; "
            f"compile {compile_s:.1f} s{price}"
        )


if __name__ == "__main__":
    main()
