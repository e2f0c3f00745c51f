"""OpenAI's legacy text completions, `POST /v1/completions`: the prompt is given to the model as is (no chat
format), with echo, logprobs (OpenAI's older shape: tokens, token_logprobs, top_logprobs, text_offset), stop
strings and streaming."""

from __future__ import annotations

import json
import secrets
import time
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette.sse import EventSourceResponse

from ..protocol import MAX_TOP_LOGPROBS, Backend, OutputSpec, TokenLogprob
from .access import Caller
from .errors import ApiError
from .generation import (
    Generation,
    checked_messages,
    checked_params,
    count_prompt_tokens,
    model_context,
    model_name,
    reply_budget,
    system_fingerprint,
)
from .schemas import StreamOptions, Usage, checked_stops
from .state import ApiState, api_caller, api_state, loaded_backend

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])
SSE_PING_S = 15


class CompletionRequest(BaseModel):
    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "example": {"model": "SmolLM2-135M-Instruct", "prompt": "Once upon a time", "max_tokens": 16}
        },
    )

    model: str
    prompt: str | list[str] = Field(description="one prompt (a list holds one string)")
    max_tokens: int | None = Field(16, ge=1, description="OpenAI's default: 16")
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0, le=100)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    n: int = Field(1, ge=1, le=1)
    best_of: int | None = Field(None, ge=1, le=1)
    suffix: None = Field(None, description="insertion is not supported")
    user: str | None = None

    def text(self) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise ApiError(400, "one prompt per request", param="prompt")
            return self.prompt[0]
        return self.prompt


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


def completion_logprobs(tokens: list[TokenLogprob], offset: int) -> CompletionLogprobs:
    """The older logprobs shape: parallel lists, each token's text offset counted from `offset`."""
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token.token)
    return CompletionLogprobs(
        tokens=[t.token for t in tokens],
        token_logprobs=[t.logprob for t in tokens],
        top_logprobs=[dict(t.top) for t in tokens],
        text_offset=offsets,
    )


@router.post("/completions", response_model=Completion)
async def completions(
    body: CompletionRequest,
    http_request: Request,
    caller: Caller = Depends(api_caller),
    backend: Backend = Depends(loaded_backend),
    state: ApiState = Depends(api_state),
):
    prompt = body.text()
    if body.echo and body.logprobs is not None:
        raise ApiError(
            400, "echo with logprobs is not supported (the prompt's own logprobs are not computed)", param="echo"
        )
    output = OutputSpec(raw_prompt=True, top_logprobs=body.logprobs)
    messages = checked_messages([{"role": "user", "content": prompt}])
    context = model_context(backend)
    prompt_tokens = await count_prompt_tokens(backend, messages, output)
    params = checked_params(
        backend,
        seed=body.seed,
        max_length=context,
        max_new_tokens=reply_budget(prompt_tokens, context, body.max_tokens, state.limits),
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        repetition_penalty=body.repetition_penalty,
    )
    generation = Generation.submit(
        backend, state.conversations, caller, messages, params, checked_stops(body.stop), state.limits, output=output
    )
    head = dict(
        id=f"cmpl-{secrets.token_hex(12)}",
        created=int(time.time()),
        model=model_name(backend),
        system_fingerprint=system_fingerprint(backend),
    )
    echoed = prompt if body.echo else ""
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        await generation.opening()
        return EventSourceResponse(_chunks(generation, head, echoed, include_usage), sep="\n", ping=SSE_PING_S)
    await generation.collect(http_request)
    generation.raise_for_error()
    logprobs = completion_logprobs(generation.logprobs, 0) if body.logprobs is not None else None
    choice = CompletionChoice(text=echoed + generation.text, logprobs=logprobs, finish_reason=generation.finish_reason)
    return Completion(**head, choices=[choice], usage=_usage(generation))


def _usage(generation: Generation) -> Usage:
    return Usage(
        prompt_tokens=generation.prompt_tokens,
        completion_tokens=generation.completion_tokens,
        total_tokens=generation.prompt_tokens + generation.completion_tokens,
        prompt_tokens_details={"cached_tokens": generation.cached_tokens},
    )


async def _chunks(generation: Generation, head: dict, echoed: str, include_usage: bool):
    wants_logprobs = generation.output.top_logprobs is not None
    sent_logprobs, offset = 0, 0

    def event(choices: list[CompletionChoice], usage: Usage | None = None) -> dict:
        body: dict[str, Any] = Completion(**head, choices=choices, usage=usage).model_dump()
        if not include_usage:
            del body["usage"]
        return {"data": json.dumps(body, ensure_ascii=False)}

    if echoed:
        yield event([CompletionChoice(text=echoed)])
    async for piece in generation.deltas():
        logprobs = None
        if wants_logprobs:
            logprobs = completion_logprobs(generation.logprobs[sent_logprobs:], offset)
            sent_logprobs = len(generation.logprobs)
        offset += len(piece)
        yield event([CompletionChoice(text=piece, logprobs=logprobs)])
    try:
        generation.raise_for_error()
    except ApiError as exc:
        yield {"data": json.dumps(exc.body(), ensure_ascii=False)}
        yield {"data": "[DONE]"}
        return
    yield event([CompletionChoice(text="", finish_reason=generation.finish_reason)])
    if include_usage:
        yield event([], _usage(generation))
    yield {"data": "[DONE]"}
