"""The seeds' routes, with their request and response fields exactly as their clients send and read them:

- ChatGLM's api.py: `POST /` {prompt, history, max_length?, top_p?, temperature?} -> {response, history, status,
  time}. Unlike the original, an explicit temperature 0 means greedy.
- The stream API: `POST /chat` {query, history} -> {query, response, history, success}; `POST /stream` (events
  named `delta`); `GET /free_gc` -> {success} (an admin route here).
- The GLM API: `POST /chat` {prompt, history, max_length, top_p, temperature} -> {content, prompt_tokens,
  completion_tokens, total_tokens, model, object}; `POST /chat-stream`; `POST /tokenize`; `POST /embedding`.

Their streams use sse-starlette's `\\r\\n` line ends, as the seeds (built on it) did; /v1 uses OpenAI's `\\n`.
"""

from __future__ import annotations

import json
from datetime import datetime

from anyio import to_thread
from fastapi import APIRouter, Depends, Request
from sse_starlette.sse import EventSourceResponse, ServerSentEvent

from ..protocol import Backend, LocalWorker, QueueFull
from .access import Caller
from .accounting import audit
from .embeddings import embed
from .errors import ApiError, backend_error
from .generation import Generation, model_name, sampling_defaults, start_total_length_generation
from .schemas import (
    ChatGLMRequest,
    ChatGLMResponse,
    GlmApiChatResponse,
    GlmApiRequest,
    History,
    SeedEmbeddingRequest,
    SeedEmbeddingResponse,
    StreamApiChatResponse,
    StreamApiRequest,
    TokenizeRequest,
    TokenizeResponse,
    history_messages,
    history_pairs,
)
from .state import ApiState, admin_caller, api_state, loaded_backend, seed_caller

router = APIRouter(tags=["The seeds' routes"])

# The seeds' own defaults when a request leaves a control out (or, for the originals' `x if x else default`, sends
# 0); every other control takes the model's defaults (sampling_defaults.compose_params).
CHATGLM_DEFAULTS = {"max_length": 2048, "top_p": 0.7, "temperature": 0.95}  # ChatGLM's api.py
GLM_API_DEFAULTS = {"max_length": 4096, "top_p": 0.7, "temperature": 0.95}  # the GLM API
MODEL_DEFAULTS: dict = {}  # the stream API called the model's chat() with the model's own defaults
TOKENIZE_MAX_LENGTH = 4096


async def _start(
    backend: Backend,
    state: ApiState,
    caller: Caller,
    history: History,
    prompt: str,
    max_length: int | None,
    route_defaults: dict,
    top_p: float | None = None,
    temperature: float | None = None,
) -> tuple[Generation, int | None]:
    max_length = max_length or route_defaults.get("max_length") or sampling_defaults(backend)["max_length"]
    generation = await start_total_length_generation(
        backend,
        state,
        caller,
        history_messages(history) + [{"role": "user", "content": prompt}],
        max_length,
        top_p=top_p or route_defaults.get("top_p"),  # 0 meant "the default" in the originals
        temperature=route_defaults.get("temperature") if temperature is None else temperature,  # 0 is greedy here
    )
    prompt_ids = generation.request.prompt_ids
    return generation, len(prompt_ids) if prompt_ids is not None else None


@router.post("/", response_model=ChatGLMResponse, summary="ChatGLM's api.py")
async def chatglm_api(
    body: ChatGLMRequest,
    http_request: Request,
    caller: Caller = Depends(seed_caller),
    backend: Backend = Depends(loaded_backend),
    state: ApiState = Depends(api_state),
):
    generation, _ = await _start(
        backend,
        state,
        caller,
        body.history,
        body.prompt,
        body.max_length,
        CHATGLM_DEFAULTS,
        top_p=body.top_p,
        temperature=body.temperature,
    )
    response = await generation.collect(http_request)
    generation.raise_for_error()
    return {
        "response": response,
        "history": history_pairs(body.history) + [[body.prompt, response]],
        "status": 200,
        "time": datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
    }


@router.post(
    "/chat",
    response_model=StreamApiChatResponse | GlmApiChatResponse,
    summary="The stream API's chat ({query, history}) or the GLM API's ({prompt, history, ...})",
)
async def chat(
    body: StreamApiRequest | GlmApiRequest,
    http_request: Request,
    caller: Caller = Depends(seed_caller),
    backend: Backend = Depends(loaded_backend),
    state: ApiState = Depends(api_state),
):
    if isinstance(body, StreamApiRequest):
        generation, _ = await _start(backend, state, caller, body.history, body.query, None, MODEL_DEFAULTS)
        response = await generation.collect(http_request)
        generation.raise_for_error()
        return {
            "query": body.query,
            "response": response,
            "history": history_pairs(body.history) + [[body.query, response]],
            "success": True,
        }
    generation, _ = await _start(
        backend,
        state,
        caller,
        body.history,
        body.prompt,
        body.max_length,
        GLM_API_DEFAULTS,
        top_p=body.top_p,
        temperature=body.temperature,
    )
    content = await generation.collect(http_request)
    generation.raise_for_error()
    return {
        "content": content,
        "prompt_tokens": generation.prompt_tokens,
        "completion_tokens": generation.completion_tokens,
        "total_tokens": generation.prompt_tokens + generation.completion_tokens,
        "model": model_name(backend),
        "object": "chat.completion",
    }


@router.post(
    "/stream",
    summary="The stream API's stream: events named `delta`",
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def stream(
    body: StreamApiRequest,
    caller: Caller = Depends(seed_caller),
    backend: Backend = Depends(loaded_backend),
    state: ApiState = Depends(api_state),
):
    generation, _ = await _start(backend, state, caller, body.history, body.query, None, MODEL_DEFAULTS)

    async def events():
        response = ""
        async for piece in generation.deltas():
            response += piece
            yield ServerSentEvent(_json({"delta": piece, "response": response, "finished": False}), event="delta")
        try:
            generation.raise_for_error()
        except ApiError as exc:
            yield ServerSentEvent(_json(exc.body()), event="error")
            return
        history = history_pairs(body.history) + [[body.query, response]]
        yield ServerSentEvent(
            _json({"query": body.query, "delta": "[EOS]", "response": response, "history": history, "finished": True}),
            event="delta",
        )

    return EventSourceResponse(events())


@router.post(
    "/chat-stream",
    summary="The GLM API's stream: one data event per delta",
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def chat_stream(
    body: GlmApiRequest,
    caller: Caller = Depends(seed_caller),
    backend: Backend = Depends(loaded_backend),
    state: ApiState = Depends(api_state),
):
    generation, prompt_tokens = await _start(
        backend,
        state,
        caller,
        body.history,
        body.prompt,
        body.max_length,
        GLM_API_DEFAULTS,
        top_p=body.top_p,
        temperature=body.temperature,
    )
    model = model_name(backend)

    async def events():
        pieces = 0  # completion tokens so far, counted by deltas (a delta is one token or a few)
        async for piece in generation.deltas():
            pieces += 1
            yield {
                "data": _json(
                    {
                        "content": piece,
                        "prompt_tokens": prompt_tokens or 0,
                        "completion_tokens": pieces,
                        "total_tokens": (prompt_tokens or 0) + pieces,
                        "model": model,
                        "object": "chat.completion",
                    }
                )
            }
        try:
            generation.raise_for_error()
        except ApiError as exc:
            yield ServerSentEvent(_json(exc.body()), event="error")

    return EventSourceResponse(events())


@router.get("/free_gc", summary="The seeds' torch_gc: free cached memory (admin)")
async def free_gc(caller: Caller = Depends(admin_caller)):
    from ..telemetry.memory import free_cached_memory

    await to_thread.run_sync(free_cached_memory)
    audit(caller, "memory.free")
    return {"success": True}


@router.post("/tokenize", response_model=TokenizeResponse, summary="The GLM API's tokenize")
async def tokenize(
    body: TokenizeRequest,
    caller: Caller = Depends(seed_caller),
    backend: Backend = Depends(loaded_backend),
    state: ApiState = Depends(api_state),
):
    if not isinstance(backend, LocalWorker):
        raise ApiError(400, "this backend does not tokenize here", "tokenize_unavailable")
    limit = state.limits.max_text_chars  # the tokenizer's lock is the decode loop's too: a bounded hold
    if len(body.prompt) > limit:
        raise ApiError(
            400,
            f"the prompt has {len(body.prompt):,} characters; at most {limit:,} per request",
            "input_too_long",
            "prompt",
        )
    try:
        with backend.owner_share(caller.owner):
            ids = (await to_thread.run_sync(backend.tokenize, body.prompt))[: body.max_length or TOKENIZE_MAX_LENGTH]
            strings = await to_thread.run_sync(backend.token_strings, ids)
    except QueueFull as exc:
        raise backend_error(exc, state.limits.retry_after_s) from None
    return {"tokenIds": ids, "tokens": strings}


@router.post("/embedding", response_model=SeedEmbeddingResponse, summary="The GLM API's embedding")
async def embedding(
    body: SeedEmbeddingRequest,
    caller: Caller = Depends(seed_caller),
    backend: Backend = Depends(loaded_backend),
    state: ApiState = Depends(api_state),
):
    texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    vectors, _ = await embed(backend, texts, state.limits, caller.owner)
    return {"data": vectors, "model": model_name(backend), "object": "embedding"}


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False)
