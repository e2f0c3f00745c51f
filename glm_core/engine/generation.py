"""The decode loop as a few plain functions (gpt-fast style): prefill, decode one token.

Both take the model and a transformers Cache and return the logits of the last position. A compiled,
static-cache fast path can replace these two functions without touching the engine.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

PREFILL_CHUNK = 512  # long prompts are fed in chunks: bounded activation memory, and stop is checked between chunks


@torch.inference_mode()
def prefill(
    model: torch.nn.Module,
    input_ids: list[int],
    cache,
    device: torch.device,
    should_stop: Callable[[], bool] = lambda: False,
    chunk_size: int = PREFILL_CHUNK,
) -> torch.Tensor | None:
    """Feed `input_ids` after what `cache` already holds, `chunk_size` at a time; return the next-token logits
    (None if stopped)."""
    logits = None
    for start in range(0, len(input_ids), chunk_size):
        if should_stop():
            return None
        chunk = torch.tensor([input_ids[start : start + chunk_size]], dtype=torch.long, device=device)
        out = model(input_ids=chunk, past_key_values=cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[0, -1]
    return logits


@torch.inference_mode()
def decode_one(model: torch.nn.Module, token_id: int, cache, device: torch.device) -> torch.Tensor:
    """Feed one token; return the next-token logits."""
    token = torch.tensor([[token_id]], dtype=torch.long, device=device)
    return model(input_ids=token, past_key_values=cache, use_cache=True).logits[0, -1]
