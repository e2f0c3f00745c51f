"""The chat engine: one worker thread owns the model; sessions submit requests and read token events.

One worker keeps the device single-threaded and gives a fair first-come-first-served queue; the per-
conversation KV caches live here (never in a browser session), under a byte budget.
"""

from __future__ import annotations

import gc
import itertools
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from .generation import decode_one, prefill
from .kv_pool import CachedContext, KVCachePool, cache_can_crop
from .loading import LoadedModel
from .sampling import SamplingParams, sample_next
from .settings import load_settings
from .telemetry import device_memory
from .textstream import IncrementalDecoder

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")


class PromptTooLong(ValueError):
    """The newest message alone does not fit the token limit."""


class ConversationBusy(RuntimeError):
    """A reply for this conversation is still being generated."""


class EngineClosed(RuntimeError):
    """The model was unloaded or replaced after the page took the engine and before it submitted."""


# ---- events a request emits, in order: Queued*, Started, Truncated?, Delta*, Finished ----------------------


@dataclass
class Queued:
    position: int  # 1 = next after the request running now


@dataclass
class Started:
    pass


@dataclass
class Truncated:
    dropped_messages: int
    context_tokens: int
    limit_tokens: int

    def describe(self) -> str:
        return (
            f"The conversation no longer fits {self.limit_tokens:,} tokens, so its {self.dropped_messages} oldest "
            f"message(s) were left out of the model's context (they stay in the history)."
        )


@dataclass
class Delta:
    text: str


@dataclass
class ReplyStats:
    prompt_tokens: int = 0  # tokens of the whole context the reply was conditioned on
    reused_tokens: int = 0  # of those, taken from the kept KV cache
    prefill_tokens: int = 0  # of those, computed in this turn
    completion_tokens: int = 0
    queue_s: float = 0.0
    ttft_s: float = 0.0  # from the start of processing to the first sampled token
    decode_tokens_per_s: float = 0.0  # after the first token
    total_s: float = 0.0


@dataclass
class Reply:
    text: str = ""
    finish_reason: str = ""  # "eos", "length", "stopped" or "error"
    stats: ReplyStats = field(default_factory=ReplyStats)
    dropped_messages: int = 0
    error: str | None = None

    @property
    def stopped(self) -> bool:
        return self.finish_reason == "stopped"


@dataclass
class Finished:
    reply: Reply


Event = Queued | Started | Truncated | Delta | Finished


class Request:
    _ids = itertools.count(1)

    def __init__(self, conversation_id: str, messages: list[dict], params: SamplingParams, recompute: bool = False):
        self.id = next(self._ids)
        self.conversation_id = conversation_id
        self.messages = messages
        self.params = params
        self.recompute = recompute
        self.submitted_at = time.perf_counter()
        self.reply: Reply | None = None
        self._pieces: list[str] = []  # the reply's text so far, kept for a reply that fails half-way
        self._events: queue.Queue[Event] = queue.Queue()
        self._stop = threading.Event()
        self._done = threading.Event()

    def stop(self) -> None:
        """Ask the worker to stop after the current token; the partial reply is kept and marked stopped."""
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> Reply | None:
        self._done.wait(timeout)
        return self.reply

    def events(self) -> Iterator[Event]:
        """Every event until (and including) Finished."""
        while True:
            event = self._events.get()
            yield event
            if isinstance(event, Finished):
                return

    def _coalesced_events(self) -> Iterator[Event]:
        """Like events(), but deltas already waiting are joined into one: a slow reader (a browser redrawing
        Markdown) then costs one redraw per read instead of one per token, and never slows the worker."""
        pending: list[str] = []
        while True:
            event = self._events.get() if not pending else self._get_nowait()
            if isinstance(event, Delta):
                pending.append(event.text)
                continue
            if pending:
                yield Delta("".join(pending))
                pending = []
            if event is None:
                continue
            yield event
            if isinstance(event, Finished):
                return

    def _get_nowait(self) -> Event | None:
        try:
            return self._events.get_nowait()
        except queue.Empty:
            return None

    def text_stream(self, on_event: Callable[[Event], None] | None = None) -> Iterator[str]:
        """Only the text deltas (for st.write_stream); other events go to `on_event`.

        Closing the generator early (the page was stopped) stops the request.
        """
        try:
            for event in self._coalesced_events():
                if isinstance(event, Delta):
                    yield event.text
                elif on_event is not None:
                    on_event(event)
        finally:
            if not self.done:
                self.stop()

    def _emit(self, event: Event) -> None:
        self._events.put(event)

    def _finish(self, reply: Reply) -> None:
        self.reply = reply
        self._done.set()
        self._emit(Finished(reply))


def validate_messages(messages: Sequence[dict]) -> list[dict]:
    clean = []
    for m in messages:
        role, content = m.get("role"), m.get("content")
        if role not in ROLES or not isinstance(content, str):
            raise ValueError(f"each message needs a role among {ROLES} and text content, got {m!r:.80}")
        clean.append({"role": role, "content": content})
    if not clean or clean[-1]["role"] != "user":
        raise ValueError("the conversation must end with a user message")
    if not clean[-1]["content"].strip():
        raise ValueError("the message is empty")
    return clean


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


class Engine:
    def __init__(self, loaded: LoadedModel, kv_cache_bytes: int | None = None):
        self.loaded = loaded
        self.pool = KVCachePool(load_settings().kv_cache_bytes if kv_cache_bytes is None else kv_cache_bytes)
        # Fast tokenizers are not thread-safe ("Already borrowed"): every use goes through this lock.
        self._tokenizer_lock = threading.Lock()
        self._cond = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._running: Request | None = None
        self._active: dict[str, Request] = {}
        self._closed = False
        self._worker = threading.Thread(target=self._serve_forever, name="glm-engine", daemon=True)
        self._worker.start()

    # ---- public surface ----------------------------------------------------------------------------------

    def submit(
        self,
        conversation_id: str,
        messages: Sequence[dict],
        params: SamplingParams | None = None,
        recompute: bool = False,
    ) -> Request:
        """Queue a reply to `messages` (the whole conversation, ending with the new user message).

        `recompute=True` feeds the same token ids as a kept cache would, but computes all of them from scratch:
        the baseline that shows what the kept cache saves, and the check that it changes nothing.
        """
        params = (params or SamplingParams()).validate()
        request = Request(conversation_id, validate_messages(messages), params, recompute)
        with self._cond:
            if self._closed:
                raise EngineClosed("the model was unloaded or replaced just now")
            if conversation_id in self._active:
                raise ConversationBusy("a reply for this conversation is still being generated")
            self._active[conversation_id] = request
            self._waiting.append(request)
            if self._running is not None or len(self._waiting) > 1:
                request._emit(Queued(len(self._waiting)))
            self._cond.notify_all()
        return request

    def count_tokens(self, text: str) -> int:
        with self._tokenizer_lock:
            return len(self.loaded.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_chat(self, messages: Sequence[dict]) -> list[int]:
        with self._tokenizer_lock:
            return self.loaded.chat_format.encode(list(messages))

    def forget(self, conversation_id: str) -> None:
        """Free a conversation's kept cache (new conversation, clear, deleted)."""
        self.pool.drop(conversation_id)

    def memory_report(self) -> dict:
        """Device memory (CUDA allocator or process RSS) and what the kept KV caches hold."""
        usage = self.pool.usage()
        return {
            **device_memory(self.loaded.device),
            "kv_cache_bytes": usage["bytes"],
            "kv_cache_conversations": usage["conversations"],
            "kv_cache_budget_bytes": usage["budget_bytes"],
        }

    def queue_length(self) -> int:
        with self._cond:
            return len(self._waiting) + (self._running is not None)

    def close(self) -> None:
        """Stop the worker, end queued requests, free the caches. The model itself is the loader's to release."""
        with self._cond:
            self._closed = True
            pending = list(self._waiting)
            self._waiting.clear()
            if self._running is not None:
                self._running.stop()
            self._cond.notify_all()
        for request in pending:
            request._finish(Reply(finish_reason="error", error="the model was unloaded before this request ran"))
        self._worker.join(timeout=30)
        self.pool.clear()
        gc.collect()

    # ---- worker ------------------------------------------------------------------------------------------

    def _serve_forever(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                request = self._waiting.popleft()
                self._running = request
                for position, waiting in enumerate(self._waiting, start=1):
                    waiting._emit(Queued(position))
            try:
                reply = self._serve(request)
            except Exception as exc:  # the worker must survive anything one request does
                reply = self._failed(request, exc)
            with self._cond:
                self._running = None
                self._active.pop(request.conversation_id, None)
            request._finish(reply)

    def _failed(self, request: Request, exc: Exception) -> Reply:
        partial = "".join(request._pieces)
        self.pool.drop(request.conversation_id)
        if isinstance(exc, torch.OutOfMemoryError):
            self.pool.clear()
            gc.collect()
            if self.loaded.device.type == "cuda":
                torch.cuda.empty_cache()
            message = "out of memory while generating; kept caches were freed, try again or start a new conversation"
        elif isinstance(exc, PromptTooLong):
            message = str(exc)
        else:
            log.exception("generation failed")
            message = f"generation failed: {type(exc).__name__}: {exc}"
        return Reply(text=partial, finish_reason="error", error=message)

    def _continued_ids(self, kept: CachedContext | None, messages: list[dict], budget: int) -> list[int] | None:
        """Ids that continue the kept conversation token for token, if this request continues it exactly."""
        continuation = getattr(self.loaded.chat_format, "continuation", None)
        if kept is None or continuation is None or kept.messages != messages[:-1]:
            return None
        ids = kept.tokens + kept.unfed + continuation(messages)
        return ids if len(ids) <= budget else None  # too long: fall back to dropping the oldest turns

    def _serve(self, request: Request) -> Reply:
        from transformers import DynamicCache

        params = request.params
        loaded = self.loaded
        model, device = loaded.model, loaded.device
        stats = ReplyStats(queue_s=time.perf_counter() - request.submitted_at)
        request._emit(Started())
        if request.stop_requested:
            return Reply(finish_reason="stopped", stats=stats)

        started = time.perf_counter()
        max_length = min(params.max_length, loaded.max_context)
        budget = max_length - params.max_new_tokens
        if budget < 1:
            raise PromptTooLong(f"max new tokens ({params.max_new_tokens}) leaves no room in {max_length} tokens")
        kept = self.pool.take(request.conversation_id)
        with self._tokenizer_lock:
            ids = self._continued_ids(kept, request.messages, budget)
            dropped = 0
            if ids is None:
                ids, dropped = fit_to_context(loaded.chat_format.encode, request.messages, budget)
        if dropped:
            request._emit(Truncated(dropped, len(ids), budget))

        reused = 0
        if kept is not None and not request.recompute and cache_can_crop(kept.cache):
            # Reuse only what is an exact prefix of the ids a full recompute would see; at least one id is fed.
            reused = min(common_prefix_length(kept.tokens, ids), len(ids) - 1)
            if len(kept.tokens) > reused:
                kept.cache.crop(-(len(kept.tokens) - reused))
            cache = kept.cache
        else:
            cache = DynamicCache(config=model.config)
        del kept
        stats.prompt_tokens, stats.reused_tokens, stats.prefill_tokens = len(ids), reused, len(ids) - reused

        logits = prefill(model, ids[reused:], cache, device, lambda: request.stop_requested)
        if logits is None:  # stopped during a long prefill: the partial cache is not worth keeping
            stats.total_s = time.perf_counter() - started
            return Reply(finish_reason="stopped", stats=stats, dropped_messages=dropped)

        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=logits.device).manual_seed(params.seed)
        penalize = params.repetition_penalty != 1.0
        seen = torch.tensor(ids, dtype=torch.long, device=logits.device) if penalize else None
        limit = min(params.max_new_tokens, max_length - len(ids))
        stop_ids = loaded.chat_format.stop_token_ids
        decoder = IncrementalDecoder(loaded.tokenizer)
        generated: list[int] = []
        pieces = request._pieces
        text_started = False
        first_token_at = last_token_at = None
        finish = "length"
        while True:
            token = sample_next(logits, params, seen, generator)
            last_token_at = time.perf_counter()
            if first_token_at is None:
                first_token_at = last_token_at
            if token in stop_ids:
                finish = "eos"
                break
            generated.append(token)
            with self._tokenizer_lock:
                delta = decoder.push(token)
            if not text_started:
                # Replies never start with whitespace worth keeping; ChatGLM3 even opens with an empty metadata line.
                delta = delta.lstrip()
                text_started = bool(delta)
            if delta:
                pieces.append(delta)
                request._emit(Delta(delta))
            if len(generated) >= limit:
                break
            if request.stop_requested:
                finish = "stopped"
                break
            if penalize:
                seen = torch.cat([seen, seen.new_tensor([token])])
            logits = decode_one(model, token, cache, device)
        with self._tokenizer_lock:
            tail = decoder.flush()
        if not text_started:
            tail = tail.lstrip()
        if tail:
            pieces.append(tail)
            request._emit(Delta(tail))

        # The cache holds ids, then the generated tokens that were fed back (the last sampled one never is).
        held = cache.get_seq_length() - len(ids)
        text = "".join(pieces)
        conversation = request.messages + [{"role": "assistant", "content": text}]
        self.pool.put(
            request.conversation_id,
            CachedContext(ids + generated[:held], cache, messages=conversation, unfed=generated[held:]),
        )

        stats.completion_tokens = len(generated)
        stats.ttft_s = first_token_at - started
        if len(generated) > 1 and last_token_at > first_token_at:
            stats.decode_tokens_per_s = (len(generated) - 1) / (last_token_at - first_token_at)
        stats.total_s = time.perf_counter() - started
        return Reply(text=text, finish_reason=finish, stats=stats, dropped_messages=dropped)
