"""Sampling controls and next-token selection."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass
class SamplingParams:
    # Defaults of the ChatGLM demos: 8192 total tokens, top_p 0.8, temperature 0.8.
    max_length: int = 8192
    max_new_tokens: int = 1024
    temperature: float = 0.8
    top_p: float = 0.8
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def validate(self) -> "SamplingParams":
        """Raise ValueError with a readable message when a control is out of range."""
        if self.max_length < 2:
            raise ValueError("max_length must be at least 2 tokens")
        if not 1 <= self.max_new_tokens < self.max_length:
            raise ValueError(f"max new tokens must be between 1 and max_length - 1 ({self.max_length - 1})")
        if self.temperature < 0:
            raise ValueError("temperature must be 0 (greedy) or more")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be 0 (off) or more")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition penalty must be positive (1.0 is off)")
        return self

    def as_dict(self) -> dict:
        return asdict(self)


def sample_next(
    logits: torch.Tensor,
    params: SamplingParams,
    seen_ids: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> int:
    """Pick the next token from 1-D logits. Temperature 0 is greedy."""
    logits = logits.float()
    if params.repetition_penalty != 1.0 and seen_ids is not None and seen_ids.numel():
        # CTRL-style penalty, as transformers applies it: shrink positive logits, grow negative ones.
        picked = logits.gather(0, seen_ids)
        picked = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
        logits = logits.scatter(0, seen_ids, picked)
    if params.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token once the mass before it already reaches top_p; the most likely token always stays.
        drop = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= params.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
