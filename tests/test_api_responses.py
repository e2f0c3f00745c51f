"""`POST /v1/responses` through the official `openai` client (text, tools, streaming events, previous_response_id),
and the OpenAI Agents SDK running one agent with one tool against `python -m glm_core serve` (the tiny random
model: the tool call is forced with tool_choice, which the SDK resets after the call so the agent then answers)."""

from __future__ import annotations

import asyncio
import json
import subprocess
from typing import Annotated

import jsonschema
import openai
import pytest
from api_helpers import ThreadServer, free_port, start_serve, wait_until_up
from conftest import stop_process
from pydantic import BaseModel, Field

from glm_core.api import ApiConfig, create_app
from glm_core.api.config import ApiLimits

LIMITS = ApiLimits(max_body_bytes=64 * 1024, max_tokens=160, default_max_tokens=16)
PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"type": "string", "enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city", "parameters": PARAMETERS}


@pytest.fixture(scope="module")
def api(engine):
    with ThreadServer(create_app(lambda: engine, ApiConfig(limits=LIMITS))) as running:
        yield openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0)


def test_text_response_and_its_continuation_by_previous_response_id(api):
    first = api.responses.create(model="m", input="Hello there", instructions="Be brief.", max_output_tokens=5)
    assert first.object == "response" and first.id.startswith("resp_")
    assert first.status == "incomplete" and first.incomplete_details.reason == "max_output_tokens"
    [message] = first.output
    assert message.type == "message" and message.role == "assistant" and first.output_text
    assert first.usage.output_tokens == 5 and first.usage.input_tokens > 5
    second = api.responses.create(model="m", input="And again?", previous_response_id=first.id, max_output_tokens=3)
    assert second.previous_response_id == first.id
    # The earlier turn is in the context (so most of it came from the kept cache).
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens
    with pytest.raises(openai.NotFoundError):
        api.responses.create(model="m", input="?", previous_response_id="resp_unknown", max_output_tokens=2)


def test_forced_function_call_then_its_output_gets_a_reply(api):
    called = api.responses.create(
        model="m",
        input="Weather in Paris?",
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=120,
    )
    [call] = [item for item in called.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.call_id.startswith("call_") and called.status == "completed"
    jsonschema.validate(json.loads(call.arguments), PARAMETERS)
    answer = api.responses.create(
        model="m",
        previous_response_id=called.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature": 22}'}],
        tools=[WEATHER],
        tool_choice="none",
        max_output_tokens=4,
    )
    assert answer.output[0].type == "message" and answer.output_text


def test_streamed_events_in_order(api):
    events = list(api.responses.create(model="m", input="Count to five.", max_output_tokens=6, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text and text == events[-4].text == events[-1].response.output_text
    called = list(
        api.responses.create(
            model="m",
            input="Weather?",
            tools=[WEATHER],
            tool_choice={"type": "function", "name": "get_weather"},
            stream=True,
            max_output_tokens=120,
        )
    )
    done = [e for e in called if e.type == "response.function_call_arguments.done"]
    assert done and called[-1].type == "response.completed"  # one or more calls: parallel_tool_calls by default
    calls = [item for item in called[-1].response.output if item.type == "function_call"]
    assert [e.arguments for e in done] == [c.arguments for c in calls], called[-1].response.output
    for event in done:
        jsonschema.validate(json.loads(event.arguments), PARAMETERS)


class Weather(BaseModel):
    summary: Annotated[str, Field(max_length=20)]


@pytest.mark.server
def test_openai_agents_sdk_runs_an_agent_with_a_tool_against_serve(tiny_model_dir, tmp_path):
    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)
    port = free_port()
    process = start_serve(
        port,
        "--model",
        str(tiny_model_dir),
        "--precision",
        "fp32",
        "--device",
        "cpu",
        log=subprocess.PIPE,
        GLM_DATA_DIR=str(tmp_path),
    )
    calls = []

    @function_tool
    def get_weather(city: Annotated[str, Field(max_length=12)]) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"22 degrees in {city}"

    try:
        wait_until_up(process, f"http://127.0.0.1:{port}/health", 180, describe=lambda: process.stderr.read())
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        agent = Agent(
            name="weather",
            instructions="Answer with the weather.",
            tools=[get_weather],
            model=OpenAIResponsesModel(model="tiny", openai_client=client),
            model_settings=ModelSettings(tool_choice="get_weather", parallel_tool_calls=False, max_tokens=160),
            output_type=Weather,  # the answer after the call is JSON under its schema, so it ends by itself
        )
        result = asyncio.run(Runner.run(agent, "What is the weather in Paris?", max_turns=3))
    finally:
        stop_process(process, timeout=20)
    assert len(calls) == 1 and isinstance(calls[0], str)  # the forced call's arguments parsed into the tool's
    assert isinstance(result.final_output, Weather) and len(result.final_output.summary) <= 20
