"""The chat engine: one worker thread owns the model; sessions submit requests and read token events.

One worker keeps the device single-threaded and gives a fair first-come-first-served queue; the per-
conversation KV caches live here (never in a browser session), under a byte budget.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import deque
from typing import Sequence

import torch

from .generation import decode_one, prefill
from .kv_pool import CachedContext, KVCachePool, cache_can_crop
from ..models.loading import LoadedModel
from .sampling import sample_next
from ..protocol import (
    Capabilities, ConversationBusy, EngineClosed, PromptTooLong, Queued, Reply, ReplyStats, Request, SamplingParams,
    Started, Truncated, validate_messages,
)
from .context import common_prefix_length, fit_to_context
from ..settings import load_settings
from ..telemetry.memory import device_memory
from .textstream import IncrementalDecoder

log = logging.getLogger(__name__)

class Engine:
    """The local backend: one model in this process, served by one worker thread."""

    capabilities = Capabilities(local_model=True, kept_cache=True, recompute=True, tokenize=True)

    def __init__(self, loaded: LoadedModel, kv_cache_bytes: int | None = None):
        self.loaded = loaded
        self.spec = loaded.spec
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
                request.emit(Queued(len(self._waiting)))
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

    def card(self) -> dict:
        return {**self.loaded.card(), "backend": "local"}

    def load_report(self) -> dict:
        with self._cond:
            return {"running": int(self._running is not None), "waiting": len(self._waiting), "max_batch": 1}

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
            request.finish(Reply(finish_reason="error", error="the model was unloaded before this request ran"))
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
                    waiting.emit(Queued(position))
            try:
                reply = self._serve(request)
            except Exception as exc:  # the worker must survive anything one request does
                reply = self._failed(request, exc)
            with self._cond:
                self._running = None
                self._active.pop(request.conversation_id, None)
            request.finish(reply)

    def _failed(self, request: Request, exc: Exception) -> Reply:
        partial = request.text_so_far
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
        request.emit(Started())
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
            request.emit(Truncated(dropped, len(ids), budget))

        reused = 0
        if kept is not None and not request.recompute and cache_can_crop(kept.cache):
            # Reuse only what is an exact prefix of the ids a full recompute would see; at least one id is fed.
            # A format whose prompt does not extend causally (ChatGLM-6B) says itself how much stays valid.
            reusable = getattr(loaded.chat_format, "reusable_length", None)
            valid = reusable(kept.tokens, ids) if reusable else common_prefix_length(kept.tokens, ids)
            reused = min(valid, len(ids) - 1)
            if len(kept.tokens) > reused:
                kept.cache.crop(-(len(kept.tokens) - reused))
            cache = kept.cache
        else:
            cache = DynamicCache(config=model.config)
        del kept
        stats.prompt_tokens, stats.reused_tokens, stats.prefill_tokens = len(ids), reused, len(ids) - reused

        if getattr(model, "prefill_whole_prompt", False):  # a prompt that attends in both directions: one forward
            with torch.inference_mode():
                fed = torch.tensor([ids[reused:]], dtype=torch.long, device=device)
                logits = model(input_ids=fed, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
        else:
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
                request.emit_text(delta)
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
            request.emit_text(tail)

        # The cache holds ids, then the generated tokens that were fed back (the last sampled one never is).
        held = cache.get_seq_length() - len(ids)
        text = request.text_so_far
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
