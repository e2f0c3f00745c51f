"""The engine's greedy replies against an expectation it did not compute: transformers' own `generate()` on the same
folder, the same ids (the chat template applied by transformers' tokenizer) and no cache of ours. The kept cache
(a second and third turn that reuse the first turns' KV cache), continuous batching (four conversations decoded
together) and the compiled decode path must each give the tokens `generate()` gives."""

import threading
import uuid

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from glm_core import Finished, SamplingParams, Started, load_settings
from glm_core.engine import Engine
from glm_core.models.loading import convert_gguf, embedded_gguf_path

NEW_TOKENS = 24
GREEDY = SamplingParams(temperature=0, max_new_tokens=NEW_TOKENS, repetition_penalty=1.0)
TURNS = ["What is the capital of France?", "What is it famous for?", "Name one museum there."]
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Hi",
    "List five fruits that are yellow.",
]


@pytest.fixture(scope="module")
def reference():
    """transformers' model and tokenizer for the embedded model's folder, loaded by transformers alone."""
    folder = convert_gguf(embedded_gguf_path(), load_settings().cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, tokenizer


def generate(reference, messages) -> tuple[str, bool]:
    """transformers' greedy reply to `messages`: its text and whether it ended on the end-of-turn token."""
    model, tokenizer = reference
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **ids,
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            repetition_penalty=1.0,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    new = out[0, ids["input_ids"].shape[1] :].tolist()
    ended = bool(new) and new[-1] == model.generation_config.eos_token_id
    return tokenizer.decode(new[:-1] if ended else new, skip_special_tokens=True), ended


def assert_as_generate(reply, expected: tuple[str, bool]):
    text, ended = expected
    assert reply.error is None, reply.error
    assert (reply.text, reply.finish_reason) == (text, "eos" if ended else "length")


@pytest.mark.slow  # over 4 s here: left out of `make test-fast`
def test_kept_cache_turns_equal_generate_on_the_whole_history(embedded_fp32, reference):
    engine = Engine(embedded_fp32, max_batch=1)
    try:
        conversation, messages = uuid.uuid4().hex, []
        for turn, prompt in enumerate(TURNS):
            messages.append({"role": "user", "content": prompt})
            reply = engine.submit(conversation, messages, GREEDY).wait(300)
            assert_as_generate(reply, generate(reference, messages))
            if turn:  # the turn really reused the kept cache, so the comparison tests it
                assert reply.stats.reused_tokens > reply.stats.prompt_tokens // 2
            messages.append({"role": "assistant", "content": reply.text})
    finally:
        engine.close()


def submit_together(engine, prompts=PROMPTS) -> list:
    """The prompts at once; their replies, after checking they were decoded together (every reply had started
    before the first one finished)."""
    requests = [engine.submit(uuid.uuid4().hex, [{"role": "user", "content": p}], GREEDY) for p in prompts]
    order = []

    def follow(request):
        for event in request.events():
            if isinstance(event, Started | Finished):
                order.append(type(event).__name__)

    threads = [threading.Thread(target=follow, args=(request,)) for request in requests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert order.index("Finished") >= len(prompts), order
    return [request.wait(1) for request in requests]


@pytest.mark.slow  # over 4 s here: left out of `make test-fast`
def test_batched_replies_equal_generate_alone(embedded_fp32, reference):
    engine = Engine(embedded_fp32, max_batch=8)
    try:
        replies = submit_together(engine)
    finally:
        engine.close()
    for prompt, reply in zip(PROMPTS, replies):
        assert_as_generate(reply, generate(reference, [{"role": "user", "content": prompt}]))


@pytest.mark.slow
def test_compiled_decode_equals_generate(embedded_fp32, reference):
    """Both compiled graphs of a two-row engine (one row, two rows) give generate()'s greedy replies: the
    prompts alone, then together. (The eager engine equals generate() in the tests above, so the compiled steps
    equal eager's; tests/test_fast_decode.py checks that on the tiny and ChatGLM models, row counts changing.)"""
    prompts = PROMPTS[:2]
    engine = Engine(embedded_fp32, max_batch=2, compile="on")
    try:
        assert engine.fast.wait_ready(600) == "ready", engine.card().fast_path
        alone = [engine.submit(uuid.uuid4().hex, [{"role": "user", "content": p}], GREEDY).wait(300) for p in prompts]
        steps = engine.fast.steps
        together = submit_together(engine, prompts)
        assert engine.fast.steps > steps and engine.card().fast_path == "ready"
    finally:
        engine.close()
    for prompt, reply_alone, reply_together in zip(prompts, alone, together):
        expected = generate(reference, [{"role": "user", "content": prompt}])
        assert_as_generate(reply_alone, expected)
        assert_as_generate(reply_together, expected)
