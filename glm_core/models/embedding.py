"""Text embeddings from the loaded chat model: the mean of its final hidden states (after the last norm) over a
text's tokens, L2-normalised, so the dot product of two embeddings is their cosine similarity.

A chat model is not trained for retrieval, so these are a convenience for the seeds' /embedding and OpenAI's
/v1/embeddings clients, not a substitute for a dedicated embedding model. Run it on the engine's worker thread
(Engine.run_on_worker), the only thread that may use the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .loading import LoadedModel

BATCH_ROWS = 16  # texts per forward: bounds the activation memory of one call


@torch.inference_mode()
def mean_pooled_embeddings(loaded: LoadedModel, token_ids: list[list[int]]) -> list[list[float]]:
    """One unit vector per list of token ids (each non-empty)."""
    vectors: list[list[float]] = []
    for start in range(0, len(token_ids), BATCH_ROWS):
        rows = token_ids[start : start + BATCH_ROWS]
        width = max(len(ids) for ids in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for row, row_ids in enumerate(rows):  # right padding: causal attention never looks at it
            ids[row, : len(row_ids)] = torch.tensor(row_ids, dtype=torch.long)
            mask[row, : len(row_ids)] = 1
        hidden = _last_hidden_state(loaded.model, ids.to(loaded.device), mask.to(loaded.device))
        weights = mask.to(hidden.device, torch.float32)[..., None]
        pooled = (hidden.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
        vectors += F.normalize(pooled, dim=-1).cpu().tolist()
    return vectors


def _last_hidden_state(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is not None and decoder is not model:  # skips the output layer (vocabulary-sized logits)
        return decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    return model(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True).hidden_states[-1]
