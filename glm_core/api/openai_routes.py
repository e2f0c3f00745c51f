"""OpenAI-compatible routes: /v1/models, /v1/chat/completions (streamed as server-sent events, or whole),
/v1/embeddings. Thin: checks and shapes only; generation.py talks to the backend."""

from __future__ import annotations

import base64
import dataclasses
import json
import secrets
import struct
import time

from fastapi import APIRouter, Depends, Request
from sse_starlette.sse import EventSourceResponse

from ..protocol import Backend, TokenLogprob
from ..reasoning import ReasoningSplitter
from ..sampling_defaults import CONTROLS
from .access import Caller
from .embeddings import embed
from .errors import ApiError
from .generation import (
    Generation,
    model_name,
    prepare,
    sampling_defaults,
    system_fingerprint,
)
from .schemas import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessageOut,
    ChoiceLogprobs,
    ChunkChoice,
    ChunkDelta,
    ChunkToolCall,
    EmbeddingList,
    EmbeddingRequest,
    ModelCard,
    ModelList,
    TokenLogprobOut,
    ToolCallOut,
    TopLogprob,
    Usage,
)
from .state import ApiState, api_caller, api_state, loaded_backend

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])
SSE_PING_S = 15  # a comment line keeps proxies from closing a stream that waits in the queue


@router.get("/models", response_model=ModelList)
async def list_models(_caller: Caller = Depends(api_caller), backend: Backend = Depends(loaded_backend)):
    card = backend.card()
    loaded_at = int(time.time() - (card.load_seconds or 0))
    defaults = sampling_defaults(backend)
    public = {**{control: defaults[control] for control in CONTROLS}, "sources": defaults["sources"]}
    return ModelList(data=[ModelCard(id=model_name(backend), created=loaded_at, defaults=public)])


@router.post(
    "/chat/completions",
    response_model=ChatCompletion,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "a chat.completion, or with stream=true its chunks as server-sent events",
        }
    },
)
async def chat_completions(
    body: ChatCompletionRequest,
    http_request: Request,
    caller: Caller = Depends(api_caller),
    backend: Backend = Depends(loaded_backend),
    state: ApiState = Depends(api_state),
):
    output = dataclasses.replace(body.output(), whole=not body.stream)
    stops = body.stop_strings()
    # Omitted fields take the model's own defaults (as vLLM's --generation-config auto); /v1/models lists them.
    prepared = await prepare(
        backend,
        [m.plain() for m in body.messages],
        output,
        state.limits,
        body.max_tokens or body.max_completion_tokens,
        seed=body.seed,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        repetition_penalty=body.repetition_penalty,
        thinking=body.thinking(),
    )
    generation = Generation.submit(
        backend,
        state.conversations,
        caller,
        prepared.messages,
        prepared.params,
        stops,
        state.limits,
        output=output,
        prompt_ids=prepared.ids,
    )
    head = dict(
        id=f"chatcmpl-{secrets.token_hex(12)}",
        created=int(time.time()),
        model=model_name(backend),
        system_fingerprint=system_fingerprint(backend),
    )
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        await generation.opening()
        return EventSourceResponse(_chunks(generation, head, include_usage), sep="\n", ping=SSE_PING_S)
    await generation.collect(http_request)
    generation.raise_for_error()
    calls = [
        ToolCallOut(id=c["id"], function={"name": c["name"], "arguments": c["arguments"]})
        for c in generation.tool_calls
    ]
    reasoning, answer = generation.parts()  # a reasoning model's thinking apart from its answer (vLLM's field)
    message = ChatMessageOut(
        content=(answer or None) if calls else answer, reasoning_content=reasoning or None, tool_calls=calls or None
    )
    logprobs = choice_logprobs(generation.logprobs) if output.top_logprobs is not None else None
    return ChatCompletion(
        **head,
        choices=[{"message": message, "finish_reason": generation.finish_reason, "logprobs": logprobs}],
        usage=_usage(generation),
    )


def choice_logprobs(tokens: list[TokenLogprob]) -> ChoiceLogprobs:
    """OpenAI's logprobs.content: each token with its UTF-8 bytes and its most likely alternatives."""
    return ChoiceLogprobs(
        content=[
            TokenLogprobOut(
                token=t.token,
                logprob=t.logprob,
                bytes=list(t.token.encode("utf-8")),
                top_logprobs=[TopLogprob(token=a, logprob=v, bytes=list(a.encode("utf-8"))) for a, v in t.top],
            )
            for t in tokens
        ]
    )


def _usage(generation: Generation) -> Usage:
    return Usage(
        prompt_tokens=generation.prompt_tokens,
        completion_tokens=generation.completion_tokens,
        total_tokens=generation.prompt_tokens + generation.completion_tokens,
        prompt_tokens_details={"cached_tokens": generation.cached_tokens},
    )


async def _chunks(generation: Generation, head: dict, include_usage: bool):
    """OpenAI's stream: a first chunk with the role, one per text delta, one with finish_reason, the usage chunk
    when asked for, then [DONE]. A client that disconnects cancels this generator, which stops the request.

    With tools, text that may still turn out to be a call is held back; a call goes out as tool_calls deltas (its
    id and name, then its arguments) once the reply ends. A backend that reads calls itself (a remote server) has
    its tool_calls deltas passed on as they come."""
    wants_logprobs = generation.output.top_logprobs is not None
    sent_text, sent_logprobs, sent_calls = 0, 0, 0

    def event(choices: list[ChunkChoice], usage: Usage | None = None) -> dict:
        chunk = ChatCompletionChunk(**head, choices=choices, usage=usage)
        body = chunk.model_dump(exclude=None if include_usage else {"usage"})
        for sent, choice in zip(body["choices"], choices):  # a delta holds only what it carries, as OpenAI's do
            sent["delta"] = choice.delta.model_dump(exclude_unset=True)
        return {"data": json.dumps(body, ensure_ascii=False)}

    def text_chunk(text: str) -> dict:
        nonlocal sent_logprobs
        logprobs = None
        if wants_logprobs:
            logprobs = choice_logprobs(generation.logprobs[sent_logprobs:])
            sent_logprobs = len(generation.logprobs)
        return event([ChunkChoice(delta=ChunkDelta(content=text), logprobs=logprobs)])

    # A reasoning model's thinking streams as reasoning_content deltas, then its answer as content (vLLM's way).
    splitter = ReasoningSplitter() if generation.reasoning else None

    def text_chunks(text: str, end: bool = False) -> list[dict]:
        if splitter is None:
            return [text_chunk(text)] if text else []
        reasoning, answer = splitter.push(text)
        if end:
            more_reasoning, more_answer = splitter.flush()
            reasoning, answer = reasoning + more_reasoning, answer + more_answer
        thought = [event([ChunkChoice(delta=ChunkDelta(reasoning_content=reasoning))])] if reasoning else []
        return thought + ([text_chunk(answer)] if answer else [])

    def relayed_calls() -> list[dict]:
        nonlocal sent_calls
        pieces = generation.call_deltas[sent_calls:]
        sent_calls = len(generation.call_deltas)
        out = []
        for piece in pieces:
            function = {"arguments": piece.arguments} | ({"name": piece.name} if piece.name is not None else {})
            opened = {"id": piece.id, "type": "function"} if piece.id is not None else {}
            call = ChunkToolCall(index=piece.index, function=function, **opened)
            out.append(event([ChunkChoice(delta=ChunkDelta(tool_calls=[call]))]))
        return out

    yield event([ChunkChoice(delta=ChunkDelta(role="assistant", content="", refusal=None))])
    async for _piece in generation.deltas():
        for chunk in relayed_calls():
            yield chunk
        if generation.reply is not None:  # ended: what is left goes out below, as text or as calls
            continue
        safe = generation.streamable()
        if safe > sent_text:
            piece, sent_text = generation.text[sent_text:safe], safe
            for chunk in text_chunks(piece):
                yield chunk
    try:
        generation.raise_for_error()
    except ApiError as exc:  # headers are gone: the error travels as an event, as OpenAI's streams do
        yield {"data": json.dumps(exc.body(), ensure_ascii=False)}
        yield {"data": "[DONE]"}
        return
    for chunk in text_chunks(generation.unsent_content(sent_text), end=True):
        yield chunk
    for index, call in enumerate(generation.tool_calls if not generation.call_deltas else []):
        opening = ChunkToolCall(
            index=index, id=call["id"], type="function", function={"name": call["name"], "arguments": ""}
        )
        yield event([ChunkChoice(delta=ChunkDelta(tool_calls=[opening]))])
        arguments = ChunkToolCall(index=index, function={"arguments": call["arguments"]})
        yield event([ChunkChoice(delta=ChunkDelta(tool_calls=[arguments]))])
    yield event([ChunkChoice(delta=ChunkDelta(), finish_reason=generation.finish_reason)])
    if include_usage:
        yield event([], _usage(generation))
    yield {"data": "[DONE]"}


@router.post("/embeddings", response_model=EmbeddingList)
async def embeddings(
    body: EmbeddingRequest,
    caller: Caller = Depends(api_caller),
    backend: Backend = Depends(loaded_backend),
    state: ApiState = Depends(api_state),
):
    if body.dimensions is not None:
        raise ApiError(400, "dimensions is not supported: the size is the model's hidden size", param="dimensions")
    given = body.input
    inputs: list = [given] if isinstance(given, str) or (given and isinstance(given[0], int)) else list(given)
    vectors, tokens = await embed(backend, inputs, state.limits, caller.owner)
    data: list[str] | list[list[float]] = vectors
    if body.encoding_format == "base64":  # what the openai client asks for by default: float32, little-endian
        data = [base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode("ascii") for v in vectors]
    return EmbeddingList(
        data=[{"index": i, "embedding": d} for i, d in enumerate(data)],
        model=model_name(backend),
        usage={"prompt_tokens": tokens, "total_tokens": tokens},
    )
