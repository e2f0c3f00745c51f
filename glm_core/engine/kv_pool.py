"""Kept KV caches, one per conversation, under a byte budget with least-recently-used eviction.

The engine's worker is the only thread that runs the model on these caches; the lock guards the bookkeeping
against pages that drop a conversation or read the usage figures.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


def cache_nbytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
    return total


def cache_can_crop(cache) -> bool:
    """Only full-attention layers keep every past position, so only they can be cut back to a prefix."""
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", []))


def copy_prefix(cache, length: int, config) -> Any:
    """A new cache holding a copy of `cache`'s first `length` positions (every layer a full-attention one)."""
    from transformers import DynamicCache

    copy = DynamicCache(config=config)
    for index, layer in enumerate(cache.layers):
        copy.update(layer.keys.narrow(-2, 0, length), layer.values.narrow(-2, 0, length), index)  # cat: a copy
    return copy


@dataclass
class CachedContext:
    tokens: list[int]  # exactly the ids whose keys/values `cache` holds, in order
    cache: Any  # a transformers Cache
    # The conversation these ids encode, the reply included, and the reply's generated tokens that were sampled
    # but never fed back (the last one after a stop or the length limit). A request that continues exactly this
    # conversation appends only its new turn after `tokens + unfed`, as the original ChatGLM stream_chat did.
    messages: list[dict] | None = None
    unfed: list[int] = field(default_factory=list)
    # The logits that followed the prompt (its first `prompt_length` ids): the same prompt again (a repeated or
    # regenerated request) samples its first token from them and prefills nothing, with the bits a prefill gave.
    prompt_length: int = 0
    prompt_logits: Any = None
    owner: str | None = None  # whose conversation it is: only the same owner's new conversations start from it

    @property
    def nbytes(self) -> int:
        logits = self.prompt_logits
        return cache_nbytes(self.cache) + (logits.numel() * logits.element_size() if logits is not None else 0)


class KVCachePool:
    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[str, CachedContext] = OrderedDict()
        self._lock = threading.Lock()
        self.evictions = 0

    def take(self, conversation_id: str) -> CachedContext | None:
        """Remove and return the conversation's cache (the caller gives it back with put)."""
        with self._lock:
            return self._entries.pop(conversation_id, None)

    def put(self, conversation_id: str, context: CachedContext) -> list[str]:
        """Keep `context` as the most recently used; evict the least recently used past the budget.

        Returns the evicted conversation ids. A single context larger than the whole budget is not kept.
        """
        evicted = []
        with self._lock:
            self._entries[conversation_id] = context
            self._entries.move_to_end(conversation_id)
            total = sum(c.nbytes for c in self._entries.values())
            while self._entries and total > self.budget_bytes:
                victim, dropped = self._entries.popitem(last=False)
                total -= dropped.nbytes
                evicted.append(victim)
            self.evictions += len(evicted)
        return evicted

    def longest_prefix(
        self, ids: Sequence[int], owner: str | None, reusable: Callable[[Sequence[int], Sequence[int]], int]
    ) -> tuple[CachedContext, int] | None:
        """The kept context of `owner`'s whose ids share the longest reusable prefix with `ids`, and that length;
        None when none shares any. The context stays kept (copy what is used of it)."""
        best, longest = None, 0
        with self._lock:
            for context in self._entries.values():
                if context.owner != owner or not context.tokens or context.tokens[0] != ids[0]:
                    continue
                length = reusable(context.tokens, ids)
                if length > longest:
                    best, longest = context, length
        return (best, longest) if best is not None else None

    def drop(self, conversation_id: str) -> bool:
        with self._lock:
            return self._entries.pop(conversation_id, None) is not None

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def tokens(self, conversation_id: str) -> list[int] | None:
        """The ids a conversation's kept cache holds (a copy), or None if it has none."""
        with self._lock:
            entry = self._entries.get(conversation_id)
            return list(entry.tokens) if entry is not None else None

    def __contains__(self, conversation_id: str) -> bool:
        with self._lock:
            return conversation_id in self._entries

    def usage(self) -> dict:
        with self._lock:
            return {
                "conversations": len(self._entries),
                "bytes": sum(c.nbytes for c in self._entries.values()),
                "tokens": sum(len(c.tokens) for c in self._entries.values()),
                "budget_bytes": self.budget_bytes,
                "evictions": self.evictions,
            }
