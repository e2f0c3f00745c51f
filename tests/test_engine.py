"""The chat engine: kept-cache exactness, eviction, stop, concurrency, truncation and bad input."""

import threading
import uuid

import pytest

from glm_core import (
    ConversationBusy,
    Delta,
    EngineClosed,
    Finished,
    PromptTooLong,
    Queued,
    SamplingParams,
    Started,
    Truncated,
)
from glm_core.engine import Engine
from glm_core.engine.context import common_prefix_length, fit_to_context
from glm_core.protocol import OutputSpec, TokenLogprob

GREEDY = SamplingParams(temperature=0, max_new_tokens=40)
PROMPTS = ["What is the capital of France?", "What is it famous for?", "Name one museum there."]


def ask(engine, conversation_id, messages, params=GREEDY):
    reply = engine.submit(conversation_id, messages, params).wait(timeout=300)
    assert reply is not None and reply.error is None, reply and reply.error
    return reply


@pytest.fixture(scope="module")
def engine(embedded_fp32):
    engine = Engine(embedded_fp32, kv_cache_bytes=512 * 2**20)
    yield engine
    engine.close()


def test_capital_of_france_is_paris(engine):
    reply = ask(engine, uuid.uuid4().hex, [{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in reply.text
    assert reply.finish_reason == "eos"
    assert reply.stats.completion_tokens > 0 and reply.stats.ttft_s > 0


@pytest.mark.slow  # over 4 s here: left out of `make test-fast`
def test_kept_cache_reply_equals_recomputed_reply(engine):
    conversation, messages = uuid.uuid4().hex, []
    for turn, prompt in enumerate(PROMPTS):
        messages.append({"role": "user", "content": prompt})
        ids = engine.encode_chat(messages)
        kept = engine.pool.tokens(conversation)
        cached = ask(engine, conversation, messages)
        recomputed = engine.submit(uuid.uuid4().hex, messages, GREEDY, recompute=True).wait(timeout=300)
        assert recomputed.stats.prefill_tokens == len(ids)  # asked to recompute: the whole history is prefilled
        assert cached.text == recomputed.text
        assert cached.stats.prompt_tokens == recomputed.stats.prompt_tokens == len(ids)
        if turn > 0:
            # Everything the cache held was an exact prefix of the ids a recompute sees, and was reused.
            assert ids[: len(kept)] == kept
            assert cached.stats.reused_tokens == len(kept)
            assert cached.stats.prefill_tokens == len(ids) - len(kept) < len(ids) // 2
        # The cache now holds the prompt plus every generated token that was fed back.
        held = engine.pool.tokens(conversation)
        assert held[: len(ids)] == ids and len(held) == len(ids) + cached.stats.completion_tokens
        messages.append({"role": "assistant", "content": cached.text})


def test_common_prefix_reuse_survives_an_edited_history(engine):
    conversation = uuid.uuid4().hex
    first = [{"role": "user", "content": PROMPTS[0]}]
    reply = ask(engine, conversation, first)
    # The user edits the assistant's answer: only the common prefix of the cache may be reused.
    edited = first + [
        {"role": "assistant", "content": reply.text + " Definitely."},
        {"role": "user", "content": PROMPTS[1]},
    ]
    cached = ask(engine, conversation, edited)
    recomputed = ask(engine, uuid.uuid4().hex, edited)
    assert cached.text == recomputed.text
    assert 0 < cached.stats.reused_tokens < cached.stats.prompt_tokens


def test_the_same_prompt_again_prefills_nothing_and_samples_what_the_first_time_did(engine):
    """A repeated or regenerated request: the kept cache is cropped back to the prompt and the first token comes
    from the logits kept there, so nothing is prefilled and a seeded reply's every logprob is the first time's.
    A new conversation of the same owner starts from the longest prefix a kept one shares with it; another
    owner's never does."""
    conversation, messages = uuid.uuid4().hex, [{"role": "user", "content": "Name three rivers of Europe."}]
    seeded = SamplingParams(temperature=1.0, top_p=1.0, seed=11, max_new_tokens=16)
    output = OutputSpec(top_logprobs=2)

    def run(conversation_id, recompute=False, owner="ws-1", asked=messages):
        request = engine.submit(conversation_id, asked, seeded, recompute=recompute, owner=owner, output=output)
        logprobs = [(e.token, e.logprob, e.top) for e in request.events() if isinstance(e, TokenLogprob)]
        reply = request.wait(timeout=300)
        assert reply.error is None, reply.error
        return reply, logprobs

    first, first_logprobs = run(conversation, recompute=True)
    assert first.stats.prefill_tokens == first.stats.prompt_tokens
    again, again_logprobs = run(conversation)
    assert again.stats.reused_tokens == again.stats.prompt_tokens == first.stats.prompt_tokens
    assert again.stats.prefill_tokens == 0
    assert again.text == first.text and again_logprobs == first_logprobs and len(first_logprobs) > 1
    # The same prompt in a new conversation of the same owner: from a copy of the kept one, bit for bit
    twin, twin_logprobs = run(uuid.uuid4().hex)
    assert twin.stats.prefill_tokens == 0 and twin_logprobs == first_logprobs
    assert conversation in engine.pool  # the one it came from keeps its own
    # Another owner's new conversation: none of this owner's caches
    stranger, _ = run(uuid.uuid4().hex, owner="ws-2")
    assert stranger.stats.prefill_tokens == stranger.stats.prompt_tokens
    # A question that shares the template's opening and part of the message: only the rest is fed
    similar = [{"role": "user", "content": "Name three rivers of Asia."}]
    shared, _ = run(uuid.uuid4().hex, asked=similar)
    assert 8 <= shared.stats.reused_tokens < shared.stats.prompt_tokens
    # A longer prompt than the kept one still feeds what it adds, and a shorter one at least its last id.
    longer = messages + [{"role": "assistant", "content": first.text}, {"role": "user", "content": PROMPTS[1]}]
    continued = ask(engine, conversation, longer)
    assert 0 < continued.stats.prefill_tokens < continued.stats.prompt_tokens
    shorter = ask(engine, conversation, messages)
    assert shorter.stats.prefill_tokens == 1 and shorter.stats.reused_tokens == shorter.stats.prompt_tokens - 1


@pytest.mark.slow  # over 4 s here: left out of `make test-fast`
def test_least_recently_used_cache_is_evicted_and_rebuilt(embedded_fp32):
    engine = Engine(embedded_fp32, kv_cache_bytes=3 * 2**20)  # about two short conversations
    try:
        ids = ["a", "b", "c"]
        for cid in ids:
            ask(engine, cid, [{"role": "user", "content": PROMPTS[0]}])
        usage = engine.pool.usage()
        assert "a" not in engine.pool and "c" in engine.pool
        assert usage["bytes"] <= 3 * 2**20 and usage["evictions"] >= 1
        # The evicted conversation is rebuilt from its messages on its next turn, with the same reply.
        messages = [{"role": "user", "content": PROMPTS[0]}]
        messages += [
            {"role": "assistant", "content": ask(engine, "x", messages).text},
            {"role": "user", "content": PROMPTS[1]},
        ]
        rebuilt = ask(engine, "a", [messages[0], messages[1], messages[2]])
        # Its own cache is gone; "x", which asked the same first question, lends the prefix they share.
        assert 0 < rebuilt.stats.reused_tokens < rebuilt.stats.prompt_tokens
        assert rebuilt.text == ask(engine, uuid.uuid4().hex, messages).text
    finally:
        engine.close()


def test_stop_keeps_partial_reply_and_a_consistent_cache(tiny_loaded):
    engine = Engine(tiny_loaded)
    try:
        messages = [{"role": "user", "content": "Tell me a very long story."}]
        request = engine.submit("s", messages, SamplingParams(temperature=0, max_new_tokens=4000))
        for event in request.events():
            if isinstance(event, Delta):
                request.stop()
                break
        reply = request.wait(timeout=60)
        assert reply.stopped and reply.finish_reason == "stopped"
        assert reply.text and 0 < reply.stats.completion_tokens < 4000
        # The next turn on the stopped conversation still matches a recompute.
        messages += [{"role": "assistant", "content": reply.text}, {"role": "user", "content": "Go on."}]
        params = SamplingParams(temperature=0, max_new_tokens=30)
        assert ask(engine, "s", messages, params).text == ask(engine, "fresh", messages, params).text
    finally:
        engine.close()


def test_stop_while_queued_ends_without_running(tiny_loaded):
    engine = Engine(tiny_loaded, max_batch=1)
    try:
        long = engine.submit("one", [{"role": "user", "content": "go"}], SamplingParams(max_new_tokens=3000))
        queued = engine.submit("two", [{"role": "user", "content": "go"}], SamplingParams(max_new_tokens=3000))
        queued.stop()
        long.stop()
        assert queued.wait(timeout=60).stopped and queued.reply.stats.completion_tokens == 0
        assert long.wait(timeout=60).stopped
    finally:
        engine.close()


def test_two_sessions_at_once_each_get_their_own_reply(engine):
    questions = {"fr": "What is the capital of France?", "de": "What is the capital of Germany?"}
    expected = {k: ask(engine, uuid.uuid4().hex, [{"role": "user", "content": q}]).text for k, q in questions.items()}
    results, events, errors = {}, {}, []
    barrier = threading.Barrier(3)

    def session(key):
        barrier.wait()
        request = engine.submit(uuid.uuid4().hex, [{"role": "user", "content": questions[key]}], GREEDY)
        events[key] = list(request.events())
        results[key] = request.reply

    def tokenizer_user():  # another page counting tokens while the worker decodes
        barrier.wait()
        try:
            for _ in range(300):
                engine.count_tokens("How many tokens is this sentence? 你好")
        except Exception as exc:  # "Already borrowed" would land here
            errors.append(exc)

    threads = [threading.Thread(target=session, args=(k,)) for k in questions] + [
        threading.Thread(target=tokenizer_user)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    for key in questions:
        assert results[key].text == expected[key]
        assert "".join(e.text for e in events[key] if isinstance(e, Delta)) == expected[key]
        assert isinstance(events[key][-1], Finished)
    # The batch had room for both: neither waited, both started.
    assert not any(isinstance(e, Queued) for k in questions for e in events[k])
    assert all(any(isinstance(e, Started) for e in events[k]) for k in questions)


def test_one_request_per_conversation_at_a_time(tiny_loaded):
    engine = Engine(tiny_loaded)
    try:
        first = engine.submit("c", [{"role": "user", "content": "go"}], SamplingParams(max_new_tokens=3000))
        with pytest.raises(ConversationBusy):
            engine.submit("c", [{"role": "user", "content": "again"}])
        first.stop()
        first.wait(timeout=60)
        assert ask(engine, "c", [{"role": "user", "content": "again"}], SamplingParams(max_new_tokens=3)).text
    finally:
        engine.close()


def test_long_conversation_drops_oldest_turns_and_says_so(tiny_loaded):
    engine = Engine(tiny_loaded)
    try:
        params = SamplingParams(temperature=0, max_length=200, max_new_tokens=20)
        messages = [{"role": "system", "content": "Be brief."}]
        for i in range(8):
            messages += [
                {"role": "user", "content": f"Question number {i} about the weather today?"},
                {"role": "assistant", "content": f"Answer number {i}: it is sunny and warm outside."},
            ]
        messages.append({"role": "user", "content": "And tomorrow?"})
        request = engine.submit("t", messages, params)
        events = list(request.events())
        reply = request.reply
        assert reply.error is None and reply.dropped_messages > 0
        notice = [e for e in events if isinstance(e, Truncated)]
        assert notice and notice[0].dropped_messages == reply.dropped_messages
        assert "oldest" in notice[0].describe()
        assert reply.stats.prompt_tokens <= 180
        assert reply.stats.prompt_tokens + reply.stats.completion_tokens <= 200
    finally:
        engine.close()


def test_oversized_prompt_is_refused_and_the_engine_keeps_serving(tiny_loaded):
    engine = Engine(tiny_loaded)
    try:
        params = SamplingParams(max_length=256, max_new_tokens=16)
        reply = engine.submit("big", [{"role": "user", "content": "word " * 2000}], params).wait(timeout=60)
        assert reply.finish_reason == "error" and "too long" in reply.error
        assert ask(engine, "small", [{"role": "user", "content": "hi"}], params).stats.completion_tokens == 16
    finally:
        engine.close()


@pytest.mark.parametrize(
    "messages, reason",
    [
        ([], "end with a user message"),
        ([{"role": "user", "content": "   "}], "empty"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "end with a user message"),
        ([{"role": "wizard", "content": "hi"}], "role"),
        ([{"role": "user", "content": None}], "role"),
    ],
)
def test_bad_messages_are_refused_with_a_reason(tiny_loaded, messages, reason):
    engine = Engine(tiny_loaded)
    try:
        with pytest.raises(ValueError, match=reason):
            engine.submit("c", messages)
    finally:
        engine.close()


@pytest.mark.parametrize(
    "params, reason",
    [
        (SamplingParams(temperature=-1), "temperature"),
        (SamplingParams(top_p=0), "top_p"),
        (SamplingParams(max_new_tokens=0), "max new tokens"),
        (SamplingParams(max_length=100, max_new_tokens=100), "max new tokens"),
        (SamplingParams(top_k=-3), "top_k"),
        (SamplingParams(repetition_penalty=0), "repetition"),
    ],
)
def test_bad_sampling_controls_are_refused(params, reason):
    with pytest.raises(ValueError, match=reason):
        params.validate()


def test_fit_to_context_keeps_system_and_starts_at_a_user_turn():
    def encode(messages):  # one token per character
        return list("".join(m["content"] for m in messages))

    messages = [{"role": "system", "content": "S"}]
    for i in range(4):
        messages += [{"role": "user", "content": f"u{i}"}, {"role": "assistant", "content": f"a{i}"}]
    messages.append({"role": "user", "content": "now"})
    ids, dropped = fit_to_context(encode, messages, budget=10)
    assert dropped == 6 and "".join(ids) == "Su3a3now"
    with pytest.raises(PromptTooLong):
        fit_to_context(encode, messages, budget=3)


def test_common_prefix_length():
    assert common_prefix_length([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix_length([1, 2], [1, 2, 3]) == 2
    assert common_prefix_length([], [1]) == 0


def test_closed_engine_refuses_new_requests(tiny_loaded):
    """With its own error, which the chat page catches: a prompt sent as the model is unloaded is shown back."""
    engine = Engine(tiny_loaded)
    engine.close()
    with pytest.raises(EngineClosed, match="unloaded or replaced"):
        engine.submit("c", [{"role": "user", "content": "hi"}])


def test_text_stream_joins_waiting_deltas_without_losing_any(tiny_loaded):
    engine = Engine(tiny_loaded)
    try:
        request = engine.submit(
            "slow-reader", [{"role": "user", "content": "go"}], SamplingParams(temperature=0, max_new_tokens=200)
        )
        request.wait(timeout=60)  # the reader comes late: every delta is already queued
        chunks = list(request.text_stream())
        assert "".join(chunks) == request.reply.text
        assert len(chunks) < 5
    finally:
        engine.close()


def test_fit_to_context_encodes_a_huge_history_only_a_few_times():
    encodes = []

    def encode(messages):
        encodes.append(sum(len(m["content"]) for m in messages))
        return list("".join(m["content"] for m in messages))

    messages = []
    for i in range(2000):
        messages += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": "x" * 50}]
    messages.append({"role": "user", "content": "now"})
    ids, dropped = fit_to_context(encode, messages, budget=500, count=len)
    assert len(ids) <= 500 and dropped % 2 == 0 and messages[dropped]["role"] == "user"
    # The largest context that fits: one more turn would not.
    assert len(ids) + len(messages[dropped - 2]["content"]) + len(messages[dropped - 1]["content"]) > 500
    assert len(encodes) <= 12 and max(encodes) <= 1000


def test_fit_to_context_honours_stop():
    from glm_core.engine.context import FittingStopped

    messages = [
        {"role": "user", "content": "a" * 10},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    with pytest.raises(FittingStopped):
        fit_to_context(list, messages, budget=5, count=len, should_stop=lambda: True)
