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
        return _draw(logits, torch.arange(vocab, device=logits.device), generator)
    values, indices = _nucleus(logits, top_k, params.top_p)
    return _draw(values, indices, generator)


_MASK32 = 0xFFFFFFFF


def _draw(logits: torch.Tensor, ids: torch.Tensor, generator: torch.Generator | None) -> int:
    """One of `ids` drawn in proportion to exp(logits), by the Gumbel-max trick with each token's noise a hash of
    the token's id and one number taken from the generator per draw. However many tokens the nucleus keeps, and in
    whatever order, a token's noise is the same: a seeded reply is the same alone and in a batch, where the batched
    forward's rounding can widen the nucleus by a near tie at its edge. (`torch.multinomial` over the kept tokens
    took as many numbers from the generator as tokens, so one token more changed every draw after it; over the whole
    vocabulary it cost 1 ms a row a step here.)"""
    device = generator.device if generator is not None else logits.device
    key = int(torch.randint(_MASK32 + 1, (), generator=generator, device=device))
    x = (ids.to(torch.int64) * 0x9E3779B1 + key) & _MASK32
    # lowbias32 (Chris Wellons' integer hash): every input bit moves every output bit.
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    x = x ^ (x >> 16)
    exact = torch.float64 if logits.device.type == "cpu" else torch.float32  # MPS has no float64
    uniform = (x.to(exact) + 0.5) / (_MASK32 + 1)
    gumbel = -torch.log(-torch.log(uniform))
    return int(ids[torch.argmax(logits.to(exact) + gumbel)])


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
