"""Continuous batching: conversations decoded together get exactly the replies each gets alone; rows join, leave,
stop and get evicted without touching the others; the queue is first-come-first-served beyond the batch limit."""

import threading
import time
import uuid

import pytest
import torch

from glm_core import Delta, ModelSpec, Queued, SamplingParams, Started
from glm_core.engine import Engine
from glm_core.models import load_model

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea, then explain it line by line in detail.",
    "Hi",
    "List five fruits that are yellow and say which one you like best and why it is the best of all.",
]


def alone(loaded, jobs):
    """Each job's reply from an engine that serves one request at a time."""
    engine = Engine(loaded, max_batch=1)
    try:
        return [engine.submit(uuid.uuid4().hex, messages, params).wait(300) for messages, params in jobs]
    finally:
        engine.close()


def together(loaded, jobs, late=()):
    """All jobs submitted at once; jobs whose index is in `late` join once the first reply has streamed 3 deltas."""
    engine = Engine(loaded, max_batch=8)
    try:
        requests = {}
        for i, (messages, params) in enumerate(jobs):
            if i not in late:
                requests[i] = engine.submit(uuid.uuid4().hex, messages, params)
        if late:
            deltas = 0
            for event in requests[0].events():
                deltas += isinstance(event, Delta)
                if deltas == 3:
                    break
            assert requests[0].done is False, "the first reply must still be running when the late ones join"
            for i in late:
                requests[i] = engine.submit(uuid.uuid4().hex, *jobs[i])
        return [requests[i].wait(300) for i in range(len(jobs))]
    finally:
        engine.close()


def assert_same_replies(batched, single):
    for got, want in zip(batched, single):
        assert got.error is None and want.error is None, (got.error, want.error)
        assert got.text == want.text
        assert got.finish_reason == want.finish_reason
        assert got.stats.completion_tokens == want.stats.completion_tokens


@pytest.fixture(scope="module")
def glm2_loaded(glm2):
    return load_model(ModelSpec(str(glm2[0]), "fp32", "cpu"))


@pytest.fixture(scope="module")
def glm3_loaded(glm3):
    return load_model(ModelSpec(str(glm3[0]), "fp32", "cpu"))


def greedy_jobs(lengths):
    return [
        ([{"role": "user", "content": prompt}], SamplingParams(temperature=0, max_new_tokens=n))
        for prompt, n in zip(PROMPTS, lengths)
    ]


@pytest.mark.slow  # over 4 s here: left out of `make test-fast`
def test_batched_greedy_replies_equal_the_replies_alone_on_the_embedded_model(embedded_fp32):
    # Different prompt lengths; one row finishes early (6 tokens), one joins mid-way.
    jobs = greedy_jobs([24, 6, 20, 16])
    assert_same_replies(together(embedded_fp32, jobs, late={3}), alone(embedded_fp32, jobs))


@pytest.mark.parametrize("which", ["glm2_loaded", "glm3_loaded"])
def test_batched_greedy_replies_equal_the_replies_alone_on_chatglm(request, which):
    loaded = request.getfixturevalue(which)
    jobs = greedy_jobs([12, 4, 10, 8])
    assert_same_replies(together(loaded, jobs, late={2}), alone(loaded, jobs))


def test_seeded_sampling_per_row_reproduces_the_reply_alone(tiny_loaded):
    jobs = [
        (
            [{"role": "user", "content": prompt}],
            SamplingParams(temperature=t, top_p=p, top_k=k, repetition_penalty=r, seed=seed, max_new_tokens=15),
        )
        for prompt, t, p, k, r, seed in zip(
            PROMPTS, [0.7, 1.0, 1.3, 0.9], [0.9, 1.0, 0.8, 0.95], [0, 50, 0, 20], [1.0, 1.2, 1.0, 0.9], [1, 2, 3, 4]
        )
    ]
    assert_same_replies(together(tiny_loaded, jobs, late={1}), alone(tiny_loaded, jobs))


@pytest.mark.slow  # over 4 s here: left out of `make test-fast`
def test_greedy_rows_picked_together_beside_penalised_and_sampled_rows_reproduce_each_alone(embedded_fp32):
    """Plain greedy rows are picked with one argmax over the batch; a greedy row with a repetition penalty and a
    sampled row in the same batch still get their own treatment."""
    controls = [
        SamplingParams(temperature=0, max_new_tokens=14),
        SamplingParams(temperature=0, repetition_penalty=1.3, max_new_tokens=14),
        SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_new_tokens=14),
        SamplingParams(temperature=0, max_new_tokens=9),
    ]
    prompts = [PROMPTS[3], PROMPTS[3], PROMPTS[1], PROMPTS[0]]  # the first two differ only by the penalty
    jobs = [([{"role": "user", "content": prompt}], params) for prompt, params in zip(prompts, controls)]
    batched = together(embedded_fp32, jobs)
    assert_same_replies(batched, alone(embedded_fp32, jobs))
    assert batched[0].text != batched[1].text, "the penalty must change the penalised row's greedy reply"


def test_the_runner_times_each_decode_step_against_its_forward(tiny_loaded):
    engine = Engine(tiny_loaded, max_batch=4, compile="off")
    try:
        timing = engine.runner.timing
        params = SamplingParams(temperature=0, max_new_tokens=12)
        requests = [engine.submit(uuid.uuid4().hex, [{"role": "user", "content": p}], params) for p in PROMPTS[:3]]
        replies = [r.wait(300) for r in requests]
        tokens = sum(r.stats.completion_tokens for r in replies)
        # Each reply's first token comes from its prefill; every later one from a decode step's row.
        assert timing.rows == tokens - len(replies)
        assert max(r.stats.completion_tokens for r in replies) - 1 <= timing.steps <= timing.rows
        assert 0 < timing.forward_s < timing.decode_s
        assert engine.load_report().decoded_tokens == timing.rows  # what /health says
    finally:
        engine.close()


def test_bench_concurrency_reports_each_runs_step_against_its_forward(tiny_loaded):
    from glm_core.bench.concurrency import format_concurrency_report, run_concurrency_bench

    report = run_concurrency_bench(tiny_loaded, [1, 3], max_new_tokens=6)
    for run in report["runs"]:
        assert 0 < run["forward_ms"] < run["step_ms"] and 0 < run["overhead"] < 1
    assert "overhead (goal <= 10 %)" in format_concurrency_report(report)


@pytest.mark.slow  # over 4 s here: left out of `make test-fast`
def test_stopping_one_row_leaves_the_others_untouched(tiny_loaded):
    jobs = greedy_jobs([30, 2000, 30])  # the middle one would run long: it is stopped after two deltas
    want = alone(tiny_loaded, jobs)
    engine = Engine(tiny_loaded, max_batch=4)
    try:
        requests = [engine.submit(uuid.uuid4().hex, messages, params) for messages, params in jobs]
        deltas = 0
        for event in requests[1].events():
            deltas += isinstance(event, Delta)
            if deltas == 2:
                requests[1].stop()
                break
        got = [r.wait(300) for r in requests]
    finally:
        engine.close()
    assert got[1].finish_reason == "stopped" and got[1].stats.completion_tokens < 2000
    assert want[1].text.startswith(got[1].text)
    assert_same_replies([got[0], got[2]], [want[0], want[2]])


@pytest.mark.slow  # over 4 s here: left out of `make test-fast`
def test_eviction_while_batched_rebuilds_the_conversation_exactly(embedded_fp32):
    # A budget that holds about one conversation's cache: finishing rows evict each other while others run.
    engine = Engine(embedded_fp32, kv_cache_bytes=8 * 2**20, max_batch=4)
    params = SamplingParams(temperature=0, max_new_tokens=12)
    try:
        histories = {c: [{"role": "user", "content": p}] for c, p in zip("abc", PROMPTS)}
        for _turn in range(2):
            requests = {c: engine.submit(c, h, params) for c, h in histories.items()}
            for c, request in requests.items():
                reply = request.wait(300)
                assert reply.error is None
                histories[c] += [{"role": "assistant", "content": reply.text}, {"role": "user", "content": "And then?"}]
        assert engine.pool.evictions > 0
        requests = {c: engine.submit(c, h, params) for c, h in histories.items()}
        kept = {c: r.wait(300) for c, r in requests.items()}
        recomputed = {c: engine.submit(f"fresh-{c}", h, params, recompute=True).wait(300) for c, h in histories.items()}
    finally:
        engine.close()
    for c in histories:
        assert kept[c].text == recomputed[c].text


def test_sixteen_threads_five_turns_each_reply_lands_in_its_own_conversation(tiny_loaded):
    params = SamplingParams(temperature=0, max_new_tokens=6)
    engine = Engine(tiny_loaded, max_batch=16)
    histories, errors = {}, []

    def chat(number):
        conversation, messages = f"conversation-{number}", []
        try:
            for turn in range(5):
                messages.append(
                    {"role": "user", "content": f"Thread {number} asks question {turn}: {PROMPTS[turn % 4]}"}
                )
                reply = engine.submit(conversation, messages, params).wait(300)
                if reply is None or reply.error:
                    errors.append((number, turn, reply and reply.error))
                    return
                messages.append({"role": "assistant", "content": reply.text})
            histories[number] = messages
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append((number, repr(exc)))

    threads = [threading.Thread(target=chat, args=(n,)) for n in range(16)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
    finally:
        engine.close()
    assert errors == [] and len(histories) == 16
    # Each thread's replies are exactly what its own conversation, replayed alone from scratch, gives.
    reference = Engine(tiny_loaded, max_batch=1)
    try:
        for number, messages in histories.items():
            for end in range(1, len(messages), 2):
                reply = reference.submit(uuid.uuid4().hex, messages[:end], params, recompute=True).wait(300)
                assert reply.text == messages[end]["content"], (number, end)
    finally:
        reference.close()


def test_requests_beyond_the_batch_wait_in_line_and_see_their_place(tiny_loaded):
    engine = Engine(tiny_loaded, max_batch=2)
    try:  # the first ends well before the second, so the third starts alone and the fourth moves up to 1
        requests = [
            engine.submit(
                f"c{i}",
                [{"role": "user", "content": PROMPTS[i]}],
                SamplingParams(temperature=0, max_new_tokens=[5, 400, 25, 25][i]),
            )
            for i in range(4)
        ]
        events = [list(r.events()) for r in requests]
    finally:
        engine.close()
    # Nobody waits while the batch has room; the others see their place in line, first come first served.
    for first in events[:2]:
        assert not any(isinstance(e, Queued) for e in first) and isinstance(first[0], Started)
    third = [e.position for e in events[2] if isinstance(e, Queued)]
    fourth = [e.position for e in events[3] if isinstance(e, Queued)]
    assert third[0] == 1 and fourth[0] == 2 and fourth[-1] == 1
    assert all(e.finish_reason for e in (r.reply for r in requests))


def test_load_report_counts_running_and_waiting(tiny_loaded):
    engine = Engine(tiny_loaded, max_batch=1)
    try:
        first = engine.submit(
            "a", [{"role": "user", "content": "Hi"}], SamplingParams(temperature=0, max_new_tokens=200)
        )
        second = engine.submit(
            "b", [{"role": "user", "content": "Hi"}], SamplingParams(temperature=0, max_new_tokens=5)
        )
        next(e for e in first.events() if isinstance(e, Delta))
        report = engine.load_report()
        assert (report.running, report.waiting, report.max_batch) == (1, 1, 1)
        first.stop()
        second.wait(300)
        assert engine.load_report().waiting == 0
    finally:
        engine.close()


def test_queue_bounds_refuse_clearly_and_an_owner_runs_one_at_a_time(tiny_loaded, monkeypatch):
    from glm_core import QueueFull

    monkeypatch.setenv("GLM_MAX_WAITING", "3")
    monkeypatch.setenv("GLM_MAX_WAITING_PER_OWNER", "2")
    engine = Engine(tiny_loaded, max_batch=1)
    long = SamplingParams(temperature=0, max_new_tokens=3000)
    hi = [{"role": "user", "content": "Hi"}]
    try:
        running = engine.submit("a", hi, long)
        next(e for e in running.events() if isinstance(e, Delta))
        mine = [engine.submit(f"w{i}", hi, long, owner="workspace-1") for i in range(2)]
        with pytest.raises(QueueFull, match="you already have 2 request"):
            engine.submit("w2", hi, long, owner="workspace-1")
        other = engine.submit("x", hi, long, owner="workspace-2")
        with pytest.raises(QueueFull, match="busy"):
            engine.submit("y", hi, long)
        report = engine.load_report()
        assert (report.running, report.waiting, report.max_batch) == (1, 3, 1)
        assert "w2" not in engine._active  # a refused request leaves nothing behind
        for request in [running, *mine, other]:
            request.stop()
            assert request.wait(60).stopped
    finally:
        engine.close()


def test_an_owner_with_a_reply_running_waits_while_others_start(tiny_loaded):
    engine = Engine(tiny_loaded, max_batch=4)
    hi = [{"role": "user", "content": "Hi"}]
    try:
        first = engine.submit("a", hi, SamplingParams(temperature=0, max_new_tokens=3000), owner="w1")
        next(e for e in first.events() if isinstance(e, Delta))
        second = engine.submit("b", hi, SamplingParams(temperature=0, max_new_tokens=5), owner="w1")
        other = engine.submit("c", hi, SamplingParams(temperature=0, max_new_tokens=5), owner="w2")
        assert other.wait(60).finish_reason == "length" and not second.done  # w2 started; w1's second waited
        first.stop()
        assert second.wait(60).finish_reason == "length"
    finally:
        engine.close()


def test_an_owner_may_run_several_when_configured(tiny_loaded, monkeypatch):
    monkeypatch.setenv("GLM_MAX_RUNNING_PER_OWNER", "2")
    engine = Engine(tiny_loaded, max_batch=4)
    hi = [{"role": "user", "content": "Hi"}]
    long = SamplingParams(temperature=0, max_new_tokens=3000)
    try:
        mine = [engine.submit(f"k{i}", hi, long, owner="batch-key") for i in range(3)]

        def load_becomes(running, waiting):
            deadline = time.monotonic() + 60
            while (engine.load_report().running, engine.load_report().waiting) != (running, waiting):
                assert time.monotonic() < deadline, engine.load_report()
                time.sleep(0.05)

        load_becomes(2, 1)  # two of the key's requests decode together, the third waits with a free place
        mine[0].stop()
        assert mine[0].wait(60).stopped
        load_becomes(2, 0)  # the third starts when one ends
        for request in mine[1:]:
            request.stop()
            assert request.wait(60).stopped
    finally:
        engine.close()


def test_slot_cache_holds_rows_exactly_and_grows_only_as_needed():
    import torch
    from transformers import DynamicCache, LlamaConfig

    from glm_core.engine.kv_slots import CAPACITY_STEP, SlotCache

    config = LlamaConfig(num_hidden_layers=2, num_key_value_heads=2, num_attention_heads=2, hidden_size=16)

    def cache(length, seed):
        c = DynamicCache(config=config)
        g = torch.Generator().manual_seed(seed)
        for i in range(2):
            c.update(torch.randn(1, 2, length, 8, generator=g), torch.randn(1, 2, length, 8, generator=g), i)
        return c

    slots = SlotCache(2, 2, 8, torch.float32, torch.device("cpu"), slots=16)
    originals = [cache(n, n) for n in (5, 300, 7)]
    for c in originals:
        slots.add(c)
    # Three rows allocate four slots (not sixteen) of two capacity steps each.
    assert slots.rows == 4 and slots.capacity == 2 * CAPACITY_STEP
    assert slots.nbytes() == 4 * 2 * CAPACITY_STEP * slots.bytes_per_position()
    # Taking the first row out gives its exact cache back, and the last row moves into its slot.
    first = slots.take(0, config)
    assert torch.equal(first.layers[1].keys, originals[0].layers[1].keys)
    assert slots.lengths == [7, 300]
    moved = slots.take(0, config)
    assert torch.equal(moved.layers[0].values, originals[2].layers[0].values)


def test_a_long_prompt_is_prefilled_in_chunks_between_the_others_decode_steps(tiny_loaded):
    """~3,000 prompt tokens submitted while another reply streams: the streaming row gets a decode step between
    every two prefill chunks (counted, not timed), and the long prompt's own reply equals its reply alone."""
    from glm_core.engine.generation import PREFILL_CHUNK

    engine = Engine(tiny_loaded, max_batch=4)
    try:
        stream = engine.submit(
            "streaming",
            [{"role": "user", "content": "Tell me a long story."}],
            SamplingParams(max_new_tokens=3000, max_length=4096, temperature=1.0, seed=2),
        )
        deltas, first = [], threading.Event()

        def read() -> None:
            for event in stream.events():
                if isinstance(event, Delta):
                    deltas.append(event)
                    first.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        assert first.wait(60)
        long_prompt = [{"role": "user", "content": "word " * 2990}]
        params = SamplingParams(max_new_tokens=4, max_length=4096, temperature=0)
        long_request = engine.submit("long", long_prompt, params)
        before = None
        for event in long_request.events():
            if isinstance(event, Started):  # admitted: its prefill begins
                before = len(deltas)
        reply = long_request.wait(60)
        stream.stop()
        reader.join(60)
        chunks = reply.stats.prompt_tokens // PREFILL_CHUNK
        assert reply.stats.prompt_tokens > 2900 and chunks >= 5
        # Between Started (prefill begins) and the end of the long request, the stream kept receiving deltas: at
        # least one per prefill chunk but the last.
        assert len(deltas) - before >= chunks - 1, (len(deltas) - before, chunks)
    finally:
        engine.close()
    assert reply.text == alone(tiny_loaded, [(long_prompt, params)])[0].text


def test_the_step_plan_feeds_prompts_first_come_within_the_budget():
    """The scheduler's plan of one iteration (engine.step_plan): chunks in arrival order within the prefill budget,
    the rest of a long prompt at the next iteration, whoever comes behind a prompt that did not fit waits, a
    prefilled sequence only joins, a stopped one leaves, and a model that needs its whole prompt gets it whole."""
    from glm_core.engine.runner import Sequence
    from glm_core.engine.step_plan import Chunk, plan_step
    from glm_core.protocol import ReplyStats, Request

    def sequence(prompt: int, fed: int = 0) -> Sequence:
        request = Request(uuid.uuid4().hex, [{"role": "user", "content": "x"}], SamplingParams())
        return Sequence(request, list(range(prompt)), None, fed, prompt, 4, 0.0, ReplyStats())

    long, short, behind, joining, stopped = sequence(700), sequence(100), sequence(50), sequence(30, 30), sequence(9)
    stopped.request.stop()
    plan = plan_step([stopped, joining, long, short, behind], [], 512, whole_prompt=False)
    assert plan.stopped == (stopped,) and plan.decode
    assert plan.chunks == (Chunk(joining, 0), Chunk(long, 512)) and plan.prefill_tokens == 512
    long.fed = 512
    plan = plan_step([long, short, behind], [joining], 512, whole_prompt=False)
    assert plan.chunks == (Chunk(long, 188), Chunk(short, 100), Chunk(behind, 50)) and plan.stopped == ()
    assert plan_step([sequence(700)], [], 512, whole_prompt=True).prefill_tokens == 700
    assert not plan_step([], [], 512, whole_prompt=False).decode


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_decode_step_writes_each_rows_new_key_and_value_at_its_own_position(dtype):
    """float32 writes by scatter_, BF16 by index_put (CPU scatter_ copies a BF16 buffer whole): the same cells."""
    import torch
    from transformers import DynamicCache, LlamaConfig

    from glm_core.engine.kv_slots import SlotCache

    dtype = getattr(torch, dtype)
    config = LlamaConfig(num_hidden_layers=2, num_key_value_heads=2, num_attention_heads=2, hidden_size=16)
    slots = SlotCache(2, 2, 8, dtype, torch.device("cpu"), slots=4)
    for length in (5, 9, 3):
        c = DynamicCache(config=config)
        for layer in range(2):
            c.update(torch.randn(1, 2, length, 8).to(dtype), torch.randn(1, 2, length, 8).to(dtype), layer)
        slots.add(c)
    positions, mask = slots.prepare_decode()
    assert positions[:, 0].tolist() == [5, 9, 3] and mask.shape == (3, 1, 1, 10)
    before = [t.clone() for t in slots.keys + slots.values]
    new_k, new_v = torch.randn(3, 2, 1, 8).to(dtype), torch.randn(3, 2, 1, 8).to(dtype)
    keys, values = slots.update(new_k, new_v, 1)
    assert keys.shape == (3, 2, 10, 8)
    for row, position in enumerate((5, 9, 3)):
        assert torch.equal(keys[row, :, position], new_k[row, :, 0])
        assert torch.equal(values[row, :, position], new_v[row, :, 0])
    changed = [not torch.equal(a, b) for a, b in zip(before, slots.keys + slots.values)]
    assert changed == [False, True, False, True]  # layer 1's keys and values only
    written = torch.zeros_like(slots.keys[1], dtype=torch.bool)
    for row, position in enumerate((5, 9, 3)):
        written[row, :, position] = True
    assert torch.equal(slots.keys[1][~written], before[1][~written])  # nothing else in the layer moved


@pytest.mark.parametrize("family", ["tiny", "glm2", "glm4", "glm4_moe_lite"])
def test_prompts_prefilled_together_give_each_prompts_logits_and_cache_alone(request, tmp_path, family):
    """Several sequences' new tokens in one forward (`prefill_together`), rows of different lengths over kept parts
    of different lengths (none, 5, 23 positions): each row's next-token logits and new cache equal those of its
    own prefill, and the caches given stay as they were. GLM-4.7-Flash's attention (glm4_moe_lite) keeps values
    of another width than its keys."""
    from glm_family_fixtures import write_glm_folder
    from transformers import DynamicCache

    from glm_core.engine.generation import prefill, prefill_together

    if family in ("tiny", "glm2"):
        loaded = request.getfixturevalue("tiny_loaded" if family == "tiny" else "glm2_loaded")
    else:
        loaded = load_model(ModelSpec(str(write_glm_folder(tmp_path / family, family)), "fp32", "cpu"))
    model, device = loaded.model, loaded.device
    generator = torch.Generator().manual_seed(3)
    vocab = min(500, model.config.vocab_size)
    prompts = [torch.randint(5, vocab, (n,), generator=generator).tolist() for n in (9, 30, 27, 41)]
    kept_lengths = [0, 5, 23, 0]

    def kept(prompt, length):
        cache = DynamicCache(config=model.config)
        if length:
            prefill(model, prompt[:length], cache, device)
        return cache

    rows = [(prompt[length:], kept(prompt, length)) for prompt, length in zip(prompts, kept_lengths)]
    before = [[layer.keys.clone() for layer in cache.layers] if cache.get_seq_length() else [] for _, cache in rows]
    together = prefill_together(model, rows, device)
    for (new, cache), (logits, own), prompt, length, old in zip(rows, together, prompts, kept_lengths, before):
        alone_cache = kept(prompt, length)
        alone_logits = prefill(model, new, alone_cache, device)
        torch.testing.assert_close(logits, alone_logits, atol=1e-4, rtol=1e-4)
        assert own.get_seq_length() == len(prompt) and cache.get_seq_length() == length
        for mine, theirs in zip(own.layers, alone_cache.layers):
            torch.testing.assert_close(mine.keys, theirs.keys, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(mine.values, theirs.values, atol=1e-4, rtol=1e-4)
        for layer, keys in zip(cache.layers, old):
            assert torch.equal(layer.keys, keys)


def submitted_at_once(loaded, jobs) -> tuple[list, list[tuple[int, int]]]:
    """Each job's reply, all submitted while the engine's worker is busy (so that one iteration admits them all),
    and the shape of every forward's input ids (counted at the model's embedding)."""
    engine = Engine(loaded, max_batch=8)
    forwards: list[tuple[int, int]] = []
    hook = loaded.model.get_input_embeddings().register_forward_hook(
        lambda _module, args, _out: forwards.append(tuple(args[0].shape))
    )
    busy, gate = threading.Event(), threading.Event()

    def hold(_loaded) -> None:
        busy.set()
        gate.wait(60)

    holder = threading.Thread(target=engine.run_on_worker, args=(hold,), daemon=True)
    try:
        holder.start()
        assert busy.wait(60)
        requests = [engine.submit(uuid.uuid4().hex, messages, params) for messages, params in jobs]
        gate.set()
        replies = [r.wait(300) for r in requests]
    finally:
        gate.set()
        hook.remove()
        engine.close()
    return replies, [shape for shape in forwards if shape[1] > 1]


def test_the_runner_prefills_a_steps_prompts_in_one_forward_unless_padding_would_cost_too_much(tiny_loaded):
    """Four prompts that arrive together are prefilled in one forward, and each reply equals its reply alone; a
    prompt many times longer than the others is prefilled on its own, the others together."""
    jobs = greedy_jobs([6, 6, 6, 6])
    replies, prompts = submitted_at_once(tiny_loaded, jobs)
    assert_same_replies(replies, alone(tiny_loaded, jobs))
    assert [shape[0] for shape in prompts] == [4], prompts
    long = [([{"role": "user", "content": "word " * 400}], SamplingParams(temperature=0, max_new_tokens=2))]
    replies, prompts = submitted_at_once(tiny_loaded, jobs[:2] + long)
    assert_same_replies(replies, alone(tiny_loaded, jobs[:2] + long))
    together = [shape for shape in prompts if shape[0] > 1]
    assert len(together) == 1 and together[0][0] == 2, prompts  # the long one alone (in chunks within the budget)
    assert sum(shape[1] for shape in prompts if shape[0] == 1) > 400, prompts
