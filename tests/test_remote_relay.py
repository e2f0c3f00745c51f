"""Tools, tool_choice, parallel_tool_calls, response_format and logprobs relayed by the remote backend: the `openai`
client asks our /v1, whose backend is a RemoteBackend in front of this project's own `serve` (another process, the
tiny model, FP32). What comes back equals what the same request gets from `serve` directly (seeded): the calls
(streamed as deltas too) with finish_reason "tool_calls", the logprobs, the JSON. A request the server refuses is
a 400 naming that server, one it fails is a 502, never a 500."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from api_helpers import ANSWERED_CALL, ASK, WEATHER, ThreadServer, start_tiny_serve
from faulty_openai_server import FaultyServer

from glm_core.api import ApiConfig, create_app
from glm_core.api.config import ApiLimits
from glm_core.backends.remote import RemoteBackend

pytestmark = pytest.mark.server

SERVE_MAX_TOKENS = 100  # the server's own limit, below the relay's: a request between is refused by the server
LIMITS = ApiLimits(max_body_bytes=64 * 1024, max_tokens=160, default_max_tokens=16)
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def serve(tiny_model_dir, tmp_path_factory):
    process, port = start_tiny_serve(
        tiny_model_dir, tmp_path_factory.mktemp("serve-data"), GLM_API_MAX_TOKENS=str(SERVE_MAX_TOKENS)
    )
    yield port
    process.kill()
    process.wait()


@pytest.fixture(scope="module")
def direct(serve):
    """The `openai` client talking to `serve` itself."""
    return client(f"http://127.0.0.1:{serve}/v1")


@pytest.fixture(scope="module")
def relayed(serve):
    """The `openai` client talking to our /v1 over a RemoteBackend in front of `serve`."""
    remote = RemoteBackend(f"http://127.0.0.1:{serve}/v1")
    with ThreadServer(create_app(lambda: remote, ApiConfig(limits=LIMITS), accounting=False)) as running:
        yield client(f"{running.url}/v1")
    remote.close()


def calls_of(reply) -> list[tuple[str, str]]:
    return [(c.function.name, c.function.arguments) for c in reply.choices[0].message.tool_calls or []]


def test_a_forced_call_comes_back_as_the_server_made_it(direct, relayed):
    options = dict(model="m", messages=ASK, tools=[WEATHER, TIME], tool_choice="required", max_tokens=90, seed=3)
    through, straight = relayed.chat.completions.create(**options), direct.chat.completions.create(**options)
    [choice] = through.choices
    assert choice.finish_reason == straight.choices[0].finish_reason == "tool_calls"
    assert choice.message.content is None and choice.message.tool_calls[0].id.startswith("call_")
    assert calls_of(through) == calls_of(straight) and calls_of(through)
    for name, arguments in calls_of(through):
        schema = {"get_weather": WEATHER, "get_time": TIME}[name]["function"]["parameters"]
        jsonschema.validate(json.loads(arguments), schema)
    assert through.usage.completion_tokens == straight.usage.completion_tokens > 0


def test_a_named_call_streams_as_tool_call_deltas(direct, relayed):
    options = dict(
        model="m",
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
        max_tokens=90,
        seed=4,
        stream=True,
    )
    through, straight = (
        list(relayed.chat.completions.create(**options)),
        list(direct.chat.completions.create(**options)),
    )

    def calls(chunks) -> list[tuple]:
        return [
            (d.index, d.id, d.function.name, d.function.arguments)
            for c in chunks
            if c.choices
            for d in c.choices[0].delta.tool_calls or []
        ]

    relayed_calls = calls(through)
    without_ids = [[(i, n, a) for i, _, n, a in deltas] for deltas in (relayed_calls, calls(straight))]
    assert without_ids[0] == without_ids[1]  # the same deltas (ids are drawn per request)
    assert relayed_calls[0][1].startswith("call_") and relayed_calls[0][2] == "get_weather"
    arguments = "".join(d[3] or "" for d in relayed_calls)
    jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])
    assert [c.choices[0].finish_reason for c in through if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert not "".join(c.choices[0].delta.content or "" for c in through if c.choices)


def test_logprobs_come_back_as_the_server_computed_them(direct, relayed):
    options = dict(model="m", messages=ASK, max_tokens=6, seed=9, temperature=1, logprobs=True, top_logprobs=3)
    through, straight = relayed.chat.completions.create(**options), direct.chat.completions.create(**options)

    def tokens(content) -> list[tuple]:
        return [(t.token, t.logprob, [(a.token, a.logprob) for a in t.top_logprobs]) for t in content]

    assert tokens(through.choices[0].logprobs.content) == tokens(straight.choices[0].logprobs.content)
    assert len(through.choices[0].logprobs.content) == 6
    assert all(len(t.top_logprobs) == 3 for t in through.choices[0].logprobs.content)
    streamed = [
        t
        for c in relayed.chat.completions.create(**options, stream=True)
        if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.content
    ]
    assert tokens(streamed) == tokens(through.choices[0].logprobs.content)


def test_json_schema_and_a_tool_result_in_the_history_are_relayed(direct, relayed):
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string", "maxLength": 10}, "confidence": {"type": "integer", "maximum": 9}},
        "required": ["answer", "confidence"],
        "additionalProperties": False,
    }
    form = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}}
    options = dict(model="m", messages=ASK, max_tokens=80, seed=1, response_format=form)
    through = relayed.chat.completions.create(**options)
    jsonschema.validate(json.loads(through.choices[0].message.content), schema)
    assert through.choices[0].message.content == direct.chat.completions.create(**options).choices[0].message.content

    history = ANSWERED_CALL
    options = dict(model="m", messages=history, tools=[WEATHER], max_tokens=8, seed=5, temperature=1)
    through = relayed.chat.completions.create(**options)
    assert through.choices[0].message.content == direct.chat.completions.create(**options).choices[0].message.content
    # The server saw the call and its result in the prompt: more tokens than the question alone.
    alone = relayed.chat.completions.create(model="m", messages=ASK, tools=[WEATHER], max_tokens=1)
    assert through.usage.prompt_tokens > alone.usage.prompt_tokens + 10


def test_a_request_the_server_refuses_is_a_400_naming_it(serve, relayed):
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as caught:
            reply = relayed.chat.completions.create(
                model="m", messages=ASK, tools=[WEATHER], max_tokens=SERVE_MAX_TOKENS + 1, stream=stream
            )
            list(reply) if stream else None
        message = caught.value.body["message"]
        assert f"127.0.0.1:{serve} rejected the request (HTTP 400)" in message, message
        assert f"at most {SERVE_MAX_TOKENS} tokens" in message


def test_a_server_that_fails_is_a_502_not_a_500():
    server = FaultyServer().start()
    remote = RemoteBackend(f"{server.url}#broken")
    try:
        with ThreadServer(create_app(lambda: remote, ApiConfig(limits=LIMITS), accounting=False)) as running:
            for stream in (False, True):
                with pytest.raises(openai.APIStatusError) as caught:
                    reply = client(f"{running.url}/v1").chat.completions.create(
                        model="m", messages=ASK, tools=[WEATHER], max_tokens=5, stream=stream
                    )
                    list(reply) if stream else None
                assert caught.value.status_code == 502
                assert "failed (HTTP 500): the engine crashed" in caught.value.body["message"]
    finally:
        remote.close()
        server.stop()
    whole, streamed = server.requests[-2:]  # a client that takes the reply whole has it asked for whole
    assert "stream" not in whole and streamed["stream"] is True
    for sent in (whole, streamed):
        assert sent["tools"] == [WEATHER] and sent["tool_choice"] == "auto" and sent["parallel_tool_calls"] is True


def test_the_chat_page_relays_tools_to_a_remote_server(serve, data_dir):
    """The chat page over a remote backend: the tools go to the server, its call comes back read and is drawn and
    stored as a call (the server's own reading, relayed)."""
    from conftest import ROOT
    from streamlit.testing.v1 import AppTest

    from glm_core.backends.config import make_entry
    from glm_core.conversations.store import Store
    from ui.resources import get_hub

    hub = get_hub()
    hub.add_remote(make_entry("serve-tools", f"http://127.0.0.1:{serve}/v1", env={}))
    try:
        at = AppTest.from_file(str(ROOT / "Home.py"), default_timeout=120)
        at.session_state["draft_backend"] = "serve-tools"
        at.run()
        cid = at.session_state["conversation_id"]
        at.text_area(key=f"tools_text_{cid}").set_value(json.dumps([WEATHER])).run()
        assert not at.error and not at.text_area(key=f"tools_text_{cid}").disabled
        at.selectbox(key=f"tool_choice_{cid}").set_value("get_weather")
        at.slider(key="max_new_tokens").set_value(SERVE_MAX_TOKENS - 10)
        at.chat_input[0].set_value("What is the weather in Paris?").run()
        assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])
        drawn = at.chat_message[1]
        assert ":material/build: Calls **get\\_weather**" in [md.value for md in drawn.markdown]
        arguments = json.loads(drawn.code[0].value)
        jsonschema.validate(arguments, WEATHER["function"]["parameters"])
        [stored] = Store().get_conversations(at.session_state["conversation_workspace"], [cid])
        call = stored.messages[1].tool_calls[0]
        assert call["id"].startswith("call_") and json.loads(call["arguments"]) == arguments
    finally:
        hub.remove("serve-tools")
