"""Next-token selection under a request's sampling controls."""

from __future__ import annotations

import torch

from ..protocol import SamplingParams


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
    vocab = logits.numel()
    top_k = params.top_k if 0 < params.top_k < vocab else 0
    if not top_k and params.top_p >= 1.0:
        return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))
    values, indices = _nucleus(logits, top_k, params.top_p)
    choice = torch.multinomial(torch.softmax(values, dim=-1), 1, generator=generator)
    return int(indices[choice])


def _nucleus(logits: torch.Tensor, top_k: int, top_p: float, first_guess: int = 256):
    """The tokens top-k and top-p leave (their logits, most likely first, and their ids), without sorting the whole
    vocabulary: a sort of 49k logits took 3.6 ms a row a step here, where the nucleus at a chat's temperature holds
    a handful of tokens. The top `first_guess` candidates are taken (top_k's exactly, when it is set) and grown
    until the nucleus closes inside them. Top-p keeps a token while the mass before it is below top_p (the most
    likely token always stays), the mass taken over the top_k tokens when top_k is set, else over the vocabulary."""
    vocab = logits.numel()
    guess = top_k or min(first_guess, vocab)
    total = None if top_k else torch.logsumexp(logits, dim=-1)
    while True:
        values, indices = torch.topk(logits, guess)
        if top_p >= 1.0:
            return values, indices
        probs = torch.exp(values - (torch.logsumexp(values, dim=-1) if total is None else total))
        keep = (probs.cumsum(dim=-1) - probs) < top_p
        if top_k or guess == vocab or not bool(keep[-1]):
            return values[keep], indices[keep]
        guess = min(vocab, guess * 8)
