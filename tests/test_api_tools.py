"""Tools, structured output and logprobs on /v1/chat/completions, through the official `openai` client against a
real server over the tiny random model (SmolLM2's tokenizer and template: Hermes-style calls)."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from api_helpers import ANSWERED_CALL, ASK, WEATHER, ThreadServer

from glm_core.api import ApiConfig, create_app
from glm_core.api.config import ApiLimits

LIMITS = ApiLimits(max_body_bytes=64 * 1024, max_tokens=160, default_max_tokens=16)
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}


@pytest.fixture(scope="module")
def api(engine):
    with ThreadServer(create_app(lambda: engine, ApiConfig(limits=LIMITS))) as running:
        yield openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0)


def test_required_tool_choice_returns_calls_that_match_their_schemas(api):
    """parallel_tool_calls (true by default): one or more calls, each parsing against its function's schema; false:
    exactly one."""
    schemas = {"get_weather": WEATHER["function"]["parameters"], "get_time": TIME["function"]["parameters"]}
    counts = []
    for seed, parallel in [(3, True), (5, True), (6, True), (3, False), (5, False)]:
        reply = api.chat.completions.create(
            model="m",
            messages=ASK,
            tools=[WEATHER, TIME],
            tool_choice="required",
            parallel_tool_calls=parallel,
            max_tokens=150,
            seed=seed,
        )
        [choice] = reply.choices
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None and choice.message.refusal is None
        calls = choice.message.tool_calls
        assert calls and len({c.id for c in calls}) == len(calls)
        for call in calls:
            assert call.type == "function" and call.id.startswith("call_")
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
        if not parallel:
            assert len(calls) == 1
        counts.append(len(calls))
    assert max(counts[:3]) >= 2  # the random model does write several calls when it may


def test_named_tool_call_streams_as_tool_call_deltas(api):
    stream = api.chat.completions.create(
        model="m",
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=150,
        seed=4,
        stream=True,
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id.startswith("call_") and deltas[0].function.name == "get_weather"
    indexes = sorted({d.index for d in deltas})
    assert indexes == list(range(len(indexes)))
    for index in indexes:  # each call: its id and name, then its arguments
        mine = [d for d in deltas if d.index == index]
        assert mine[0].id.startswith("call_") and mine[0].function.name == "get_weather"
        arguments = "".join(d.function.arguments or "" for d in mine)
        jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["tool_calls"]


def test_a_tool_result_in_the_history_gets_a_text_reply(api):
    history = ANSWERED_CALL
    reply = api.chat.completions.create(model="m", messages=history, tools=[WEATHER], tool_choice="none", max_tokens=6)
    assert reply.choices[0].finish_reason == "length" and reply.choices[0].message.content
    assert reply.choices[0].message.tool_calls is None


def test_json_schema_response_format_parses_against_the_schema(api):
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string", "maxLength": 10}, "confidence": {"type": "integer", "maximum": 9}},
        "required": ["answer", "confidence"],
        "additionalProperties": False,
    }
    for seed in (1, 2):
        reply = api.chat.completions.create(
            model="m",
            messages=ASK,
            max_tokens=80,
            seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}},
        )
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
    reply = api.chat.completions.create(
        model="m", messages=ASK, max_tokens=120, seed=1, response_format={"type": "json_object"}
    )
    assert reply.choices[0].message.content.startswith("{")


def test_logprobs_streamed_and_not_agree(api):
    options = dict(model="m", messages=ASK, max_tokens=6, seed=9, temperature=1, logprobs=True, top_logprobs=3)
    whole = api.chat.completions.create(**options)
    tokens = whole.choices[0].logprobs.content
    assert len(tokens) == whole.usage.completion_tokens == 6
    for token in tokens:
        assert token.logprob <= 0 and len(token.top_logprobs) == 3
        assert token.top_logprobs[0].logprob >= token.logprob - 1e-5
        assert bytes(token.bytes).decode("utf-8", "replace") == token.token
    assert "".join(t.token for t in tokens) == whole.choices[0].message.content
    streamed = [
        t
        for c in api.chat.completions.create(**options, stream=True)
        if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.content
    ]
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == [(t.token, round(t.logprob, 4)) for t in tokens]
    plain = api.chat.completions.create(model="m", messages=ASK, max_tokens=2)
    assert plain.choices[0].logprobs is None


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"tools": "get_weather"}, "tools"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"response_format": {"type": "xml"}}, "response_format"),
    ],
)
def test_bad_fields_are_400_naming_the_field(api, extra, param):
    with pytest.raises(openai.BadRequestError) as caught:
        api.chat.completions.create(model="m", messages=ASK, max_tokens=2, **extra)
    assert param in str(caught.value.body)


def test_unknown_fields_are_ignored(api):
    reply = api.chat.completions.create(
        model="m", messages=ASK, max_tokens=2, extra_body={"frobnicate": 1, "metadata": {"a": "b"}}
    )
    assert reply.choices[0].message.content


def test_completions_route_with_echo_logprobs_stop_and_streaming(api):
    whole = api.completions.create(
        model="m", prompt="Once upon a time", max_tokens=6, seed=2, temperature=1, logprobs=2
    )
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    [choice] = whole.choices
    assert choice.finish_reason == "length" and whole.usage.completion_tokens == 6
    assert len(choice.logprobs.tokens) == 6 and all(len(top) <= 2 for top in choice.logprobs.top_logprobs)
    assert "".join(choice.logprobs.tokens) == choice.text
    assert choice.logprobs.text_offset[0] == 0 and choice.logprobs.text_offset[1] == len(choice.logprobs.tokens[0])
    streamed = api.completions.create(
        model="m", prompt="Once upon a time", max_tokens=6, seed=2, temperature=1, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == choice.text
    echoed = api.completions.create(
        model="m", prompt="Once upon a time", max_tokens=6, seed=2, temperature=1, echo=True
    )
    assert echoed.choices[0].text == "Once upon a time" + choice.text
    cut = choice.text[2:5]
    stopped = api.completions.create(
        model="m", prompt="Once upon a time", max_tokens=6, seed=2, temperature=1, stop=[cut]
    )
    assert stopped.choices[0].text == choice.text[: choice.text.index(cut)]
    assert stopped.choices[0].finish_reason == "stop"


def test_echo_with_logprobs_scores_the_prompt_as_a_plain_forward_does(api, engine, monkeypatch):
    """The prompt's tokens with their logprobs (the first null, as in OpenAI's legacy API), then the completion's:
    checked against log_softmax of one plain forward over the prompt, with the work cut in slices of 4 tokens (the
    cache carries each slice to the next, as the engine's worker runs it between decode steps)."""
    import torch

    from glm_core.models import prompt_logprobs

    monkeypatch.setattr(prompt_logprobs, "SLICE_TOKENS", 4)
    prompt = "Once upon a time, in a land far away, there lived"
    options = dict(model="m", prompt=prompt, max_tokens=4, seed=2, temperature=1, logprobs=3)
    whole = api.completions.create(**options, echo=True)
    [choice] = whole.choices
    scores = choice.logprobs
    tokenizer = engine.loaded.tokenizer
    ids = tokenizer(prompt)["input_ids"]  # as the engine reads a raw prompt
    count = len(ids)
    assert count > 8 and choice.text.startswith(prompt) and len(scores.tokens) == count + 4
    assert scores.tokens[:count] == [tokenizer.decode([i]) for i in ids] and "".join(scores.tokens[:count]) == prompt
    assert scores.token_logprobs[0] is None and scores.top_logprobs[0] is None

    def forward(loaded):
        with torch.inference_mode():
            logits = loaded.model(input_ids=torch.tensor([ids])).logits[0]
        return torch.log_softmax(logits.float(), dim=-1)

    expected = engine.run_on_worker(forward)
    for position in range(1, count):
        assert scores.token_logprobs[position] == pytest.approx(expected[position - 1, ids[position]].item(), abs=1e-4)
        best = torch.topk(expected[position - 1], 3)
        names = [tokenizer.decode([int(i)]) for i in best.indices]
        assert scores.top_logprobs[position] == pytest.approx(dict(zip(names, best.values.tolist())), abs=1e-4)
    assert scores.text_offset[:3] == [0, len(scores.tokens[0]), len(scores.tokens[0]) + len(scores.tokens[1])]

    plain = api.completions.create(**options).choices[0]  # the completion's part: as without echo, offsets moved
    assert choice.text == prompt + plain.text and scores.tokens[count:] == plain.logprobs.tokens
    assert scores.token_logprobs[count:] == pytest.approx(plain.logprobs.token_logprobs, abs=1e-5)
    assert scores.text_offset[count:] == [len(prompt) + o for o in plain.logprobs.text_offset]

    streamed = [c.choices[0] for c in api.completions.create(**options, echo=True, stream=True) if c.choices]
    assert "".join(c.text for c in streamed) == choice.text
    joined = [
        (t, lp, o)
        for c in streamed
        if c.logprobs
        for t, lp, o in zip(*(c.logprobs.tokens, c.logprobs.token_logprobs, c.logprobs.text_offset))
    ]
    assert [t for t, _, _ in joined] == scores.tokens and [o for _, _, o in joined] == scores.text_offset
    assert [lp for _, lp, _ in joined][1:] == pytest.approx(scores.token_logprobs[1:], abs=1e-5)
