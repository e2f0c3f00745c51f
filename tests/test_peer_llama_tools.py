"""Tools and logprobs relayed to llama.cpp's own server: the `openai` client asks our /v1, whose backend is a
RemoteBackend in front of `llama-server` serving the embedded model's GGUF. llama.cpp renders the tools with a
tool-use template (tests/reference/hermes-2-pro-tool-use.jinja, `--jinja`), and SmolLM2-135M, shown two earlier
calls in the history, calls the tool; what comes back through our /v1 (the call, streamed as deltas too, its
finish_reason "tool_calls", the logprobs) equals what llama-server answers the same request directly. A
llama-server started with `--no-jinja` refuses tools: the client gets a 502 naming the server and its reason,
not a 500. Skipped, with the reason, when llama-server is not built. Marked `peer`."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import openai
import pytest
from api_helpers import WEATHER, ThreadServer
from conftest import OUTPUT_DIR

from glm_core.api import ApiConfig, create_app
from glm_core.api.config import ApiLimits
from glm_core.backends.remote import RemoteBackend
from glm_core.bench import llama_server

pytestmark = pytest.mark.peer
try:
    llama_server.check_built()
except llama_server.NotBuilt as exc:
    pytest.skip(str(exc), allow_module_level=True)

TEMPLATE = Path(__file__).parent / "reference" / "hermes-2-pro-tool-use.jinja"
LIMITS = ApiLimits(max_body_bytes=64 * 1024, max_tokens=200, default_max_tokens=16)


def earlier_turn(number: int, city: str) -> list[dict]:
    """A question, the assistant's call, the tool's result and the answer: what the small model copies."""
    call_id = f"call_{number}"
    arguments = json.dumps({"city": city, "unit": "celsius"})
    return [
        {"role": "user", "content": f"What is the weather in {city}?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "content": '{"temperature": 20}'},
        {"role": "assistant", "content": f"It is 20 degrees in {city}."},
    ]


ASK = (
    earlier_turn(1, "Rome") + earlier_turn(2, "Berlin") + [{"role": "user", "content": "What is the weather in Paris?"}]
)


def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)


def started(extra: tuple[str, ...], log: str):
    from glm_core.models.loading import embedded_gguf_path

    OUTPUT_DIR.mkdir(exist_ok=True)
    return llama_server.running_server(embedded_gguf_path(), context=2048, extra=extra, log_file=OUTPUT_DIR / log)


@pytest.fixture(scope="module")
def llama():
    with started(("--jinja", "--chat-template-file", str(TEMPLATE)), "llama-server-tools.log") as url:
        yield url


@pytest.fixture(scope="module")
def relayed(llama):
    remote = RemoteBackend(f"{llama}/v1")
    with ThreadServer(create_app(lambda: remote, ApiConfig(limits=LIMITS), accounting=False)) as running:
        yield client(f"{running.url}/v1")
    remote.close()


def test_llama_servers_tool_call_and_logprobs_come_back_through_our_api(llama, relayed):
    direct = client(f"{llama}/v1")
    options = dict(
        model="m", messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=100, temperature=0, logprobs=True
    )
    through = relayed.chat.completions.create(**options, top_logprobs=2)
    straight = direct.chat.completions.create(**options, top_logprobs=2)
    [choice] = through.choices
    assert choice.finish_reason == straight.choices[0].finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert (call.function.name, call.function.arguments) == (
        straight.choices[0].message.tool_calls[0].function.name,
        straight.choices[0].message.tool_calls[0].function.arguments,
    )
    assert call.id  # llama.cpp's own id, passed on
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    ours, theirs = choice.logprobs.content, straight.choices[0].logprobs.content
    assert [t.token for t in ours] == [t.token for t in theirs] and len(ours) == through.usage.completion_tokens
    assert [t.logprob for t in ours] == pytest.approx([t.logprob for t in theirs], abs=1e-3)
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.logprob - 1e-4 for t in ours)

    # Streamed, llama.cpp takes no logprobs with tools: its refusal reaches the client as a 400 naming it.
    with pytest.raises(openai.BadRequestError) as caught:
        list(relayed.chat.completions.create(**options, stream=True))
    assert f"{llama.removeprefix('http://')} rejected the request (HTTP 400)" in caught.value.body["message"]
    del options["logprobs"]
    chunks = list(relayed.chat.completions.create(**options, stream=True))
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert deltas[0].id and deltas[0].function.name == "get_weather" and {d.index for d in deltas} == {0}
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    direct_deltas = [
        d
        for c in direct.chat.completions.create(**options, stream=True)
        if c.choices
        for d in c.choices[0].delta.tool_calls or []
    ]
    assert [(d.index, d.function.name, d.function.arguments) for d in deltas] == [
        (d.index, d.function.name, d.function.arguments) for d in direct_deltas
    ]  # the same deltas as llama-server streams them


def test_llama_server_without_jinja_refuses_tools_with_a_502_naming_it():
    with started(("--no-jinja",), "llama-server-no-jinja.log") as url:
        remote = RemoteBackend(f"{url}/v1")
        try:
            with ThreadServer(create_app(lambda: remote, ApiConfig(limits=LIMITS), accounting=False)) as running:
                api = client(f"{running.url}/v1")
                for stream in (False, True):
                    with pytest.raises(openai.APIStatusError) as caught:
                        reply = api.chat.completions.create(
                            model="m", messages=ASK[-1:], tools=[WEATHER], max_tokens=5, stream=stream
                        )
                        list(reply) if stream else None
                    assert caught.value.status_code == 502, caught.value
                    message = caught.value.body["message"]
                    assert message.startswith(url.removeprefix("http://")) and "--jinja" in message, message
                # Without tools the same server answers.
                assert api.chat.completions.create(model="m", messages=ASK[-1:], max_tokens=3).choices[0].message
        finally:
            remote.close()
