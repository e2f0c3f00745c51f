"""The compiled decode path: the same greedy tokens as eager (alone and in a batch), eager while compiling, a
failed compile falls back to eager and says why, GLM_COMPILE=off changes nothing.

Compiles are the cost here (seconds a graph for the tiny models; SmolLM2's, a minute or more a graph on 2 cores,
is compiled once, in tests/test_against_transformers.py, against generate()): each model's engine compiles once
per module and inductor's on-disk cache (GLM_CACHE_DIR/inductor) is shared across runs.
"""

import dataclasses
import sys
import threading
import time
import uuid

import pytest

from glm_core import ModelSpec, SamplingParams
from glm_core.engine import Engine, compile_yield, fast_decode
from glm_core.engine.fast_decode import FastDecode, batch_bucket, capacity_bucket, compile_plan
from glm_core.models import cpu_kernels, load_model
from glm_core.models.precision import Precision
from glm_core.settings import load_settings

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea, then explain it line by line in detail.",
    "Hi",
]


def greedy_jobs(lengths):
    return [
        ([{"role": "user", "content": prompt}], SamplingParams(temperature=0, max_new_tokens=n))
        for prompt, n in zip(PROMPTS, lengths)
    ]


def replies(engine, jobs, together=True):
    if together:
        requests = [engine.submit(uuid.uuid4().hex, messages, params) for messages, params in jobs]
        return [r.wait(300) for r in requests]
    return [engine.submit(uuid.uuid4().hex, messages, params).wait(300) for messages, params in jobs]


def compiled_engine(loaded, max_batch):
    engine = Engine(loaded, max_batch=max_batch, compile="on")
    assert engine.card().fast_path in ("compiling", "ready")
    assert engine.fast.wait_ready(600) == "ready", engine.card().fast_path
    return engine


def assert_same(got, want):
    for g, w in zip(got, want):
        assert g.error is None and w.error is None, (g.error, w.error)
        assert (g.text, g.finish_reason, g.stats.completion_tokens) == (
            w.text,
            w.finish_reason,
            w.stats.completion_tokens,
        )


def check_exact(loaded, lengths, max_batch):
    jobs = greedy_jobs(lengths)
    eager = Engine(loaded, max_batch=max_batch)  # GLM_COMPILE=off in tests: the eager path
    try:
        assert eager.card().fast_path == "off"
        want_alone, want_batch = replies(eager, jobs, together=False), replies(eager, jobs)
    finally:
        eager.close()
    engine = compiled_engine(loaded, max_batch)
    try:
        steps = engine.fast.steps
        got_alone = replies(engine, jobs, together=False)  # batch 1: the bucket-1 graph
        assert engine.fast.steps > steps
        got_batch = replies(engine, jobs)  # rows that finish early leave: buckets change under the others
        assert engine.card().fast_path == "ready"
    finally:
        engine.close()
    assert_same(got_alone, want_alone)
    assert_same(got_batch, want_batch)
    assert_same(want_batch, want_alone)


@pytest.mark.slow  # over 4 s here: left out of `make test-fast`
def test_each_engine_runs_only_its_own_graphs(tiny_model_dir):
    """Dynamo skips its guards on the model's modules (a millisecond a step), which is safe only because each
    engine's graphs are its own: a second engine, over a model whose step takes the same inputs (a BF16 cache
    of the same shape) but has other layers (INT8), compiles its own graphs while the first one lives, and each
    gives its eager tokens through its graphs. Shared graphs fail here: the INT8 model has no float weights."""
    bf16, int8 = (load_model(ModelSpec(str(tiny_model_dir), level, "cpu")) for level in ("bf16", "int8"))
    jobs = greedy_jobs([12, 12])
    want = {}
    for name, loaded in (("bf16", bf16), ("int8", int8)):
        eager = Engine(loaded, max_batch=1)
        want[name] = replies(eager, jobs, together=False)
        eager.close()
    first = compiled_engine(bf16, 1)  # one graph each: the one-row step
    try:
        second = compiled_engine(int8, 1)
        try:
            for name, engine in (("bf16", first), ("int8", second), ("bf16", first)):
                steps = engine.fast.steps
                assert_same(replies(engine, jobs, together=False), want[name])
                assert engine.fast.steps > steps and engine.card().fast_path == "ready", name
        finally:
            second.close()
    finally:
        first.close()


def test_buckets_and_capacities():
    assert [batch_bucket(n, 16) for n in (1, 2, 3, 5, 9, 16)] == [1, 2, 4, 8, 16, 16]
    assert batch_bucket(5, 6) == 6 and batch_bucket(3, 3) == 3  # never more rows than the slot cache has
    assert [capacity_bucket(p) for p in (1, 256, 257, 700, 2000)] == [256, 256, 512, 1024, 2048]


@pytest.mark.slow  # over 4 s here: left out of `make test-fast`
@pytest.mark.parametrize("fixture", ["glm2", "glm3"])
def test_compiled_greedy_tokens_equal_eager_on_chatglm(request, fixture):
    loaded = load_model(ModelSpec(str(request.getfixturevalue(fixture)[0]), "fp32", "cpu"))
    check_exact(loaded, [12, 4, 10], max_batch=4)


@pytest.mark.slow  # over 4 s here: left out of `make test-fast`
def test_engine_serves_eagerly_while_compiling_and_switches_when_ready(tiny_loaded, monkeypatch):
    gate = __import__("threading").Event()
    warm = FastDecode._warm

    def slow_warm(self, key):
        gate.wait(60)
        return warm(self, key)

    monkeypatch.setattr(FastDecode, "_warm", slow_warm)
    engine = Engine(tiny_loaded, max_batch=1, compile="on")
    try:
        jobs = greedy_jobs([6])
        first = replies(engine, jobs)[0]  # served while the graph is held back
        assert first.error is None and first.stats.completion_tokens == 6
        assert engine.card().fast_path == "compiling" and engine.fast.steps == 0
        gate.set()
        assert engine.fast.wait_ready(300) == "ready"
        again = replies(engine, jobs)[0]
        assert engine.fast.steps > 0 and again.text == first.text
    finally:
        gate.set()
        engine.close()


def test_a_compile_failure_falls_back_to_eager_and_says_why(tiny_loaded, monkeypatch):
    def broken(self, key):
        raise RuntimeError("inductor exploded\nlong traceback")

    monkeypatch.setattr(FastDecode, "_warm", broken)
    engine = Engine(tiny_loaded, max_batch=2, compile="on")
    try:
        assert engine.fast.wait_ready(60) == "failed: RuntimeError: inductor exploded"
        assert engine.card().fast_path == "failed: RuntimeError: inductor exploded"
        reply = replies(engine, greedy_jobs([5, 5]))
        assert all(r.error is None and r.stats.completion_tokens == 5 for r in reply)
    finally:
        engine.close()


def test_a_failing_compiled_step_falls_back_to_eager_for_that_step(tiny_loaded):
    engine = compiled_engine(tiny_loaded, max_batch=1)
    try:
        want = replies(engine, greedy_jobs([6]))[0]

        def broken(*args):
            raise RuntimeError("graph failed at run time")

        engine.fast._compiled = broken
        got = replies(engine, greedy_jobs([6]))[0]
        assert engine.card().fast_path == "failed: RuntimeError: graph failed at run time"
        assert got.error is None and got.text == want.text
    finally:
        engine.close()


def test_glm_compile_setting(tiny_loaded, tiny_model_dir, monkeypatch):
    assert load_settings({}).compile == "auto"
    assert load_settings({"GLM_COMPILE": "ON"}).compile == "on"
    with pytest.raises(ValueError, match="GLM_COMPILE"):
        load_settings({"GLM_COMPILE": "sometimes"})
    assert compile_plan("off", tiny_loaded, 16) == ((), "off (GLM_COMPILE=off)")
    assert compile_plan("on", tiny_loaded, 16)[0] == (1, 2, 4, 8, 16)
    assert compile_plan("on", tiny_loaded, 6)[0] == (1, 2, 4, 6)
    assert compile_plan("auto", tiny_loaded, 16)[0] == (1,)  # CPU: one row (where it measured faster)
    # INT4 on our CPU kernel: every batch size (its batched compiled steps measured 1.3-1.9x eager); on PyTorch's
    # int4 kernel, one row.
    int4 = dataclasses.replace(tiny_loaded, precision=Precision.INT4)
    monkeypatch.setattr(cpu_kernels, "INT4_MM", object())
    buckets, scope = compile_plan("auto", int4, 16)
    assert buckets == (1, 2, 4, 8, 16) and "INT4 on our CPU kernel" in scope
    monkeypatch.setattr(cpu_kernels, "INT4_MM", None)
    assert compile_plan("auto", int4, 16)[0] == (1,)
    # BF16 with its layers on our BF16 product: every batch size too (1.22-1.27x eager at 4 and 16 streams).
    bf16 = load_model(ModelSpec(str(tiny_model_dir), "bf16", "cpu"))
    on_ours = any(type(m).__name__ == "KernelLinear" for m in bf16.model.modules())
    assert on_ours == (cpu_kernels.BF16_MM is not None)
    buckets, scope = compile_plan("auto", bf16, 16)
    assert buckets == ((1, 2, 4, 8, 16) if on_ours else (1,))
    assert ("BF16 on our CPU product" in scope) == on_ours
    started = []
    monkeypatch.setattr(fast_decode, "FastDecode", lambda *a, **k: started.append(a))
    engine = Engine(tiny_loaded)  # GLM_COMPILE=off (tests/conftest.py): nothing compiles, the card says off
    try:
        assert engine.fast is None and engine.runner.fast is None and engine.card().fast_path == "off"
        assert engine.card().fast_path_scope == "off (GLM_COMPILE=off)"
    finally:
        engine.close()
    assert not started


@pytest.mark.slow  # over 4 s here: left out of `make test-fast`
def test_perplexity_through_the_compiled_step_equals_eager(tiny_loaded):
    """bench quant --compiled: the same text, tokens and windows teacher-forced through the compiled decode step
    give the eager forward's perplexity (FP32: equal up to the order of float additions)."""
    from glm_core.bench.quant import EVAL_TEXT, perplexity, perplexity_compiled

    text = EVAL_TEXT.read_text()
    eager = perplexity(tiny_loaded, text, 300, window=128)
    compiled = perplexity_compiled(tiny_loaded, text, 300, window=128)
    assert compiled == pytest.approx(eager, rel=1e-4)
    assert perplexity_compiled(tiny_loaded, text, 300, window=64) != pytest.approx(eager, rel=1e-4)  # windows count


def test_auto_on_cpu_compiles_one_row_and_decodes_batches_eagerly(tiny_loaded):
    jobs = greedy_jobs([8, 8, 8])
    eager = Engine(tiny_loaded, max_batch=4)
    try:
        want = replies(eager, jobs)
    finally:
        eager.close()
    engine = Engine(tiny_loaded, max_batch=4, compile="auto")
    try:
        assert engine.fast.wait_ready(600) == "ready"
        assert "batched steps decode eagerly" in engine.card().fast_path_scope
        alone = replies(engine, jobs[:1])[0]
        steps = engine.fast.steps
        assert steps > 0  # one row: the compiled graph
        assert_same([alone], want[:1])
        assert_same(replies(engine, jobs), want)  # three rows: eager, and no batched graph was ever queued
        assert {rows for rows, _ in engine.fast.ready_keys()} == {1} and engine.fast.status() == "ready"
    finally:
        engine.close()


@pytest.mark.slow  # over 4 s here: left out of `make test-fast`
def test_graphs_compile_only_while_the_engine_is_idle(tiny_loaded, monkeypatch):
    """Compiling holds the GIL for long stretches, so a graph a reply asks for (its context outgrew the capacity)
    compiles after that reply, never during it."""
    started = []
    warm = FastDecode._warm

    def recording_warm(self, key):
        started.append((key, engine._idle()))
        return warm(self, key)

    monkeypatch.setattr(FastDecode, "_warm", recording_warm)
    engine = Engine(tiny_loaded, max_batch=1, compile="on")
    try:
        assert engine.fast.wait_ready(300) == "ready"
        reply = replies(engine, greedy_jobs([300]))[0]  # past 256 positions: it asks for the 512 graph
        assert reply.error is None and reply.stats.completion_tokens == 300
        assert engine.fast.wait_ready(300) == "ready"
        assert [key for key, _ in started] == [(1, 256), (1, 512)]
        assert all(idle for _, idle in started), started
    finally:
        engine.close()


def gil_handovers(kind: str, busy: bool) -> dict:
    """A compile-like thread (2,000 calls of pure Python) under a Yielder of `kind`, the engine's thread saying it
    has work just before: how often the hook asked whether the engine is busy, how many times a third thread got
    the GIL meanwhile, and whether the hook was still on at the end. With a switch interval of a minute, the third
    thread (waking every half millisecond) runs only when the compiling one gives the GIL up: when it sleeps."""
    asked, woke, seen = [], [0], {}
    stop, ready, go = threading.Event(), threading.Event(), threading.Event()
    compile_yield.KIND = kind
    yielder = compile_yield.Yielder(lambda: asked.append(busy) or busy)

    def other():
        while not stop.is_set():
            woke[0] += 1
            time.sleep(0.0005)

    def work():  # a Python call, which both hooks see
        return len(asked)

    def compiling():
        with yielder.compiling():
            ready.set()
            go.wait()
            before = woke[0]
            for _ in range(2000):
                work()
            seen["handovers"] = woke[0] - before
            seen["on_at_end"] = sys.getprofile() is not None or sys.gettrace() is not None
        seen["on_after"] = sys.getprofile() is not None or sys.gettrace() is not None

    interval = sys.getswitchinterval()
    threads = [threading.Thread(target=other), threading.Thread(target=compiling)]
    for thread in threads:
        thread.start()
    ready.wait()
    yielder.engine_working()  # the engine's thread has work: the C hook goes on the compiling thread
    sys.setswitchinterval(60)
    try:
        go.set()
        threads[1].join()
    finally:
        sys.setswitchinterval(interval)
        stop.set()
        threads[0].join()
    return {"kind": yielder.kind, "asked": len(asked), **seen}


@pytest.mark.parametrize("kind", ["C", "Python"])
def test_a_compile_gives_the_gil_back_while_the_engine_has_work(kind, monkeypatch):
    """A graph that began compiling while the engine was idle keeps running when a request comes, so the compile
    thread sleeps YIELD_S, the GIL released, after each COMPILE_SLICE_S (0 here) while the engine has work, and
    holds on while it is idle. The C hook (where a compiler and Python's headers are: here) goes on when the engine
    says it has work and takes itself off once it is idle; the Python one is on for the whole compile. Neither
    outlives the compile. (What they buy and cost: `scripts/bench_compile_contention.py`.)"""
    if kind == "C" and not callable(compile_yield.native_on()):
        pytest.skip(f"the C hook cannot be built here: {compile_yield.native_on()}")
    monkeypatch.setattr(compile_yield, "KIND", None)
    monkeypatch.setattr(compile_yield, "COMPILE_SLICE_S", 0.0)  # ask at each check (one in 64 events)
    monkeypatch.setattr(compile_yield, "YIELD_S", 0.001)
    busy = gil_handovers(kind, busy=True)
    assert busy["kind"] == kind and busy["asked"] >= 10 and busy["handovers"] >= 1, busy
    assert busy["on_at_end"] and not busy["on_after"]
    idle = gil_handovers(kind, busy=False)
    assert idle["handovers"] == 0 and not idle["on_after"], idle
    if kind == "C":  # asked once, then off: the rest of the compile runs unprofiled
        assert idle["asked"] == 1 and not idle["on_at_end"], idle
    else:
        assert idle["asked"] >= 10 and idle["on_at_end"], idle


def test_a_compile_under_the_hook_gives_a_working_graph(tiny_loaded, monkeypatch):
    """A compile that runs under the hook from start to end (the engine busy throughout; the C hook here) gives
    a graph that decodes as the eager step does."""
    hooked = []
    warm = FastDecode._warm

    def hooked_warm(self, key):
        self.engine_working()  # what the engine's thread does when a request comes
        hooked.append(sys.getprofile() is not None or sys.gettrace() is not None)
        warm(self, key)
        hooked.append(sys.getprofile() is not None or sys.gettrace() is not None)

    monkeypatch.setattr(compile_yield, "YIELD_S", 0.0001)  # the hook's pauses, short: the compile's own time
    monkeypatch.setattr(FastDecode, "_engine_busy", lambda self: True)
    monkeypatch.setattr(FastDecode, "_warm", hooked_warm)
    engine = Engine(tiny_loaded, max_batch=1, compile="on")
    try:
        assert engine.fast.wait_ready(300) == "ready" and hooked == [True, True]
        assert engine.fast.yielder.kind == ("C" if callable(compile_yield.native_on()) else "Python")
        compiled = replies(engine, greedy_jobs([20]))[0]
    finally:
        engine.close()
    eager = Engine(tiny_loaded, max_batch=1, compile="off")
    try:
        assert compiled.text == replies(eager, greedy_jobs([20]))[0].text
    finally:
        eager.close()


def test_grouped_decode_attention_equals_keys_repeated_per_head():
    """The compiled step's attention (query heads grouped by key/value head, no copy of the cache) gives what
    transformers' sdpa gives with every key and value repeated per query head, under a padding mask that differs
    per row; a prompt's several queries go to transformers' own."""
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    generator = torch.Generator().manual_seed(0)
    rows, heads, kv_heads, capacity, dim = 3, 9, 3, 40, 16
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = heads // kv_heads, True
    keys, values = (torch.randn(rows, kv_heads, capacity, dim, generator=generator) for _ in range(2))
    query = torch.randn(rows, heads, 1, dim, generator=generator)
    mask = (torch.arange(capacity)[None, :] <= torch.tensor([5, 39, 17])[:, None])[:, None, None, :]
    ours, _ = fast_decode.grouped_decode_attention(module, query, keys, values, mask, scaling=0.25)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, repeat_kv(keys, 3), repeat_kv(values, 3), attn_mask=mask, scale=0.25
    ).transpose(1, 2)
    torch.testing.assert_close(ours, expected)
    prompt = torch.randn(rows, heads, 4, dim, generator=generator)
    causal = mask.expand(rows, 1, 4, capacity)
    torch.testing.assert_close(
        fast_decode.grouped_decode_attention(module, prompt, keys, values, causal, scaling=0.25)[0],
        sdpa_attention_forward(module, prompt, keys, values, causal, scaling=0.25)[0],
    )


EXIT_WHILE_COMPILING = """
import sys, time
from glm_core import ModelSpec
from glm_core.engine import Engine, fast_decode
from glm_core.models import load_model
if sys.argv[2] == "without":
    import atexit
    atexit.unregister(fast_decode._finish_compiles)
engine = Engine(load_model(ModelSpec(sys.argv[1], "fp32", "cpu")), max_batch=4, compile="on")
while not engine.fast.compile_seconds:  # the first graph is ready: the next one is compiling now
    time.sleep(0.05)
time.sleep(0.3)
print("exiting while compiling", engine.fast.status(), flush=True)
"""


@pytest.mark.slow  # compiles graphs in a child process: left out of `make test-fast`
def test_a_process_that_exits_while_a_graph_compiles_exits_cleanly(tiny_model_dir, tmp_path):
    """An engine left open (or closed) while its background compile is inside inductor: the interpreter's exit
    waits for that graph instead of aborting ("terminate called without an active exception", status 134)."""
    import os
    import subprocess
    import sys

    script = tmp_path / "exit_while_compiling.py"
    script.write_text(EXIT_WHILE_COMPILING)
    env = {**os.environ, "GLM_COMPILE": "on"}
    done = subprocess.run(
        [sys.executable, str(script), str(tiny_model_dir), "with"], capture_output=True, text=True, timeout=600, env=env
    )
    assert "exiting while compiling compiling" in done.stdout, done.stdout + done.stderr[-3000:]
    assert done.returncode == 0, done.stderr[-3000:]
    assert "waiting for 1 decode-graph compile(s) to stop before exiting" in done.stderr


def test_compiled_graphs_go_under_the_cache_dir_unless_the_user_chose_a_place(tmp_path, monkeypatch):
    """The graphs are kept where GLM_CACHE_DIR says, so a restart (or a reboot) compiles from disk. Importing
    torch._dynamo writes inductor's default folder (under the temp dir) into the environment: that is not a
    user's choice. A place the user set is kept."""
    import torch._dynamo  # noqa: F401  (what loading a model does first)
    from torch._inductor.runtime.cache_dir_utils import cache_dir, default_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    assert fast_decode.configure_compile_cache(tmp_path) == tmp_path / "inductor"
    assert cache_dir() == str(tmp_path / "inductor")

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    assert fast_decode.configure_compile_cache(tmp_path) == tmp_path / "inductor"

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert fast_decode.configure_compile_cache(tmp_path) == tmp_path / "mine"
    assert fast_decode.configure_compile_cache(tmp_path / "cold", exact=True) == tmp_path / "cold"
