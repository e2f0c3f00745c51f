"""Embeddings for /embedding and /v1/embeddings: texts tokenized, then one forward on the engine's worker
(mean-pooled final hidden states, L2-normalised: glm_core.models.embedding)."""

from __future__ import annotations

from functools import partial

from anyio import to_thread

from ..protocol import Backend
from .config import ApiLimits
from .errors import ApiError, backend_error
from .generation import model_context


async def embed(backend: Backend, inputs: list[str | list[int]], limits: ApiLimits) -> tuple[list[list[float]], int]:
    """One unit vector per input (a text, or token ids) and the number of tokens read."""
    if not (backend.capabilities.local_model and hasattr(backend, "run_on_worker")):
        raise ApiError(400, "this backend computes no embeddings here", "embeddings_unavailable")
    if not inputs:
        raise ApiError(400, "input is empty", param="input")
    if len(inputs) > limits.max_embedding_inputs:
        raise ApiError(400, f"at most {limits.max_embedding_inputs} inputs per request, got {len(inputs)}",
                       param="input")
    context = model_context(backend)
    token_ids = []
    for index, item in enumerate(inputs):
        ids = await to_thread.run_sync(backend.tokenize, item) if isinstance(item, str) else list(item)
        if not ids:
            raise ApiError(400, f"input {index} is empty", param="input")
        if len(ids) > context:
            raise ApiError(400, f"input {index} has {len(ids)} tokens; this model reads at most {context}",
                           "context_length_exceeded", "input")
        if min(ids) < 0:
            raise ApiError(400, f"input {index} has a negative token id", param="input")
        token_ids.append(ids)
    from ..models.embedding import mean_pooled_embeddings  # torch: only where a local model is served

    try:
        vectors = await to_thread.run_sync(backend.run_on_worker, partial(mean_pooled_embeddings, token_ids=token_ids))
    except IndexError:  # an id past the vocabulary
        raise ApiError(400, "a token id is outside the model's vocabulary", param="input") from None
    except Exception as exc:
        raise backend_error(exc, limits.retry_after_s) from None
    return vectors, sum(len(ids) for ids in token_ids)
