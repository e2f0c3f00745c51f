"""The compiled decode step (gpt-fast's recipe): static shapes, one graph per (batch bucket, KV capacity).

The runner's slot cache already keeps one buffer per layer [slots, kv_heads, capacity, head_dim] with the running
rows in slots 0..n-1. The fast path decodes over a view of the first `b` slots, `b` the batch rounded up to a
bucket (1, 2, 4, 8, 16, ... up to the batch limit; the pad rows decode a dummy token into free slots, whose
contents nobody reads), and attends over the whole capacity with a mask, so every shape in the graph is fixed by
(b, capacity). Capacities are powers of two from 256, so a conversation meets a handful of graphs, not one per
256 positions.

Graphs compile in a background thread on dummy buffers of the same shapes (torch.compile guards on shapes,
strides and dtypes, so the worker's call with the real buffers reuses them), each once the engine has paused
(IDLE_BEFORE_COMPILE_S); until a graph is ready the runner decodes eagerly. Inductor's caches (FX graph, AOT
autograd) live under GLM_CACHE_DIR/inductor, so a restart recompiles from disk. A compile failure turns the fast
path off with the reason on the model card.

Exactness: the compiled step computes the same function as the eager one; masked positions weigh exactly 0 in the
softmax, so attending over the whole capacity changes nothing but the order of float additions.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import torch
import torch.nn.attention
from transformers.cache_utils import Cache

from ..models import cpu_kernels
from ..models.dense_linear import KernelLinear
from ..models.openmp import release_pool
from ..models.precision import Precision
from .compile_yield import Yielder

_LIVE: set[int] = set()  # FastDecode objects whose compile thread has not ended (ids)
_LIVE_LOCK = threading.Lock()
_OPEN: weakref.WeakSet[FastDecode] = weakref.WeakSet()  # every FastDecode, to close at exit

log = logging.getLogger(__name__)


@atexit.register
def _finish_compiles() -> None:
    """At the interpreter's exit, close every compile and wait for its thread. A daemon thread still inside
    inductor when the interpreter tears down aborted the process ("terminate called without an active exception",
    exit status 134): a `serve` stopped, or a script ended, while a graph compiled. A closed compile stops at once
    when it waits, or after the graph it is compiling (tens of seconds at most)."""
    opened = list(_OPEN)
    threads = [fast._thread for fast in opened if fast._thread.is_alive()]
    for fast in opened:
        fast.close()
    if threads:
        log.warning("waiting for %d decode-graph compile(s) to stop before exiting", len(threads))
    for thread in threads:
        thread.join()


MIN_CAPACITY = 256  # the slot cache's own growth step: the smallest graph capacity
# A graph compiles only after the engine has generated nothing for this long: compiling runs Python (dynamo's
# trace, inductor's lowering) that holds the GIL for up to a minute, and a reply decoded meanwhile crawls (BF16
# on 2 cores: 1.2 tok/s instead of 28, measured), so compiles wait for a pause rather than share it.
IDLE_BEFORE_COMPILE_S = 1.0
# A request that comes while a graph compiles: the compile thread gives the cores back (compile_yield.py).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def batch_bucket(n: int, max_batch: int) -> int:
    """Rows the graph decodes for `n` running rows: the next bucket, capped at the batch limit (its own bucket)."""
    return min(next((b for b in BATCH_BUCKETS if b >= n), max_batch), max_batch)


def all_buckets(max_batch: int) -> tuple[int, ...]:
    """Every batch bucket an engine of `max_batch` rows meets."""
    return tuple(sorted({batch_bucket(n, max_batch) for n in range(1, max_batch + 1)}))


def capacity_bucket(positions: int) -> int:
    """KV capacity of the graph that holds `positions` positions: a power of two from MIN_CAPACITY."""
    capacity = MIN_CAPACITY
    while capacity < positions:
        capacity *= 2
    return capacity


def configure_compile_cache(cache_dir: Path, exact: bool = False) -> Path:
    """Put inductor's on-disk caches (FX graph and AOT autograd, kernels) under `cache_dir`/inductor, unless the
    environment already chose a place; `exact`: in `cache_dir` itself, whatever the environment says (bench
    decode's cold cache). Inductor reads the place at each compile.

    Importing `torch._dynamo` (transformers does, loading a model) writes inductor's default, a folder under /tmp,
    into the environment: that value counts as unset here, or the graphs went there and a reboot lost them."""
    import torch._inductor.config as inductor_config
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if exact or not chosen or os.path.abspath(chosen) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir if exact else cache_dir / "inductor")
    folder = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])

    inductor_config.fx_graph_cache = True
    inductor_config.autotune_local_cache = True
    try:
        import torch._functorch.config as functorch_config

        functorch_config.enable_autograd_cache = True
    except (ImportError, AttributeError):
        pass
    return folder


class StaticSlots(Cache):
    """The cache a compiled step sees: per-layer buffers [b, kv_heads, capacity, head_dim]; row r writes its new
    key/value at positions[r] and every layer attends over the whole capacity (the mask hides the rest)."""

    is_compileable = True

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], positions: torch.Tensor):
        super().__init__(layers=[])
        self.keys, self.values, self.positions = keys, values, positions
        self.rows = torch.arange(positions.shape[0], device=positions.device)
        self.capacity = keys[0].shape[2]

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[self.rows, :, self.positions] = key_states[:, :, 0]
        values[self.rows, :, self.positions] = value_states[:, :, 0]
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.capacity - 1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.capacity, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.capacity - 1

    def __len__(self) -> int:
        return len(self.keys)


def decode_step(model, input_ids, positions, mask, keys, values):
    """One token per row over static buffers: input_ids [b, 1], positions [b], mask [b, 1, 1, capacity] (bool,
    True = attend), keys/values per layer [b, kv_heads, capacity, head_dim]. Returns logits [b, vocab]."""
    cache = StaticSlots(keys, values, positions)
    out = model(
        input_ids=input_ids, position_ids=positions[:, None], attention_mask=mask, past_key_values=cache, use_cache=True
    )
    return out.logits[:, -1]


def math_attention():
    """The attention form the compiled step is traced (and run) under. The fused CPU attention kernel is built for
    blocks of queries: for one query over a masked 256-position capacity it took 300 us a layer (SmolLM2 INT4, 17
    of 35 ms a step); the math form lets inductor fuse scores, mask, softmax and weighted sum instead. Entered
    around the compiled call, not inside it: inside, the context manager is a call in the graph that AOT
    autograd's cache refuses, and every restart then redid AOT autograd (10 of a warm compile's 17 s)."""
    return torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH)


GROUPED_SDPA = "sdpa_grouped_decode"


def grouped_decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' `sdpa` attention, except that a decode step's query heads are grouped by their key/value head
    under torch.compile too. transformers groups them ([b, heads, 1, d] -> [b, kv_heads, heads / kv_heads, d], one
    attention over the shared keys, no copy) only outside a compile; inside one it repeats every key and value for
    each query head (`repeat_kv`), and inductor then wrote a [b, heads, capacity, head_dim] copy of the cache per
    layer per step: SmolLM2 INT4, 8 rows over 256 positions, 82.7 ms a compiled step against 66.2 eager, 53.4 with
    the grouping (scripts/probe_compiled_step.py). On a CPU where it measured faster (`cpu_kernels.load_attention`,
    at load), a decode step goes to our attention op instead: SDPA's fused CPU kernel is built for blocks of
    queries, and for one query a row took 90 us a layer at one row and 705 at 16 (SmolLM2 INT4, eager). Prompts
    (several queries) go to transformers' own."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    rows, heads, queries, dim = query.shape
    decode = queries == 1 and (attention_mask is None or attention_mask.shape[1] == 1)
    ours = cpu_kernels.DECODE_ATTENTION
    if (
        decode
        and ours is not None
        and query.device.type == "cpu"
        and dim % 8 == 0
        and key.dtype == query.dtype
        and (attention_mask is None or attention_mask.dtype == torch.bool)
        and (attention_mask is None or tuple(attention_mask.shape) == (rows, 1, 1, key.shape[2]))
    ):
        return ours(query, key, value, attention_mask, dim**-0.5 if scaling is None else scaling), None
    if not decode or groups == 1:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    grouped = query.reshape(rows, heads // groups, groups, dim)
    out = torch.nn.functional.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(rows, heads, 1, dim).transpose(1, 2).contiguous(), None


def group_decode_attention(model) -> None:
    """Route a transformers model's `sdpa` attention through `grouped_decode_attention` (the same function outside
    a compile; registered once with sdpa's mask builder)."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) not in ("sdpa", GROUPED_SDPA):
        return
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS.register(GROUPED_SDPA, grouped_decode_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(GROUPED_SDPA, sdpa_mask)
    model.set_attn_implementation(GROUPED_SDPA)


def step_inputs(tokens: list[int], lengths: list[int], rows: int, capacity: int, device) -> tuple:
    """input_ids, positions and mask for `rows` rows; rows past the running ones decode token 0 at position 0
    (a pad row attends to its position 0 only, so its softmax has a term and no NaN appears)."""
    pad = rows - len(tokens)
    input_ids = torch.tensor(tokens + [0] * pad, dtype=torch.long, device=device)[:, None]
    positions = torch.tensor(lengths + [0] * pad, dtype=torch.long, device=device)
    mask = torch.arange(capacity, device=device)[None, :] <= positions[:, None]
    return input_ids, positions, mask[:, None, None, :]


def routed_experts(config) -> int:
    """Routed experts per MoE layer in a transformers config (0 for a dense model)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("n_routed_experts", "num_local_experts", "num_experts"):
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 0


def compile_plan(mode: str, loaded, max_batch: int) -> tuple[tuple[int, ...], str]:
    """The batch buckets GLM_COMPILE=`mode` compiles for this model (empty: the fast path is off) and a line that
    says what the fast path covers, or why it is off.

    auto: every bucket on CUDA (gpt-fast: CUDA graphs remove the per-kernel launch cost that dominates decode), and
    on CPU where INT4 runs on our kernel: its compiled batched steps measured 1.3-1.9x eager at 4 and 16 streams
    on two CPUs (docs/BENCHMARKS.md, "Every batch size compiled at INT4"), worth a compile per batch size taken
    from the engine's idle time; and so where BF16 runs on our product (`models.dense_linear`): 1.22x eager at 4
    streams, 1.20-1.27x at 16 (AVX-512 BF16, 2 cores; docs/BENCHMARKS.md, "Our dense product"). Other CPU levels:
    batch 1 only; FP32's batched steps compiled measured 1.08x eager at 4 streams and 0.99x at 16 (AVX2), not
    worth another long compile each (INT8's are not measured apart). GLM_COMPILE=on compiles every bucket.
    """
    if mode == "off":
        return (), "off (GLM_COMPILE=off)"
    if not getattr(loaded.model, "batchable", True):
        return (), "off (this model decodes one row at a time)"
    if routed_experts(loaded.model.config):
        # Each step picks its experts from the tokens' router scores: a whole-graph compile cannot trace that.
        return (), "off (a mixture-of-experts model: each step's experts depend on its tokens)"
    every = all_buckets(max_batch), f"compiled steps for batches of up to {max_batch} rows"
    if mode == "on" or loaded.device.type == "cuda":
        return every
    if loaded.precision is Precision.INT4 and cpu_kernels.INT4_MM is not None:
        return every[0], every[1] + " (GLM_COMPILE=auto: INT4 on our CPU kernel, where batched compiled steps gain)"
    if loaded.precision is Precision.BF16 and any(isinstance(m, KernelLinear) for m in loaded.model.modules()):
        return every[0], every[1] + " (GLM_COMPILE=auto: BF16 on our CPU product, where batched compiled steps gain)"
    return (1,), (
        "compiled steps for one row; batched steps decode eagerly (GLM_COMPILE=auto on a CPU at this level, where "
        "each batch size is another long compile for no gain; GLM_COMPILE=on compiles every batch size)"
    )


class FastDecode:
    """The compiled graphs of one model and their state: compiling | ready | failed: reason.

    `try_decode(tokens, slots)` runs a compiled step if the graph for the batch's (bucket, capacity) is ready,
    and otherwise queues that graph for the background thread and returns None (the runner decodes eagerly):
    the worker never compiles.
    """

    def __init__(
        self,
        model,
        device: torch.device,
        max_batch: int,
        capacities: tuple[int, ...] = (MIN_CAPACITY,),
        buckets: tuple[int, ...] | None = None,
        idle=None,
    ):
        self.model, self.device, self.max_batch = model, device, max_batch
        group_decode_attention(model)
        self.idle = idle or (lambda: True)  # whether the engine is generating nothing (compiles wait for that)
        self.buckets = buckets or all_buckets(max_batch)
        self.layout: tuple | None = None  # (layers, kv_heads, head_dim, dtype) of the KV cache, from a probe
        self.state = "compiling"
        self.error: str | None = None
        self.compile_seconds: dict[tuple[int, int], float] = {}
        self.yielder = Yielder(self._engine_busy)  # the compile gives the cores back while the engine has work
        self._ready: set[tuple[int, int]] = set()
        self.steps = 0  # compiled steps run
        self._queue: list[tuple[int, int]] = [(b, c) for c in capacities for b in self.buckets]
        self._queued = set(self._queue)
        self._cond = threading.Condition()
        self._closed = False
        self._compiled = self._compile_fn()
        with _LIVE_LOCK:
            _LIVE.add(id(self))
        self._thread = threading.Thread(target=self._compile_forever, name="glm-compile", daemon=True)
        _OPEN.add(self)
        self._thread.start()

    def _compile_fn(self):
        import torch._dynamo.config as dynamo_config

        # One static graph per (bucket, capacity), all of the same Python function: dynamo must keep every one
        # (its default limit is 8 per function) and never turn the batch or the capacity into a symbol.
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 256)
        dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 1024)
        if hasattr(dynamo_config, "cache_size_limit"):
            dynamo_config.cache_size_limit = max(dynamo_config.cache_size_limit, 256)
        # This engine's graphs are its own (`isolate_recompiles`: another engine's compile of the same function
        # never matches them), so they only ever see this model, and dynamo need not check its thousand-odd
        # modules and parameters on every step: those guards cost 1.3 ms of a 17.6 ms INT4 step here (AVX2,
        # 2 cores; docs/BENCHMARKS.md). The guards on the step's own inputs (ids, mask, cache rows) stay.
        options: dict = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
        if self.device.type == "cuda":
            options["triton.cudagraphs"] = True  # mode="reduce-overhead", which cannot be named beside options
        return torch.compile(  # type: ignore[call-overload]  # (torch's overloads do not list isolate_recompiles)
            decode_step, fullgraph=True, dynamic=False, options=options, isolate_recompiles=True
        )

    # ---- the state the card shows -----------------------------------------------------------------------

    def status(self) -> str:
        return f"failed: {self.error}" if self.state == "failed" else self.state

    def fail(self, reason: str) -> None:
        log.error("decode fast path off: %s", reason)
        with self._cond:
            self.state, self.error = "failed", reason
            self._queue.clear()
            self._cond.notify_all()

    # ---- the worker's side ------------------------------------------------------------------------------

    @torch.inference_mode()
    def try_decode(self, tokens: list[int], slots) -> torch.Tensor | None:
        """Logits [len(tokens), vocab] of one compiled step over the slot cache `slots` (rows 0..n-1, lengths
        `slots.lengths`), or None when no graph is ready for it (then nothing was touched)."""
        if self.state == "failed" or self.layout is None:
            return None
        n = len(tokens)
        if n > self.max_batch or slots.occupied != n:
            return None
        key = (batch_bucket(n, self.max_batch), capacity_bucket(max(slots.capacity, max(slots.lengths) + 1)))
        if key[0] not in self.buckets:  # a batch size this plan leaves eager
            return None
        if key not in self._ready:
            self._request(key)
            return None
        if (slots.num_layers, slots.kv_heads, slots.head_dim, slots.dtype) != self.layout:
            self.fail(
                f"the batch cache {slots.num_layers, slots.kv_heads, slots.head_dim, slots.dtype} differs "
                f"from the compiled one {self.layout}"
            )
            return None
        slots.reserve(key[1], key[0])  # capacities are multiples of the slot cache's step: the buffers get exactly it
        rows, capacity = key
        input_ids, positions, mask = step_inputs(tokens, list(slots.lengths), rows, capacity, self.device)
        try:
            with math_attention():
                logits = self._compiled(
                    self.model,
                    input_ids,
                    positions,
                    mask,
                    [k[:rows] for k in slots.keys],
                    [v[:rows] for v in slots.values],
                )
        except Exception as exc:  # it only wrote this step's positions, which the eager step writes again
            log.exception("the compiled decode step failed; decoding stays eager")
            self.fail(_reason(exc))
            return None
        self.steps += 1
        return logits[:n]

    def _request(self, key: tuple[int, int]) -> None:
        with self._cond:
            if key in self._queued or self.state == "failed":
                return
            self._queued.add(key)
            self._queue.append(key)
            self.state = "compiling"
            self._cond.notify_all()

    def ready_keys(self) -> set[tuple[int, int]]:
        return set(self._ready)

    def wait_ready(self, timeout: float | None = None) -> str:
        """Block until nothing is left to compile or compiling failed (tests, benchmarks); returns the status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self.state == "compiling":
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._cond.wait(left)
        return self.status()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # ---- the background thread --------------------------------------------------------------------------

    def _compile_forever(self) -> None:
        try:
            self._compile_queue()
        finally:
            self._forget_graphs()

    def _forget_graphs(self) -> None:
        """Once this engine is closed: drop the compiled graphs from dynamo's caches when no other engine's are
        live. They hold the model they were traced with, and count against dynamo's process-wide limit of
        compiled graphs (a portal that swaps models, or a test session, would reach it and compile no more)."""
        with _LIVE_LOCK:
            _LIVE.discard(id(self))
            if self._closed and not _LIVE:
                torch._dynamo.reset()

    def _compile_queue(self) -> None:
        try:  # compiling yields the cores to the worker (Linux: nice is per thread, and gcc inherits it)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (AttributeError, OSError):
            pass
        try:
            self.layout = self._probe_layout()
        except Exception as exc:
            self.fail(_reason(exc))
            return
        finally:
            release_pool()
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                key = self._queue[0]
            if not self._wait_for_idle():
                return
            started = time.perf_counter()
            try:
                with self.yielder.compiling():
                    self._warm(key)
            except Exception as exc:  # any compile error: eager serves on, the card says why
                log.exception("compiling the decode step %s failed", key)
                self.fail(_reason(exc))
                return
            finally:
                release_pool()  # this thread's OpenMP workers would slow the worker's every step (see openmp.py)
            with self._cond:
                self.compile_seconds[key] = time.perf_counter() - started
                self._ready.add(key)
                self._queue.pop(0)
                if not self._queue and self.state == "compiling":
                    self.state = "ready"
                self._cond.notify_all()
            log.info("decode graph (batch %d, capacity %d) ready in %.1f s", *key, self.compile_seconds[key])

    def engine_working(self) -> None:
        """Called by the engine's thread at each of its iterations: a compile running now gives it the cores."""
        self.yielder.engine_working()

    def _engine_busy(self) -> bool:
        return not self._closed and not self.idle()

    def _wait_for_idle(self) -> bool:
        """Wait until the engine has been idle for IDLE_BEFORE_COMPILE_S; False when closed meanwhile."""
        quiet_since = None
        while True:
            with self._cond:
                if self._closed:
                    return False
                if self.idle():
                    quiet_since = quiet_since or time.monotonic()
                    if time.monotonic() - quiet_since >= IDLE_BEFORE_COMPILE_S:
                        return True
                else:
                    quiet_since = None
                self._cond.wait(0.1)

    @torch.inference_mode()
    def _probe_layout(self) -> tuple:
        """The KV cache's layout, read from a one-token eager forward (what prefill will hand the slot cache)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        self.model(
            input_ids=torch.zeros(1, 1, dtype=torch.long, device=self.device), past_key_values=cache, use_cache=True
        )
        first: Any = cache.layers[0]  # a DynamicLayer: keys [1, kv_heads, length, head_dim]
        return len(cache.layers), first.keys.shape[1], first.keys.shape[3], first.keys.dtype

    @torch.inference_mode()
    def _warm(self, key: tuple[int, int]) -> None:
        """Compile the graph for `key` by running it on dummy buffers made as the slot cache makes its own
        (ordinary tensors, a [:rows] view): same shapes, strides and kinds, so the worker's call reuses the
        graph. CUDA graphs record on a later call: twice there."""
        rows, capacity = key
        assert self.layout is not None  # probed before any graph is queued
        layers, kv_heads, head_dim, dtype = self.layout
        with torch.inference_mode(False):
            shape = (rows, kv_heads, capacity, head_dim)
            keys = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(layers)]
            values = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(layers)]
        input_ids, positions, mask = step_inputs([0] * rows, [0] * rows, rows, capacity, self.device)
        for _ in range(2 if self.device.type == "cuda" else 1):
            with math_attention():
                self._compiled(
                    self.model, input_ids, positions, mask, [k[:rows] for k in keys], [v[:rows] for v in values]
                )


def _reason(exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def start_fast_path(loaded, max_batch: int, mode: str, cache_dir: Path, idle=None) -> tuple[FastDecode | None, str]:
    """The fast path for an engine, compiling in the background whenever `idle()` (None where it is off), and
    what it covers."""
    buckets, scope = compile_plan(mode, loaded, max_batch)
    log.info("decode fast path: %s", scope)
    if not buckets:
        return None, scope
    configure_compile_cache(cache_dir)
    return FastDecode(loaded.model, loaded.device, max_batch, buckets=buckets, idle=idle), scope
