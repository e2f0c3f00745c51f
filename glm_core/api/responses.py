"""OpenAI's Responses API, `POST /v1/responses`: the subset the OpenAI Agents SDK uses by default. Text and
function tools, input items (messages, function_call, function_call_output), instructions, text.format (JSON
schema), streaming events, and `previous_response_id`.

Nothing is stored (`store` is accepted and treated as false): the last few responses' conversations are kept in
memory per caller, so `previous_response_id` continues one while this server knows it (and its kept KV cache
answers the shared prefix); an unknown id is a 404."""

from __future__ import annotations

import dataclasses
import json
import secrets
import threading
import time
from collections import OrderedDict
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette.sse import EventSourceResponse

from ..protocol import Backend, OutputSpec, SamplingParams
from .access import Caller
from .errors import ApiError
from .generation import (
    Generation,
    model_name,
    prepare,
)
from .schemas import FunctionDefinition, JsonSchemaFormat
from .state import ApiState, api_caller, api_state, loaded_backend

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])
SSE_PING_S = 15
KEPT_RESPONSES = 1024  # conversations kept for previous_response_id (all callers together)


class FunctionTool(FunctionDefinition):
    type: Literal["function"] = "function"


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    name: str


class TextFormat(JsonSchemaFormat):
    type: Literal["text", "json_object", "json_schema"] = "text"


class TextOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    format: TextFormat | None = None


class ResponseRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[FunctionTool] | None = Field(None, max_length=128)
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_output_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    store: bool | None = None
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None

    def output(self) -> OutputSpec:
        chosen = self.tool_choice or "auto"
        choice = chosen.name if isinstance(chosen, NamedToolChoice) else chosen
        schema = None
        form = self.text.format if self.text else None
        if form is not None and form.type == "json_object":
            schema = {"type": "object"}
        elif form is not None and form.type == "json_schema":
            schema = form.schema_ or {"type": "object"}
        if choice not in ("auto", "none") and not self.tools:
            raise ApiError(400, "tool_choice asks for a call but no tools were given", param="tool_choice")
        spec = OutputSpec(
            tools=[t.plain() for t in self.tools or []],
            tool_choice=choice if self.tools else "auto",
            parallel_tool_calls=self.parallel_tool_calls is not False,
            json_schema=schema,
        )
        try:
            return spec.validate()
        except ValueError as exc:
            raise ApiError(400, str(exc), param="tool_choice" if "tool_choice" in str(exc) else "tools") from None


def _text_of(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text"):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ApiError(400, f"only text content parts are supported, got {str(kind)[:40]!r}", param=where)
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    raise ApiError(400, "a message's content must be text or a list of text parts", param=where)


def input_messages(items: str | list[dict[str, Any]], instructions: str | None) -> list[dict]:
    """Responses input items as chat messages: messages by role, function_call items as an assistant's tool_calls,
    function_call_output items as tool results."""
    if isinstance(items, str):
        items = [{"type": "message", "role": "user", "content": items}]
    messages: list[dict] = [{"role": "system", "content": instructions}] if instructions else []
    names: dict[str, str] = {}
    for index, item in enumerate(items):
        where = f"input.{index}"
        if not isinstance(item, dict):
            raise ApiError(400, "each input item must be an object", param=where)
        kind = item.get("type", "message")
        if kind == "message":
            role = {"developer": "system"}.get(str(item.get("role")), item.get("role"))
            if role not in ("system", "user", "assistant"):
                raise ApiError(400, f"unknown role {str(item.get('role'))[:40]!r}", param=f"{where}.role")
            text = _text_of(item.get("content"), f"{where}.content")
            if role == "system" and messages and messages[0]["role"] == "system":  # one system message, first
                messages[0] = {"role": "system", "content": messages[0]["content"] + "\n\n" + text}
            elif role == "system":
                messages.insert(0, {"role": "system", "content": text})
            else:
                messages.append({"role": role, "content": text})
        elif kind == "function_call":
            call = {
                "id": str(item.get("call_id") or ""),
                "name": str(item.get("name") or ""),
                "arguments": str(item.get("arguments") or "{}"),
            }
            names[call["id"]] = call["name"]
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id = str(item.get("call_id") or "")
            output = item.get("output")
            text = output if isinstance(output, str) else json.dumps(output, ensure_ascii=False)
            messages.append({"role": "tool", "content": text, "tool_call_id": call_id, "name": names.get(call_id, "")})
        elif kind == "reasoning":
            continue  # another model's reasoning: not shown to this one
        else:
            raise ApiError(400, f"input items of type {str(kind)[:40]!r} are not supported", param=f"{where}.type")
    return messages


class KeptResponses:
    """The conversation behind each recent response id, per caller scope (bounded, least recently used out)."""

    def __init__(self, capacity: int = KEPT_RESPONSES):
        self.capacity = capacity
        self._kept: OrderedDict[tuple[str, str], list[dict]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, scope: str, response_id: str) -> list[dict]:
        with self._lock:
            conversation = self._kept.get((scope, response_id))
            if conversation is None:
                raise ApiError(
                    404, f"previous_response_id {response_id[:60]!r} is not known here", param="previous_response_id"
                )
            self._kept.move_to_end((scope, response_id))
            return [dict(m) for m in conversation]

    def put(self, scope: str, response_id: str, conversation: list[dict]) -> None:
        with self._lock:
            self._kept[(scope, response_id)] = conversation
            while len(self._kept) > self.capacity:
                self._kept.popitem(last=False)


KEPT = KeptResponses()


@router.post("/responses")
async def create_response(
    body: ResponseRequest,
    http_request: Request,
    caller: Caller = Depends(api_caller),
    backend: Backend = Depends(loaded_backend),
    state: ApiState = Depends(api_state),
):
    output = dataclasses.replace(body.output(), whole=not body.stream)
    earlier = KEPT.get(caller.scope, body.previous_response_id) if body.previous_response_id else []
    new = input_messages(body.input, body.instructions)
    # This request's instructions replace the earlier ones (as OpenAI's previous_response_id does).
    system = [m for m in new[:1] if m["role"] == "system"] or [m for m in earlier[:1] if m["role"] == "system"]
    turns = [m for m in earlier + new if m["role"] != "system"]
    prepared = await prepare(
        backend,
        system + turns,
        output,
        state.limits,
        body.max_output_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
    )
    messages, params = prepared.messages, prepared.params
    generation = Generation.submit(
        backend,
        state.conversations,
        caller,
        messages,
        params,
        limits=state.limits,
        output=output,
        prompt_ids=prepared.ids,
    )
    response = ResponseShape(body, model_name(backend), output, params)
    if body.stream:
        await generation.opening()
        return EventSourceResponse(_events(generation, response, caller, messages), sep="\n", ping=SSE_PING_S)
    await generation.collect(http_request)
    generation.raise_for_error()
    response.finish(generation)
    _keep(caller, response, messages, generation)
    return response.body()


def _keep(caller: Caller, response: ResponseShape, messages: list[dict], generation: Generation) -> None:
    said: dict[str, Any] = {
        "role": "assistant",
        "content": generation.content if generation.tool_calls else generation.text,
    }
    if generation.tool_calls:
        said["tool_calls"] = [{**c, "id": response.call_ids[i]} for i, c in enumerate(generation.tool_calls)]
    KEPT.put(caller.scope, response.id, messages + [said])


class ResponseShape:
    """The response object as it grows: in progress, then completed (or incomplete at max_output_tokens)."""

    def __init__(self, request: ResponseRequest, model: str, output: OutputSpec, params: SamplingParams):
        self.request, self.model, self.spec, self.params = request, model, output, params
        self.id = f"resp_{secrets.token_hex(12)}"
        self.message_id = f"msg_{secrets.token_hex(12)}"
        self.created_at = int(time.time())
        self.status = "in_progress"
        self.output: list[dict] = []
        self.usage: dict | None = None
        self.incomplete: dict | None = None
        self.call_ids: list[str] = []
        self.completed_at: int | None = None

    def message_item(self, text: str, status: str = "completed") -> dict:
        return {
            "type": "message",
            "id": self.message_id,
            "status": status,
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
        }

    def _call_items(self, generation: Generation) -> list[dict]:
        items = []
        for index, call in enumerate(generation.tool_calls):
            items.append(
                {
                    "type": "function_call",
                    "id": f"fc_{secrets.token_hex(12)}",
                    "call_id": self.call_ids[index],
                    "name": call["name"],
                    "arguments": call["arguments"],
                    "status": "completed",
                }
            )
        return items

    def finish(self, generation: Generation) -> None:
        self.call_ids = [c["id"] for c in generation.tool_calls]
        text = generation.content if generation.tool_calls else generation.text
        self.output = ([self.message_item(text)] if text or not generation.tool_calls else []) + self._call_items(
            generation
        )
        self.completed_at = int(time.time())
        length = generation.finish_reason == "length"
        self.status = "incomplete" if length else "completed"
        self.incomplete = {"reason": "max_output_tokens"} if length else None
        self.usage = {
            "input_tokens": generation.prompt_tokens,
            "input_tokens_details": {"cached_tokens": generation.cached_tokens},
            "output_tokens": generation.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": generation.prompt_tokens + generation.completion_tokens,
        }

    def body(self) -> dict:
        request = self.request
        form = request.text.format if request.text and request.text.format else None
        text_format: dict[str, Any] = {"type": form.type if form else "text"}
        if form is not None and form.type == "json_schema":
            text_format.update(name=form.name, schema=form.schema_, strict=bool(form.strict))
        choice = request.tool_choice or "auto"
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "completed_at": self.completed_at,
            "status": self.status,
            "error": None,
            "incomplete_details": self.incomplete,
            "instructions": request.instructions,
            "max_output_tokens": request.max_output_tokens,
            "model": self.model,
            "output": self.output,
            "parallel_tool_calls": self.spec.parallel_tool_calls,
            "previous_response_id": request.previous_response_id,
            "reasoning": {"effort": None, "summary": None},
            "store": False,
            "temperature": self.params.temperature,  # what was used: the request's, else the model's default
            "text": {"format": text_format},
            "tool_choice": choice if isinstance(choice, str) else choice.model_dump(),
            "tools": [{"type": "function", **t.model_dump(exclude={"type"})} for t in request.tools or []],
            "top_p": self.params.top_p,
            "truncation": "disabled",
            "usage": self.usage,
            "user": request.user,
            "metadata": request.metadata or {},
            # Fields the Responses schema requires, as this server has them: no penalties, no logprobs, no tool-call
            # cap, nothing in the background, one service tier, no safety id or cache key.
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "top_logprobs": 0,
            "max_tool_calls": None,
            "background": False,
            "service_tier": "default",
            "safety_identifier": None,
            "prompt_cache_key": None,
        }


async def _events(generation: Generation, response: ResponseShape, caller: Caller, messages: list[dict]):
    """The Responses stream: response.created and in_progress; for a text reply, its message item, content part,
    output_text deltas and their done events; for a call, its function_call item with its arguments (once the
    reply ends); then response.completed (or failed), each with a sequence number."""
    sequence = 0

    def event(kind: str, **fields) -> dict:
        nonlocal sequence
        sequence += 1
        return {"event": kind, "data": json.dumps({"type": kind, "sequence_number": sequence - 1, **fields})}

    yield event("response.created", response=response.body())
    yield event("response.in_progress", response=response.body())
    opened, sent = False, 0
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}

    def open_message():
        yield event("response.output_item.added", output_index=0, item=response.message_item("", "in_progress"))
        yield event(
            "response.content_part.added", item_id=response.message_id, output_index=0, content_index=0, part=part
        )

    def text_delta(delta: str) -> dict:
        return event(
            "response.output_text.delta",
            item_id=response.message_id,
            output_index=0,
            content_index=0,
            delta=delta,
            logprobs=[],
        )

    async for _piece in generation.deltas():
        if generation.reply is not None:  # ended: what is left goes out below, as text or as calls
            continue
        safe = generation.streamable()
        if safe > sent:
            if not opened:
                opened = True
                for opening in open_message():
                    yield opening
            delta, sent = generation.text[sent:safe], safe
            yield text_delta(delta)
    if generation.reply is None or generation.reply.error is not None:
        response.status = "failed"
        body = response.body()
        body["error"] = {"code": "server_error", "message": (generation.reply and generation.reply.error) or "stopped"}
        yield event("response.failed", response=body)
        return
    response.finish(generation)
    text = generation.content if generation.tool_calls else generation.text
    rest = generation.unsent_content(sent)
    index = 0
    if opened or text or not generation.tool_calls:
        if not opened:
            for opening in open_message():
                yield opening
        if rest:
            yield text_delta(rest)
        done_part = {**part, "text": text}
        yield event(
            "response.output_text.done",
            item_id=response.message_id,
            output_index=0,
            content_index=0,
            text=text,
            logprobs=[],
        )
        yield event(
            "response.content_part.done", item_id=response.message_id, output_index=0, content_index=0, part=done_part
        )
        yield event("response.output_item.done", output_index=0, item=response.message_item(text))
        index = 1
    for offset, item in enumerate(i for i in response.output if i["type"] == "function_call"):
        at = index + offset
        yield event(
            "response.output_item.added", output_index=at, item={**item, "arguments": "", "status": "in_progress"}
        )
        yield event(
            "response.function_call_arguments.delta", item_id=item["id"], output_index=at, delta=item["arguments"]
        )
        yield event(
            "response.function_call_arguments.done", item_id=item["id"], output_index=at, arguments=item["arguments"]
        )
        yield event("response.output_item.done", output_index=at, item=item)
    _keep(caller, response, messages, generation)
    yield event(
        "response.completed" if response.status == "completed" else "response.incomplete", response=response.body()
    )
