"""Fitting a conversation into the model's context, and finding what a kept cache already holds."""

from __future__ import annotations

from typing import Callable, Sequence

from ..protocol import PromptTooLong


def fit_to_context(encode: Callable[[list[dict]], list[int]], messages: list[dict], budget: int):
    """Drop the oldest turns (never the system message or the newest user message) until the ids fit.

    Returns (ids, number of dropped messages). Raises PromptTooLong if even the newest message alone is too long.
    """
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system) :]
    dropped = 0
    while True:
        ids = encode(system + turns)
        if len(ids) <= budget:
            return ids, dropped
        if len(turns) <= 1:
            raise PromptTooLong(
                f"The message is too long: the context would be {len(ids):,} tokens but at most {budget:,} fit "
                f"(max_length minus the tokens reserved for the reply). Shorten it or lower max new tokens."
            )
        # Drop up to and including the next user message boundary, so the context starts at a user turn.
        cut = 1
        while cut < len(turns) - 1 and turns[cut]["role"] != "user":
            cut += 1
        turns = turns[cut:]
        dropped += cut


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
