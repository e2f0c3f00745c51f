"""The local backend's scheduler: one worker thread owns the model; sessions submit requests and read events.

The scheduler admits waiting requests first-come-first-served whenever the batch has room, keeps the stop flags
and closing, and between admissions plans one iteration (step_plan.plan_step: which prefilling sequences feed
which chunk within the prefill budget, then one batched decode step over every running sequence) that the runner
carries out (Runner.execute). One worker keeps the device single-threaded; the per-conversation KV caches live
here (never in a browser session), under a byte budget.

Bounded work: the waiting line holds at most `max_waiting` requests, and an owner (a workspace, an API key) has at
most `max_running_per_owner` requests running (one by default) and `max_waiting_per_owner` waiting; past that,
submit raises QueueFull at once.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from typing import TypeVar

import torch

from ..models.loading import LoadedModel
from ..models.openmp import release_pool
from ..protocol import (
    FAILED,
    TOOL_ROLE,
    UNAVAILABLE,
    Capabilities,
    EngineClosed,
    LoadReport,
    MemoryReport,
    ModelCard,
    OutputSpec,
    Queued,
    QueueFull,
    Reply,
    Request,
    SubmitPath,
)
from ..settings import load_settings
from ..telemetry.memory import device_memory
from .constraints import grammar_for
from .device_turns import DeviceTurns
from .fast_decode import start_fast_path
from .kv_pool import KVCachePool
from .runner import OUT_OF_MEMORY, Runner, prompt_encoder, raw_prompt_ids
from .step_plan import plan_step

log = logging.getLogger(__name__)
T = TypeVar("T")


def default_max_batch(device: torch.device) -> int:
    """Rows decoded together when GLM_MAX_BATCH is not set (see docs/BENCHMARKS.md, "Concurrency")."""
    return 64 if device.type == "cuda" else 16


class Engine(SubmitPath):
    """The local backend: one model in this process, served by one worker thread. Requests come in through
    SubmitPath.submit; `recompute=True` feeds the same token ids as a kept cache would, but computes all of them
    from scratch (the baseline that shows what the kept cache saves, and the check that it changes nothing)."""

    closed_reason = "the model was unloaded or replaced just now"

    capabilities = Capabilities(local_model=True, kept_cache=True, recompute=True)  # and LocalWorker

    def __init__(
        self,
        loaded: LoadedModel,
        kv_cache_bytes: int | None = None,
        max_batch: int | None = None,
        compile: str | None = None,
        turns: DeviceTurns | None = None,
    ):
        """`turns`: shared with the other engines of this process (several local models loaded at once), whose
        workers then step one at a time in turn."""
        settings = load_settings()
        self.turns = turns
        self.turn_name = f"{loaded.name} {loaded.precision.label}"
        self.loaded = loaded
        self.spec = loaded.spec
        budget = settings.kv_cache_bytes if kv_cache_bytes is None else kv_cache_bytes
        self.pool = KVCachePool(budget)
        self.max_batch = max_batch or settings.max_batch or default_max_batch(loaded.device)
        self.max_waiting = settings.max_waiting
        self.max_waiting_per_owner = settings.max_waiting_per_owner
        self.max_running_per_owner = settings.max_running_per_owner
        # Fast tokenizers are not thread-safe ("Already borrowed"): every use goes through this lock.
        self._tokenizer_lock = threading.Lock()
        self.runner = Runner(loaded, self.pool, self._tokenizer_lock, self.max_batch, batch_kv_bytes=max(budget, 2**26))
        self._cond = threading.Condition()
        self._door = self._cond  # SubmitPath's lock: the worker's own
        self._waiting: deque[Request] = deque()
        self._active: dict[str, Request] = {}
        self._owners: dict[int, str] = {}  # request id -> owner, for requests that have one
        self._running_owners: Counter[str] = Counter()
        self._told: dict[int, tuple[int, int]] = {}  # request id -> (position last told, halving updates sent)
        self._tasks: deque[tuple[Callable, Future]] = deque()
        self._running = 0
        self._closed = False
        # The compiled decode path compiles in its own thread while the engine is idle; the worker decodes eagerly
        # until a graph is ready.
        self.fast, self.fast_path_scope = (
            start_fast_path(loaded, self.max_batch, compile or settings.compile, settings.cache_dir, self._idle)
            if self.runner.batched
            else (None, "off (this model decodes one row at a time)")
        )
        self.runner.fast = self.fast
        self._worker = threading.Thread(target=self._serve_forever, name="glm-engine", daemon=True)
        self._worker.start()

    # ---- the Backend surface -----------------------------------------------------------------------------

    def _accept(self, request: Request) -> None:
        """What this model's format cannot do is refused; the grammar an output spec asks for is compiled here."""
        chat_format = self.loaded.chat_format
        uses_tools = request.output.tools or any(
            m["role"] == TOOL_ROLE or m.get("tool_calls") for m in request.messages
        )
        if uses_tools and getattr(chat_format, "tool_syntax", None) is None:
            raise ValueError(f"this model's format ({chat_format.name}) was not trained for tool calls")
        request.grammar = grammar_for(request.output, chat_format)

    def _enqueue(self, request: Request, owner: str | None) -> None:
        """Into the waiting line: `owner` (a workspace or an API key) bounds one person's share, a few waiting
        (`max_running_per_owner` running is the admission's)."""
        if len(self._waiting) >= self.max_waiting:
            raise QueueFull(f"the model is busy: {len(self._waiting)} requests are waiting; try again shortly")
        if owner is not None:
            waiting = sum(1 for r in self._waiting if self._owners.get(r.id) == owner)
            if waiting >= self.max_waiting_per_owner:
                raise QueueFull(f"you already have {waiting} request(s) waiting; try again when they have started")
            self._owners[request.id] = owner
        self._waiting.append(request)
        position = len(self._waiting) - max(self.max_batch - self._running, 0)
        if position > 0:  # the batch has no room for it now: it waits its turn
            self._told[request.id] = (position, 0)
            request.emit(Queued(position))
        self._cond.notify_all()

    def run_on_worker(self, task: Callable[[LoadedModel], T], timeout: float | None = None) -> T:
        """Run `task(loaded)` on the worker thread between two iterations (e.g. an embedding forward), so the
        model is only ever used by one thread; returns its result or raises its exception."""
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise EngineClosed("the model was unloaded or replaced just now")
            self._tasks.append((task, future))
            self._cond.notify_all()
        return future.result(timeout)

    @contextmanager
    def owner_share(self, owner: str | None):
        """Work outside the batch (an embeddings request) counted as one of `owner`'s running requests while it
        lasts: past the owner's share it is refused (QueueFull), and the owner's replies wait behind it."""
        if owner is None:
            yield
            return
        with self._cond:
            if self._running_owners[owner] >= self.max_running_per_owner:
                raise QueueFull("you already have as many requests running as you may; try again when one has ended")
            self._running_owners[owner] += 1
        try:
            yield
        finally:
            with self._cond:
                self._running_owners[owner] -= 1
                if not self._running_owners[owner]:
                    del self._running_owners[owner]
                self._cond.notify_all()

    def count_tokens(self, text: str) -> int:
        with self._tokenizer_lock:
            return len(self.loaded.tokenizer(text, add_special_tokens=False)["input_ids"])

    @property
    def tool_syntax(self):
        """How this model writes tool calls (models.tool_formats), or None where it was not trained for them."""
        return getattr(self.loaded.chat_format, "tool_syntax", None)

    def encode_chat(
        self, messages: Sequence[dict], output: OutputSpec | None = None, thinking: bool | None = None
    ) -> list[int]:
        """The ids the runner would feed for these messages (its prompt_encoder); given back to submit as
        `prompt_ids`, the runner feeds them without tokenizing the prompt again."""
        output = output or OutputSpec()
        with self._tokenizer_lock:
            if output.raw_prompt:
                return raw_prompt_ids(self.loaded, list(messages))
            return list(prompt_encoder(self.loaded, output, thinking)(list(messages)))

    def tokenize(self, text: str) -> list[int]:
        """Token ids of plain text, no special tokens (the API's /tokenize and embeddings)."""
        with self._tokenizer_lock:
            return list(self.loaded.tokenizer(text, add_special_tokens=False)["input_ids"])

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """The vocabulary's piece for each id (the API's /tokenize)."""
        with self._tokenizer_lock:
            return list(self.loaded.tokenizer.convert_ids_to_tokens(list(ids)))

    def token_texts(self, ids: Sequence[int]) -> list[str]:
        """Each id decoded alone, as the engine's logprobs show tokens (the API's echoed prompt logprobs)."""
        with self._tokenizer_lock:
            return [self.loaded.tokenizer.decode([int(i)]) for i in ids]

    def forget(self, conversation_id: str) -> None:
        """Free a conversation's kept cache (new conversation, clear, deleted)."""
        self.pool.drop(conversation_id)

    def card(self) -> ModelCard:
        return replace(
            self.loaded.card(),
            backend="local",
            max_batch=self.max_batch,
            batched_decode=self.runner.batched,
            fast_path=self.fast.status() if self.fast is not None else "off",
            fast_path_scope=self.fast_path_scope,
        )

    def memory_report(self) -> MemoryReport:
        """Device memory (CUDA allocator or process RSS), the kept KV caches and the running batch's cache."""
        usage = self.pool.usage()
        return MemoryReport(
            **device_memory(self.loaded.device),
            kv_cache_bytes=usage["bytes"],
            kv_cache_conversations=usage["conversations"],
            kv_cache_budget_bytes=usage["budget_bytes"],
            batch_kv_bytes=self.runner.slot_bytes(),
        )

    def _idle(self) -> bool:
        """Nothing running, waiting or queued for the worker (when the fast path may compile)."""
        return not self._running and not self._waiting and not self._tasks

    def load_report(self) -> LoadReport:
        """Running sequences, waiting requests, the batch limit and the tokens decoded so far."""
        with self._cond:
            return LoadReport(
                running=self._running,
                waiting=len(self._waiting),
                max_batch=self.max_batch,
                decoded_tokens=self.runner.timing.rows,
            )

    def close(self) -> None:
        """Stop the worker, end queued and running requests, free the caches. The model is the loader's to free."""
        with self._cond:
            self._closed = True
            pending = list(self._waiting)
            self._waiting.clear()
            self._cond.notify_all()
        for request in pending:
            request.finish(
                Reply(
                    finish_reason="error",
                    error="the model was unloaded before this request ran",
                    error_kind=UNAVAILABLE,
                )
            )
        for _task, future in self._tasks:
            future.cancel()
        self._worker.join(timeout=60)
        if self.fast is not None:
            self.fast.close()
        self.pool.clear()
        gc.collect()

    # ---- worker ------------------------------------------------------------------------------------------

    def _serve_forever(self) -> None:
        runner = self.runner
        while True:
            with self._cond:
                while not self._tasks and runner.idle() and not self._closed and not self._admissible():
                    # Idle: give back this thread's OpenMP workers, or another engine's worker (Compare mode,
                    # a second model) would run every parallel region without spinning helpers (openmp.py).
                    release_pool()
                    self._cond.wait()
                if self._closed:
                    break
                tasks = list(self._tasks)
                self._tasks.clear()
                admitted = self._admit()
            if self.fast is not None:
                self.fast.engine_working()
            with self.turns.turn(self.turn_name) if self.turns is not None else nullcontext():
                ended = self._iteration(tasks, admitted)
            self._end(ended)
        self._end(runner.close())

    def _iteration(self, tasks, admitted: list[Request]) -> list[tuple[Request, Reply]]:
        """One turn of the worker on the device: queued tasks, the admitted requests' start, one batched step."""
        runner = self.runner
        for task, future in tasks:
            self._run_task(task, future)
        ended = []
        for request in admitted:
            reply = runner.start(request)
            if reply is not None:
                ended.append((request, reply))
        try:
            plan = plan_step(runner.prefilling, runner.decoding, runner.prefill_budget, runner.whole_prompt)
            ended += runner.execute(plan)
        except Exception as exc:  # the worker must survive anything one iteration does
            log.exception("engine iteration failed")
            oom = isinstance(exc, torch.OutOfMemoryError)
            message, kind = (OUT_OF_MEMORY, UNAVAILABLE) if oom else (f"generation failed: {exc}", FAILED)
            ended += [
                (request, Reply(text=request.text_so_far, finish_reason="error", error=message, error_kind=kind))
                for request, _ in runner.close()
            ]
            runner.free_memory()
        return ended

    def _admissible(self) -> bool:
        """A waiting request could start now (its owner, if any, is under its share). Called with the lock held."""
        return any(not self._owner_at_share(request) for request in self._waiting)

    def _owner_at_share(self, request: Request) -> bool:
        """The request's owner already runs as many requests as it may. Called with the lock held."""
        owner = self._owners.get(request.id)
        return bool(owner) and self._running_owners[owner or ""] >= self.max_running_per_owner

    def _admit(self) -> list[Request]:
        """Waiting requests that start now: first come first served while the batch has room, skipping those
        whose owner already has one running (they keep their place). Called with the lock held."""
        admitted: list[Request] = []
        kept: deque[Request] = deque()
        while self._waiting:
            request = self._waiting.popleft()
            if self.runner.running + len(admitted) >= self.max_batch or self._owner_at_share(request):
                kept.append(request)
                continue
            owner = self._owners.get(request.id)
            if owner:
                self._running_owners[owner] += 1
            admitted.append(request)
        self._waiting = kept
        self._running = self.runner.running + len(admitted)
        for request in admitted:
            self._told.pop(request.id, None)
        if admitted:  # everyone behind moved up
            self._tell_positions()
        return admitted

    def _tell_positions(self) -> None:
        """Tell waiting requests their new place, but not at every move: when it has halved since they were last
        told (twice at most) and when they are next. At most four events per request, so a long line costs
        events linear in its length (200 requests once cost 19,900 events)."""
        for position, request in enumerate(self._waiting, start=1):
            told, updates = self._told.get(request.id, (0, 0))
            if position == told:
                continue
            if not told or position == 1 or (updates < 2 and position <= told // 2):
                self._told[request.id] = (position, updates + (told and position != 1))
                request.emit(Queued(position))

    def _run_task(self, task, future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            with torch.inference_mode():
                future.set_result(task(self.loaded))
        except BaseException as exc:  # handed to the caller
            future.set_exception(exc)

    def _end(self, ended: list[tuple[Request, Reply]]) -> None:
        with self._cond:
            for request, _ in ended:
                self._active.pop(request.conversation_id, None)
                owner = self._owners.pop(request.id, None)
                if owner:
                    self._running_owners[owner] -= 1
                    if not self._running_owners[owner]:
                        del self._running_owners[owner]
            self._running = self.runner.running
        for request, reply in ended:
            request.finish(reply)
