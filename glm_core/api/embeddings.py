"""Embeddings for /embedding and /v1/embeddings: texts tokenized, then one forward on the engine's worker
(mean-pooled final hidden states, L2-normalised: glm_core.models.embedding)."""

from __future__ import annotations

from collections.abc import Sequence

from anyio import to_thread

from ..protocol import Backend, LocalWorker
from .config import ApiLimits
from .errors import ApiError, backend_error
from .generation import model_context


async def embed(
    backend: Backend, inputs: Sequence[str | list[int]], limits: ApiLimits, owner: str | None = None
) -> tuple[list[list[float]], int]:
    """One unit vector per input (a text, or token ids) and the number of tokens read. Bounded (inputs, characters,
    tokens), counted as one of `owner`'s running requests, and computed a slice at a time between the engine's
    decode steps, so the replies being streamed keep flowing."""
    if not isinstance(backend, LocalWorker):
        raise ApiError(400, "this backend computes no embeddings here", "embeddings_unavailable")
    if not inputs:
        raise ApiError(400, "input is empty", param="input")
    if len(inputs) > limits.max_embedding_inputs:
        raise ApiError(
            400, f"at most {limits.max_embedding_inputs} inputs per request, got {len(inputs)}", param="input"
        )
    for index, item in enumerate(inputs):
        if isinstance(item, str) and len(item) > limits.max_text_chars:
            raise ApiError(
                400,
                f"input {index} has {len(item):,} characters; at most {limits.max_text_chars:,} per input",
                "input_too_long",
                "input",
            )
    context = model_context(backend)
    token_ids, total = [], 0
    for index, item in enumerate(inputs):
        ids = await to_thread.run_sync(backend.tokenize, item) if isinstance(item, str) else list(item)
        if not ids:
            raise ApiError(400, f"input {index} is empty", param="input")
        if len(ids) > context:
            raise ApiError(
                400,
                f"input {index} has {len(ids)} tokens; this model reads at most {context}",
                "context_length_exceeded",
                "input",
            )
        total += len(ids)
        if total > limits.max_embedding_tokens:
            raise ApiError(
                400,
                f"the inputs take more than {limits.max_embedding_tokens:,} tokens; send them in several requests",
                "input_too_long",
                "input",
            )
        token_ids.append(ids)
    from ..models.embedding import EmbeddingJob  # torch: only where a local model is served

    job = EmbeddingJob(token_ids)
    try:
        with backend.owner_share(owner):
            while not await to_thread.run_sync(backend.run_on_worker, job.step):
                pass
    except ValueError as exc:  # an id outside the vocabulary
        raise ApiError(400, str(exc), param="input") from None
    except Exception as exc:
        raise backend_error(exc, limits.retry_after_s) from None
    vectors = [v for v in job.vectors if v is not None]
    assert len(vectors) == len(token_ids), "the embeddings job ends with a vector per input"
    return vectors, total
