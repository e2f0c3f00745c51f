"""How fast a reply decodes while the engine's decode graphs compile in the background, against the same reply on
an engine that compiles nothing, in one run.

    .venv/bin/python scripts/bench_compile_contention.py [--precision bf16] [--tokens 200] [--repeats 3]

A graph starts compiling once the engine has been idle for a second; a request that comes meanwhile decodes
eagerly beside the compile, which is Python in a thread of the same process. Each run makes an engine whose
inductor cache is empty (so its first graph compiles cold), waits until that compile has begun, then sends one
greedy reply; the baseline is an engine with `compile="off"`. Prints each run's decode rate (tokens after the first
over their time, the reply's own stats) and the median ratio. Run it alone.
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
from glm_core.engine import Engine
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    loaded = load_model(ModelSpec(precision=args.precision))
    flags = ", ".join(sorted(f for f in cpu_flags() if f.startswith(("avx", "amx"))))
    print(f"bench compile contention: {loaded.name} {args.precision} on {flags}; {args.tokens} greedy tokens")
    alone, beside = [], []
    for _ in range(args.repeats):
        engine = Engine(loaded, compile="off")
        alone.append(rate(engine, args.tokens))
        engine.close()
        cache = tempfile.mkdtemp(prefix="glm-contention-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # a cold compile
        engine = Engine(loaded, compile="on")
        time.sleep(IDLE_BEFORE_COMPILE_S + 2)  # the first graph is compiling now
        state = engine.card().fast_path
        beside.append(rate(engine, args.tokens))
        still = engine.card().fast_path
        engine.close()
        _finish_compiles()  # the graph being compiled, before its cache goes
        shutil.rmtree(cache, ignore_errors=True)
        print(
            f"  alone {alone[-1]:6.1f} tok/s   while compiling {beside[-1]:6.1f} tok/s   (fast path: {state} -> {still})"
        )
    ratio = statistics.median(beside) / statistics.median(alone)
    print(
        f"median: alone {statistics.median(alone):.1f}, while compiling {statistics.median(beside):.1f} tok/s: {ratio:.2f}x"
    )


if __name__ == "__main__":
    main()
