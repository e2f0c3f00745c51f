"""OpenAI's legacy text completions, `POST /v1/completions`: the prompt is given to the model as is (no chat
format), with echo, logprobs (OpenAI's older shape: tokens, token_logprobs, top_logprobs, text_offset), both
together (the prompt's own tokens with their logprobs, then the completion's), stop strings and streaming."""

from __future__ import annotations

import json
import secrets
import time
from typing import Any, Literal

from anyio import to_thread
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette.sse import EventSourceResponse

from ..protocol import MAX_TOP_LOGPROBS, Backend, LocalWorker, OutputSpec, TokenLogprob
from .access import Caller
from .config import ApiLimits
from .errors import ApiError, backend_error
from .generation import Generation, model_name, prepare, system_fingerprint
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
    token_logprobs: list[float | None] = Field(description="null for an echoed prompt's first token")
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int] = Field(description="where each token starts in the choice's text")


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


def _offsets(tokens: list[str], offset: int) -> list[int]:
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return offsets


def completion_logprobs(tokens: list[TokenLogprob], offset: int) -> CompletionLogprobs:
    """The older logprobs shape: parallel lists, each token's text offset counted from `offset`."""
    return CompletionLogprobs(
        tokens=[t.token for t in tokens],
        token_logprobs=[t.logprob for t in tokens],
        top_logprobs=[dict(t.top) for t in tokens],
        text_offset=_offsets([t.token for t in tokens], offset),
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
    output = OutputSpec(raw_prompt=True, top_logprobs=body.logprobs, whole=not body.stream)
    prepared = await prepare(
        backend,
        [{"role": "user", "content": prompt}],
        output,
        state.limits,
        body.max_tokens,
        seed=body.seed,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        repetition_penalty=body.repetition_penalty,
    )
    scored = None
    if body.echo and body.logprobs is not None:  # the prompt's own logprobs, before its reply is queued
        scored = await prompt_logprobs(backend, prepared.ids, body.logprobs, state.limits, caller.owner)
    generation = Generation.submit(
        backend,
        state.conversations,
        caller,
        prepared.messages,
        prepared.params,
        checked_stops(body.stop),
        state.limits,
        output=output,
        prompt_ids=prepared.ids,
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
        return EventSourceResponse(_chunks(generation, head, echoed, scored, include_usage), sep="\n", ping=SSE_PING_S)
    await generation.collect(http_request)
    generation.raise_for_error()
    logprobs = None
    if body.logprobs is not None:
        logprobs = joined(scored, completion_logprobs(generation.logprobs, len(echoed)))
    choice = CompletionChoice(text=echoed + generation.text, logprobs=logprobs, finish_reason=generation.finish_reason)
    return Completion(**head, choices=[choice], usage=_usage(generation))


async def prompt_logprobs(
    backend: Backend, ids: list[int] | None, top: int, limits: ApiLimits, owner: str | None
) -> CompletionLogprobs:
    """Each prompt token's logprob given the ones before it (the first's is null, as in OpenAI's legacy API) and
    its `top` most likely tokens: a forward over the prompt on the engine's worker, a slice at a time between its
    decode steps (glm_core.models.prompt_logprobs), counted as one of `owner`'s running requests."""
    if ids is None or not isinstance(backend, LocalWorker):
        raise ApiError(400, "echo with logprobs needs a model in this server", "echo_logprobs_unavailable", "echo")
    from ..models.prompt_logprobs import PromptLogprobsJob  # torch: only where a local model is served

    job = PromptLogprobsJob(ids, top)
    try:
        with backend.owner_share(owner):
            while not await to_thread.run_sync(backend.run_on_worker, job.step):
                pass
    except Exception as exc:
        raise backend_error(exc, limits.retry_after_s) from None
    texts = await to_thread.run_sync(backend.token_texts, ids)
    alternatives = await to_thread.run_sync(backend.token_texts, [i for row in job.top for i, _ in row])
    named = iter(alternatives)
    tops: list[dict[str, float] | None] = [None] + [{next(named): v for _, v in row} for row in job.top[1:]]
    return CompletionLogprobs(
        tokens=texts, token_logprobs=job.logprobs, top_logprobs=tops, text_offset=_offsets(texts, 0)
    )


def joined(first: CompletionLogprobs | None, then: CompletionLogprobs) -> CompletionLogprobs:
    if first is None:
        return then
    return CompletionLogprobs(
        tokens=first.tokens + then.tokens,
        token_logprobs=first.token_logprobs + then.token_logprobs,
        top_logprobs=first.top_logprobs + then.top_logprobs,
        text_offset=first.text_offset + then.text_offset,
    )


def _usage(generation: Generation) -> Usage:
    return Usage(
        prompt_tokens=generation.prompt_tokens,
        completion_tokens=generation.completion_tokens,
        total_tokens=generation.prompt_tokens + generation.completion_tokens,
        prompt_tokens_details={"cached_tokens": generation.cached_tokens},
    )


async def _chunks(
    generation: Generation, head: dict, echoed: str, scored: CompletionLogprobs | None, include_usage: bool
):
    wants_logprobs = generation.output.top_logprobs is not None
    sent_logprobs, offset = 0, len(echoed)

    def event(choices: list[CompletionChoice], usage: Usage | None = None) -> dict:
        body: dict[str, Any] = Completion(**head, choices=choices, usage=usage).model_dump()
        if not include_usage:
            del body["usage"]
        return {"data": json.dumps(body, ensure_ascii=False)}

    if echoed:
        yield event([CompletionChoice(text=echoed, logprobs=scored)])
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
