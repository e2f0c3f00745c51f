"""Fitting a conversation into the model's context, and finding what a kept cache already holds."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..protocol import PromptTooLong


class FittingStopped(Exception):
    """The request was stopped while its context was being fitted."""


def fit_to_context(
    encode: Callable[[list[dict]], list[int]],
    messages: list[dict],
    budget: int,
    count: Callable[[str], int] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
):
    """Drop the oldest turns (never the system message or the newest user message) until the ids fit.

    Returns (ids, number of dropped messages). Raises PromptTooLong if even the newest message alone is too long,
    FittingStopped if `should_stop()` turns true meanwhile.

    The context always starts at a user turn, so the candidates are the user messages; fewer dropped messages
    never gives fewer ids, so a binary search over them needs O(log n) encodes. With `count` (tokens of one
    message's text), messages are first counted from the newest back until they alone exceed the budget: the
    search then only looks after that point, and no encode ever covers more than about a budget's worth of
    text, however long the stored conversation (a 4,001-message conversation once took 1,922 full encodes).
    """
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system) :]
    starts = sorted({0, len(turns) - 1} | {i for i, m in enumerate(turns) if m["role"] == "user"})
    lowest = 0
    if count is not None:
        total = 0
        for i in range(len(turns) - 1, -1, -1):
            if should_stop():
                raise FittingStopped()
            total += count(turns[i]["content"])
            if total > budget:
                lowest = i + 1  # a context starting at i or earlier holds at least these tokens: too many
                break
    candidates = [i for i in starts if i >= lowest] or starts[-1:]

    def attempt(start: int) -> list[int]:
        if should_stop():
            raise FittingStopped()
        return encode(system + turns[start:])

    # First candidate that fits; ids shrink as the start moves later.
    lo, hi, best = 0, len(candidates) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        ids = attempt(candidates[mid])
        if len(ids) <= budget:
            best, hi = (candidates[mid], ids), mid - 1
        else:
            lo = mid + 1
    if best is None:  # the search ended on the last candidate, the newest message alone
        raise PromptTooLong(
            f"The message is too long: the context would be {len(ids):,} tokens but at most {budget:,} fit "
            f"(max_length minus the tokens reserved for the reply). Shorten it or lower max new tokens."
        )
    start, ids = best
    return ids, start


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
