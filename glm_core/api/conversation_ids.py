"""Which engine conversation a stateless request continues, so its kept KV cache is reused.

API clients resend the whole history every turn and name no conversation, while the engine keeps one KV cache
per conversation id and reuses the longest common token prefix of that cache and the new request. So after a
reply, the conversation as the client now has it (its messages and the reply, as sent) is remembered under a
digest of (the caller's scope, those messages), pointing to the engine conversation that holds its cache; so is
the request itself (its messages without the reply). A new request looks up the digests of its own message
prefixes, longest first, its whole list included: turn 10 of a chat finds turn 9's conversation and prefills only
the new message; the same request again (a retry, a regenerate, a benchmark's repeat) finds the conversation that
answered it, and the engine crops the cache back to the prompt and samples from the logits it kept there, so
nothing is prefilled and the first token's distribution is the first time's, bit for bit; an edited turn finds
an earlier state and the engine crops the cache back to the common prefix. A conversation already generating is
not shared: a concurrent request with the same history gets a fresh id (and a fresh cache).

Digests include the caller's scope (the API key's id): one key never reuses, or learns anything about, another
key's conversations. The map is bounded (least recently used first out); an engine conversation no entry points
to any more is forgotten, so its cache is freed instead of waiting for the pool's own eviction.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence


def prefix_digests(scope: str, messages: Sequence[dict]) -> list[bytes]:
    """digests[k] names (scope, messages[:k + 1]); one pass, so a long history costs O(its length)."""
    running = hashlib.sha256(json.dumps(scope).encode("utf-8"))
    digests = []
    for m in messages:
        running.update(json.dumps([m["role"], m["content"]], ensure_ascii=False).encode("utf-8"))
        digests.append(running.copy().digest())
    return digests


class StatelessConversations:
    def __init__(self, forget: Callable[[str], None], capacity: int = 4096):
        self._forget = forget
        self._capacity = capacity
        self._by_digest: OrderedDict[bytes, str] = OrderedDict()
        self._references: Counter[str] = Counter()
        self._busy: set[str] = set()
        self._lock = threading.Lock()

    def claim(self, scope: str, messages: Sequence[dict], fresh: bool = False) -> str:
        """The conversation id to submit `messages` (ending with the new user message) under; call release()
        when the reply has ended. `fresh`: a new conversation, whatever is remembered."""
        digests = [] if fresh else prefix_digests(scope, messages)
        with self._lock:
            for digest in reversed(digests):
                conversation_id = self._by_digest.get(digest)
                if conversation_id is not None and conversation_id not in self._busy:
                    self._by_digest.move_to_end(digest)
                    self._busy.add(conversation_id)
                    return conversation_id
            conversation_id = "api-" + secrets.token_urlsafe(12)
            self._busy.add(conversation_id)
            return conversation_id

    def release(self, scope: str, conversation_id: str, conversation: Sequence[dict] | None) -> None:
        """The reply ended. `conversation` (the request's messages and the reply as the client received it) is
        what a next turn will resend; None when the reply failed and nothing should be remembered."""
        forget = []
        with self._lock:
            self._busy.discard(conversation_id)
            # The conversation with its reply (what a next turn resends) and the request alone (what a repeat sends)
            for digest in prefix_digests(scope, conversation)[-2:] if conversation else ():
                previous = self._by_digest.get(digest)
                self._by_digest[digest] = conversation_id
                self._by_digest.move_to_end(digest)
                self._references[conversation_id] += 1
                if previous is not None:  # the same history answered again: the newest cache wins
                    self._references[previous] -= 1
                    forget += self._unreferenced(previous)
            while len(self._by_digest) > self._capacity:
                _, evicted = self._by_digest.popitem(last=False)
                self._references[evicted] -= 1
                forget += self._unreferenced(evicted)
            forget += self._unreferenced(conversation_id)
        for conversation_id in forget:
            self._forget(conversation_id)

    def _unreferenced(self, conversation_id: str) -> list[str]:
        if self._references[conversation_id] > 0 or conversation_id in self._busy:
            return []
        del self._references[conversation_id]
        return [conversation_id]

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_digest)
