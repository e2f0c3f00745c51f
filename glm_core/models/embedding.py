"""Text embeddings from the loaded chat model: the mean of its final hidden states (after the last norm) over a
text's tokens, L2-normalised, so the dot product of two embeddings is their cosine similarity.

A chat model is not trained for retrieval, so these are a convenience for the seeds' /embedding and OpenAI's
/v1/embeddings clients, not a substitute for a dedicated embedding model. The work runs on the engine's worker
thread (Engine.run_on_worker), the only thread that may use the model, one slice at a time (`EmbeddingJob.step`):
short texts batched up to SLICE_TOKENS tokens, a long one in chunks of SLICE_TOKENS over a cache, so the replies
being decoded get a step between two slices instead of waiting for the whole request.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .loading import LoadedModel

# Tokens one slice computes (padding included), as the runner's prefill chunks: on a 2-core CPU a slice of the
# embedded model takes well under a second, so a stream's longest pause stays under one.
SLICE_TOKENS = 512


class EmbeddingJob:
    """Embeddings of several non-empty token-id lists, computed one slice per `step`. The first step checks every
    id against the model's vocabulary before any forward (on CUDA an out-of-range id is a device assert that
    poisons the process): ValueError."""

    def __init__(self, token_ids: list[list[int]]):
        self.token_ids = token_ids
        self.vectors: list[list[float] | None] = [None] * len(token_ids)
        self._next = 0  # the first input not started
        self._long: tuple[int, int, torch.Tensor, object] | None = None  # (input, tokens done, sum, cache)
        self._checked = False

    @property
    def done(self) -> bool:
        return self._next >= len(self.token_ids) and self._long is None

    @torch.inference_mode()
    def step(self, loaded: LoadedModel) -> bool:
        """Compute one slice; True when every vector is ready."""
        if not self._checked:
            vocab_size = loaded.model.get_input_embeddings().num_embeddings
            for index, ids in enumerate(self.token_ids):
                if min(ids) < 0 or max(ids) >= vocab_size:
                    raise ValueError(
                        f"input {index} has a token id outside the model's vocabulary (0 to {vocab_size - 1})"
                    )
            self._checked = True
        if self._long is not None or len(self.token_ids[self._next]) > SLICE_TOKENS and _chunkable(loaded.model):
            self._long_chunk(loaded)
        else:
            self._short_rows(loaded)
        return self.done

    def _short_rows(self, loaded: LoadedModel) -> None:
        rows, width = [], 0
        while self._next < len(self.token_ids):  # as many as fit in one slice, and always at least one
            ids = self.token_ids[self._next]
            if rows and (max(width, len(ids)) * (len(rows) + 1) > SLICE_TOKENS or len(ids) > SLICE_TOKENS):
                break
            rows.append(self._next)
            width = max(width, len(ids))
            self._next += 1
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for row, index in enumerate(rows):  # right padding: causal attention never looks at it
            ids[row, : len(self.token_ids[index])] = torch.tensor(self.token_ids[index], dtype=torch.long)
            mask[row, : len(self.token_ids[index])] = 1
        hidden = _last_hidden_state(loaded.model, ids.to(loaded.device), mask.to(loaded.device))
        weights = mask.to(hidden.device, torch.float32)[..., None]
        pooled = (hidden.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
        for index, vector in zip(rows, F.normalize(pooled, dim=-1).cpu().tolist()):
            self.vectors[index] = vector

    def _long_chunk(self, loaded: LoadedModel) -> None:
        from transformers import DynamicCache

        if self._long is None:
            self._long = (self._next, 0, torch.zeros(()), DynamicCache(config=loaded.model.config))
            self._next += 1
        index, done, total, cache = self._long
        ids = self.token_ids[index]
        chunk = torch.tensor([ids[done : done + SLICE_TOKENS]], dtype=torch.long, device=loaded.device)
        hidden = loaded.model.get_decoder()(input_ids=chunk, past_key_values=cache, use_cache=True).last_hidden_state
        total = total + hidden[0].float().sum(dim=0).cpu()
        done += chunk.shape[1]
        if done < len(ids):
            self._long = (index, done, total, cache)
            return
        self.vectors[index] = F.normalize(total / done, dim=-1).tolist()
        self._long = None


def mean_pooled_embeddings(loaded: LoadedModel, token_ids: list[list[int]]) -> list[list[float]]:
    """One unit vector per list of token ids (each non-empty), all slices at once (for callers with the model to
    themselves: the benchmarks, the tests)."""
    job = EmbeddingJob(token_ids)
    while not job.step(loaded):
        pass
    return job.vectors


def _chunkable(model) -> bool:
    """A transformers decoder that takes a cache: a long text can be read in chunks (causal attention: the same
    hidden states as in one forward)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    return decoder is not None and decoder is not model


def _last_hidden_state(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if _chunkable(model):  # skips the output layer (vocabulary-sized logits)
        return model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    return model(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True).hidden_states[-1]
