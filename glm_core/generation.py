"""The decode loop as a few plain functions (gpt-fast style): prefill, decode one token.

Both take the model and a transformers Cache and return the logits of the last position. A compiled,
static-cache fast path can replace these two functions without touching the engine.
"""

from __future__ import annotations

from typing import Callable

import torch

PREFILL_CHUNK = 512  # long prompts are fed in chunks: bounded activation memory, and stop is checked between chunks


def _standard_strides(_module, args):
    x = args[0]
    return (x.reshape(-1, x.shape[-1]).view(x.shape), *args[1:])


def fix_output_layer_input(model: torch.nn.Module) -> None:
    """Give the output layer its input with standard strides.

    `logits_to_keep=1` hands the output layer a [1, 1, hidden] slice of the last chunk that keeps the chunk's
    batch stride. On CPU a float nn.Linear treats that as a batched matmul and copies the whole weight first:
    for ChatGLM2's 65024 x 4096 BF16 output layer that is 508 MiB more memory and 2-4 s more per prefill
    (measured with torch 2.13); with standard strides the same product takes 22 ms and no copy.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, torch.nn.Linear):
        head.register_forward_pre_hook(_standard_strides)


@torch.inference_mode()
def prefill(
    model: torch.nn.Module,
    input_ids: list[int],
    cache,
    device: torch.device,
    should_stop: Callable[[], bool] = lambda: False,
) -> torch.Tensor | None:
    """Feed `input_ids` after what `cache` already holds; return the next-token logits (None if stopped)."""
    logits = None
    for start in range(0, len(input_ids), PREFILL_CHUNK):
        if should_stop():
            return None
        chunk = torch.tensor([input_ids[start : start + PREFILL_CHUNK]], dtype=torch.long, device=device)
        out = model(input_ids=chunk, past_key_values=cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[0, -1]
    return logits


@torch.inference_mode()
def decode_one(model: torch.nn.Module, token_id: int, cache, device: torch.device) -> torch.Tensor:
    """Feed one token; return the next-token logits."""
    token = torch.tensor([[token_id]], dtype=torch.long, device=device)
    return model(input_ids=token, past_key_values=cache, use_cache=True).logits[0, -1]
