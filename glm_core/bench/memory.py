"""`bench memory`: per precision level, the memory held while encoding N tokens and while generating M tokens,
next to the estimator's prediction and the published figures. The Quantization page runs the same code.

Each level runs in a fresh process of its own (so each peak is that level's alone), at low CPU priority (so the
chats of the portal keep their share of the CPU), and can be cancelled by killing that process. The process
prints JSON lines: progress events, then one result.

Phases of one level, each with its own peak (the peak is reset between them):
1. load: a model folder with its real weights, or a preset / config.json with random weights made module by
   module (quantized as they are made, as the loader quantizes while reading);
2. encode: N random token ids through the engine's chunked prefill, then the first token (time to first token);
3. generate: the KV cache is filled to M - DECODE_STEPS positions with random keys and values (memory depends on
   shapes, not values; computing them would take hours on a CPU), then DECODE_STEPS tokens are decoded for real:
   the peak and the decode speed at a context of M tokens;
4. perplexity on glm_core/data/eval_text.txt, where the weights are real.
"""

from __future__ import annotations

import json
import os
import platform
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC
from pathlib import Path
from typing import ClassVar

import torch

from ..models.checkpoint import build_computed_buffers
from ..models.loading import fix_output_layer_input
from ..models.precision import Precision, parse_precision, resolve_device
from ..models.quant import tie_output_layer
from ..settings import DEFAULT_GROUP_SIZE, EMBEDDED, PROJECT_ROOT, load_settings
from ..telemetry.memory import trim_c_heap
from .estimator import PRESETS, ConfigError, estimate, model_config, published, read_config

DECODE_STEPS = 16
LEVELS = [p.value for p in Precision]
# A level that runs longer is killed and reported (a 6B model at 8192 tokens takes minutes per level on a CPU).
LEVEL_TIME_LIMIT_S = 30 * 60
STDERR_KEPT_BYTES = 64 * 1024  # the tail of a child's stderr kept for its error line; the rest is read and dropped
PARENT_PID_ENV = "GLM_BENCH_PARENT_PID"


@dataclass(frozen=True)
class MemoryBenchRequest:
    source: str  # a preset name, a config.json (random weights), a model folder or "embedded" (real weights)
    levels: tuple[str, ...] = ("fp16", "int8", "int4")
    encode: int = 2048
    generate: int = 8192
    device: str = "auto"
    group_size: int = DEFAULT_GROUP_SIZE
    eval_tokens: int = 512
    check_memory: bool = True  # refuse a level whose predicted peak exceeds the free memory
    time_limit_s: float = LEVEL_TIME_LIMIT_S  # per level: past it the level's process is killed

    def describe(self) -> dict:
        return asdict(self)


def source_kind(source: str) -> str:
    """ "random" (preset or config.json: random weights) or "real" (a model folder or the embedded model)."""
    if source.strip().lower() in PRESETS:
        return "random"
    if source == EMBEDDED:
        return "real"
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".json":
        return "random"
    if path.is_dir() and (path / "config.json").is_file():
        return "real"
    raise ConfigError(f"{source!r} is not a preset ({', '.join(PRESETS)}), a config.json, a model folder or 'embedded'")


def source_config(source: str) -> tuple[str, dict]:
    if source == EMBEDDED:
        from ..models.loading import convert_gguf, embedded_gguf_path

        folder = convert_gguf(embedded_gguf_path(), load_settings().cache_dir)
        return "SmolLM2-135M-Instruct", read_config(str(folder))[1]
    return read_config(source)


def device_type(device: str) -> str:
    """ "cpu", "cuda" or "mps": where a run asked for on `device` would measure (ValueError says why not)."""
    return resolve_device(device).type


def environment(device: str) -> dict:
    """What a stored run was measured on."""
    import transformers

    resolved = resolve_device(device)
    if resolved.type == "cuda":
        name = torch.cuda.get_device_name(resolved)
    else:
        name = _cpu_name() + f" ({os.cpu_count()} cores)"
    return {
        "device": str(resolved),
        "device_name": name,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "host": platform.node(),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


# ---- one level, in this process ------------------------------------------------------------------------------


def build_random_model(config, precision: Precision, group_size: int, device: torch.device) -> torch.nn.Module:
    """The model of `config` with random weights, made module by module on `device`; quantized modules are
    quantized as each float weight is made, so no full-precision copy of the model ever exists."""
    from .estimator import meta_model

    model = meta_model(config, precision, group_size)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    head = model.get_output_embeddings()
    generator = torch.Generator(device=device).manual_seed(0)
    dtype = precision.dtype
    with torch.no_grad():
        for module in model.modules():
            if tied and module is head:  # shares the embedding's table, tied again below
                continue
            if hasattr(module, "set_weight"):
                module.to_empty(device=device, recurse=False)
                shape = module.float_shape  # [out, in]; [experts, out, in] for a MoE layer's expert stack
                module.set_weight(torch.randn(*shape, generator=generator, device=device, dtype=dtype) * 0.02)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
                continue
            stored = [(n, b) for n, b in module._buffers.items() if n not in module._non_persistent_buffers_set]
            for name, tensor in list(module._parameters.items()) + stored:  # computed buffers: see below
                if tensor is None or tensor.device.type != "meta":
                    continue
                real = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
                if real.dim() > 1:  # matrices, and a MoE layer's fused expert tensors
                    real.normal_(0, 0.02, generator=generator)
                elif name == "weight":
                    real.fill_(1.0)  # norms
                else:
                    real.zero_()
                if isinstance(tensor, torch.nn.Parameter):
                    module._parameters[name] = torch.nn.Parameter(real, requires_grad=False)
                else:
                    module._buffers[name] = real
    if tied and precision.is_quantized:
        tie_output_layer(model, model.get_input_embeddings(), dtype)
    elif tied:
        model.tie_weights()
    build_computed_buffers(model, device)
    fix_output_layer_input(model)
    trim_c_heap()  # as load_model does: the float temporaries' pages go back to the system
    return model.eval()


def measure_level(request: MemoryBenchRequest, level: str, emit: Callable[[dict], None]) -> dict:
    """Load, encode, generate and (real weights) perplexity for one level; the peaks are this process's."""
    from transformers import DynamicCache

    from ..engine.generation import decode_one, prefill
    from ..models.loading import load_model
    from ..models.quant import weight_bytes
    from ..protocol import ModelSpec
    from ..telemetry.memory import held_peak, kv_bytes_per_token, reset_peak
    from .quant import EVAL_TEXT, perplexity

    device = resolve_device(request.device)
    precision = parse_precision(level, device)
    kind = source_kind(request.source)
    if device.type == "cuda":
        torch.cuda.init()
    runtime = held_peak(device) if device.type != "cuda" else 0
    reset_peak(device)

    emit({"event": "progress", "fraction": 0.05, "message": f"{precision.label}: loading"})
    started = time.perf_counter()
    loaded = None
    if kind == "real":
        loaded = load_model(ModelSpec(request.source, precision.value, request.device, group_size=request.group_size))
        model, name = loaded.model, loaded.name
    else:
        name, cfg = read_config(request.source)
        config = model_config(cfg)
        model = build_random_model(config, precision, request.group_size, device)
    load_s = time.perf_counter() - started
    weights = weight_bytes(model)
    config = model.config
    vocab = config.get_text_config().vocab_size if hasattr(config, "get_text_config") else config.vocab_size
    load_peak = held_peak(device)

    emit({"event": "progress", "fraction": 0.4, "message": f"{precision.label}: encoding {request.encode} tokens"})
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (request.encode,), generator=generator).tolist()
    reset_peak(device)
    started = time.perf_counter()
    cache = DynamicCache(config=config)
    if getattr(model, "prefill_whole_prompt", False):  # as the engine feeds it (ChatGLM-6B): one forward
        with torch.inference_mode():
            fed = torch.tensor([ids], device=device)
            logits = model(input_ids=fed, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
    else:
        logits = prefill(model, ids, cache, device)
    int(logits.argmax())
    ttft = time.perf_counter() - started
    encode_peak = held_peak(device)
    del cache, logits
    _release(device)

    steps = min(DECODE_STEPS, request.generate)
    emit(
        {
            "event": "progress",
            "fraction": 0.7,
            "message": f"{precision.label}: generating at a context of {request.generate} tokens",
        }
    )
    reset_peak(device)
    cache = DynamicCache(config=config)
    _fill_cache(cache, config, request.generate - steps, precision.dtype, device)
    token = ids[-1]
    started = time.perf_counter()
    for _ in range(steps):
        token = int(decode_one(model, token, cache, device).argmax())
    decode_s = time.perf_counter() - started
    generate_peak = held_peak(device)
    context = _cuda_context_bytes(device) if device.type == "cuda" else None
    del cache
    _release(device)

    ppl = None
    if loaded is not None and request.eval_tokens:
        emit({"event": "progress", "fraction": 0.9, "message": f"{precision.label}: perplexity"})
        ppl = perplexity(loaded, EVAL_TEXT.read_text(), request.eval_tokens)
    if device.type == "cuda":
        runtime = context or 0
        load_peak, encode_peak, generate_peak = (p + runtime for p in (load_peak, encode_peak, generate_peak))
    return {
        "level": precision.value,
        "model": name,
        "weights": "real" if kind == "real" else "random",
        "device": str(device),
        "memory_source": "CUDA allocator (reserved) + CUDA context" if device.type == "cuda" else "process RSS",
        "runtime_bytes": runtime,
        "weights_bytes": weights["total"],
        "quantized_weights_bytes": weights["quantized"],
        "kv_bytes_per_token": kv_bytes_per_token(config, precision.dtype),
        "load_s": load_s,
        "load_peak_bytes": load_peak,
        "encode_tokens": request.encode,
        "encode_peak_bytes": encode_peak,
        "ttft_s": ttft,
        "generate_tokens": request.generate,
        "generate_peak_bytes": generate_peak,
        "decode_tokens_per_s": steps / decode_s if decode_s > 0 else None,
        "perplexity": ppl,
    }


def _cuda_context_bytes(device: torch.device) -> int | None:
    """What this process holds on the GPU outside the caching allocator (CUDA context, kernel images)."""
    from ..telemetry.gpu_monitor import this_process_gpu_bytes

    index = device.index if device.index is not None else torch.cuda.current_device()
    used = this_process_gpu_bytes(index)
    return max(used - torch.cuda.memory_reserved(device), 0) if used is not None else None


def _fill_cache(cache, config, positions: int, dtype: torch.dtype, device: torch.device) -> None:
    """Hold `positions` random keys and values in every layer, as a generation that far would."""
    if positions <= 0:
        return
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    for layer in range(text.num_hidden_layers):
        keys = torch.randn(1, heads, positions, head_dim, dtype=dtype, device=device)
        cache.update(keys, torch.randn_like(keys), layer)


def _release(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def die_with_parent() -> None:
    """In a level's process: end when the process that started it ends (a portal killed with -9 must not leave
    a benchmark eating the machine). Linux: the kernel sends SIGKILL at once (PR_SET_PDEATHSIG); elsewhere, and
    in case the parent died before that was set, a thread checks the parent every half second."""
    expected = os.environ.get(PARENT_PID_ENV)
    if not expected:
        return
    parent = int(expected)
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal

            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def run_in_process(request: MemoryBenchRequest) -> int:
    """The child's side: one level (request.levels[0]); JSON lines on stdout."""
    die_with_parent()

    def emit(event: dict) -> None:
        print(json.dumps(event), flush=True)

    if resolve_device(request.device).type == "cpu" and hasattr(os, "nice"):
        os.nice(10)  # the portal's chats keep their share of the CPU
    try:
        result = measure_level(request, request.levels[0], emit)
    except torch.OutOfMemoryError:
        emit({"event": "result", "level": request.levels[0], "error": "out of memory"})
        return 1
    except Exception as exc:  # reported as this level's error; the other levels still run
        message = str(exc).strip().splitlines()
        emit(
            {
                "event": "result",
                "level": request.levels[0],
                "error": (message[0] if message else type(exc).__name__)[:300],
            }
        )
        return 1
    emit({"event": "result", **result})
    return 0


# ---- the run over all levels ---------------------------------------------------------------------------------


def free_memory_bytes(device: str) -> int:
    from ..telemetry.memory import free_memory_bytes as free_on

    return free_on(resolve_device(device))


@dataclass
class MemoryBenchRun:
    """One benchmark over the request's levels, in a background thread; each level in a child process."""

    kind: ClassVar[str] = "memory"
    request: MemoryBenchRequest
    owner: str = ""  # the workspace that started it (the page lets only it cancel)
    fraction: float = 0.0
    message: str = "starting"
    results: list[dict] = field(default_factory=list)
    estimates: dict = field(default_factory=dict)
    state: str = "pending"  # pending, running, done, cancelled, failed
    error: str | None = None
    environment: dict = field(default_factory=dict)  # what it runs on, read once when it starts
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    _process: subprocess.Popen | None = None
    _cancelled: bool = False
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, on_finish: Callable[[MemoryBenchRun], None] | None = None) -> MemoryBenchRun:
        self.state = "running"
        self.environment = environment(self.request.device)
        self._thread = threading.Thread(target=self._run, args=(on_finish,), name="bench-memory", daemon=True)
        self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> MemoryBenchRun:
        if self._thread is not None:
            self._thread.join(timeout)
        return self

    @property
    def active(self) -> bool:
        return self.state in ("pending", "running")

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            if self._process is not None and self._process.poll() is None:
                self._process.kill()

    def _run(self, on_finish) -> None:
        try:
            self._run_levels()
            self.state = "cancelled" if self._cancelled else "done"
        except Exception as exc:  # a broken request: shown as the run's error
            self.state, self.error = (
                "failed",
                str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
            )
        self.finished_at = time.time()
        self.fraction = 1.0 if self.state == "done" else self.fraction
        if on_finish is not None:
            on_finish(self)

    def _run_levels(self) -> None:
        request = self.request
        _, cfg = source_config(request.source)
        device_type = resolve_device(request.device).type
        self.estimates = {
            e.level: e.to_dict()
            for e in estimate(
                cfg, list(request.levels), request.encode, request.generate, device_type, request.group_size
            )
        }
        count = len(request.levels)
        for number, level in enumerate(request.levels):
            if self._cancelled:
                return
            predicted = self.estimates[parse_precision(level, resolve_device(request.device)).value]
            need = max(predicted["encode_peak_bytes"], predicted["generate_peak_bytes"])
            free = free_memory_bytes(request.device)
            if request.check_memory and need > free:
                self.results.append(
                    {
                        "level": level,
                        "error": (
                            f"predicted peak {need / 2**30:.1f} GiB exceeds the {free / 2**30:.1f} GiB free; not run"
                        ),
                    }
                )
                continue
            self.message = f"{level.upper()}: starting"
            self.results.append(self._run_level(level, number, count))

    def _command(self, level: str) -> list[str]:
        request = self.request
        return [
            sys.executable,
            "-m",
            "glm_core",
            "bench",
            "memory",
            "--in-process",
            "--model",
            request.source,
            "--levels",
            level,
            "--encode",
            str(request.encode),
            "--generate",
            str(request.generate),
            "--device",
            request.device,
            "--group-size",
            str(request.group_size),
            "--eval-tokens",
            str(request.eval_tokens),
        ]

    def _run_level(self, level: str, number: int, count: int) -> dict:
        with self._lock:
            if self._cancelled:
                return {"level": level, "error": "cancelled"}
            self._process = process = start_child(self._command(level))

        def on_progress(fraction: float, message: str) -> None:
            self.fraction, self.message = (number + fraction) / count, message

        outcome = read_child(process, on_progress, self.request.time_limit_s)
        if self._cancelled:
            return {"level": level, "error": "cancelled"}
        return outcome.result if outcome.result is not None else {"level": level, "error": outcome.error}


@dataclass
class ChildOutcome:
    result: dict | None  # the child's result event (without "event"), or None
    error: str | None  # why there is no result: over the time limit, killed, the last line of its stderr


def start_child(command: list[str]) -> subprocess.Popen:
    """A benchmark's child process: this project importable, told its parent (see die_with_parent)."""
    env = {
        **os.environ,
        PARENT_PID_ENV: str(os.getpid()),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def read_child(
    process: subprocess.Popen, on_progress: Callable[[float, str], None], time_limit_s: float
) -> ChildOutcome:
    """Read a child's JSON lines (progress events, then one result) until it ends, killing it past the limit."""
    # Both pipes are read at once: a child writing a long traceback to an unread stderr would block, and
    # with it this thread waiting for its stdout.
    stderr_tail = bytearray()

    def drain_stderr() -> None:
        for chunk in iter(lambda: process.stderr.read1(65536), b""):
            stderr_tail.extend(chunk)
            del stderr_tail[:-STDERR_KEPT_BYTES]

    reader = threading.Thread(target=drain_stderr, name="bench-stderr", daemon=True)
    reader.start()
    timed_out = threading.Event()

    def time_up() -> None:
        timed_out.set()
        process.kill()

    timer = threading.Timer(time_limit_s, time_up)
    timer.daemon = True
    timer.start()
    result = None
    try:
        for raw in process.stdout:
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(event, dict):
                continue
            if event.get("event") == "progress":
                on_progress(float(event.get("fraction", 0)), str(event.get("message", "")))
            elif event.get("event") == "result":
                result = {k: v for k, v in event.items() if k != "event"}
        code = process.wait()
    finally:
        timer.cancel()
        if process.poll() is None:  # this thread is leaving early: the child must not outlive it
            process.kill()
            process.wait()
    reader.join(timeout=5)
    if timed_out.is_set():
        return ChildOutcome(None, f"took longer than the limit of {time_limit_s:g} s; stopped")
    if result is None:
        lines = stderr_tail.decode("utf-8", "replace").strip().splitlines()
        tail = lines[-1] if lines else f"exit status {code}"
        if code < 0 or code == 137:
            tail = f"killed (exit {code}); out of memory?"
        return ChildOutcome(None, tail[:300])
    return ChildOutcome(result, None)


def run_memory_bench(
    request: MemoryBenchRequest, progress: Callable[[float, str], None] | None = None
) -> MemoryBenchRun:
    """The command line's synchronous run (the page starts a MemoryBenchRun and polls it)."""
    run = MemoryBenchRun(request).start()
    last = None
    while run.wait(0.5).active:
        if progress is not None and (run.fraction, run.message) != last:
            last = (run.fraction, run.message)
            progress(*last)
    return run


# ---- measured vs predicted vs published ----------------------------------------------------------------------


def comparison_rows(data: dict) -> list[dict]:
    """One row per level of a run record: measured, predicted (with the error) and published (ours vs theirs)."""
    request = data["request"]
    source_key = request["source"].strip().lower()
    table = published(source_key, request["encode"], request["generate"]) or {}
    rows = []
    for result in data["results"]:
        level = result["level"]
        predicted = data["estimates"].get(level, {})
        row = {"level": level, "error": result.get("error")}
        for phase in ("encode", "generate"):
            measured = result.get(f"{phase}_peak_bytes")
            guess = predicted.get(f"{phase}_peak_bytes")
            theirs = table.get(level, (None, None))[0 if phase == "encode" else 1]
            row[f"{phase}_measured_bytes"] = measured
            row[f"{phase}_predicted_bytes"] = guess
            row[f"{phase}_prediction_error"] = (guess - measured) / measured if measured and guess else None
            row[f"{phase}_published_bytes"] = theirs
            row[f"{phase}_vs_published"] = (measured - theirs) / theirs if measured and theirs else None
        for key in ("weights_bytes", "ttft_s", "decode_tokens_per_s", "perplexity", "weights"):
            row[key] = result.get(key)
        row["predicted_weights_bytes"] = predicted.get("weights_bytes")
        rows.append(row)
    return rows


def run_record(run: MemoryBenchRun) -> dict:
    return {
        "request": run.request.describe(),
        "results": run.results,
        "estimates": run.estimates,
        "state": run.state,
        "error": run.error,
        "started_at": run.started_at,
        "finished_at": run.finished_at,
        "environment": run.environment,
    }


def format_memory_report(record: dict) -> str:
    request, env = record["request"], record.get("environment", {})
    lines = [
        f"bench memory: {request['source']} on {env.get('device_name', request['device'])}, "
        f"encode {request['encode']} / generate {request['generate']} tokens (GB = 10^9 bytes)",
        "level  weights GB  encode: measured  predicted (err)   published   generate: measured  predicted (err)"
        "   published   ttft s  decode tok/s  perplexity",
    ]

    def gb(value):
        return f"{value / 1e9:.2f}" if value else "-"

    def pct(value):
        return f"{value * 100:+.1f}%" if value is not None else ""

    for row in comparison_rows(record):
        if row["error"]:
            lines.append(f"{row['level']:<5}  error: {row['error']}")
            continue
        ppl = f"{row['perplexity']:.2f}" if row["perplexity"] is not None else "n/a"
        lines.append(
            f"{row['level']:<5}  {gb(row['weights_bytes']):>10}  "
            f"{gb(row['encode_measured_bytes']):>16}  {gb(row['encode_predicted_bytes']):>9} ({pct(row['encode_prediction_error']):>6})"
            f"  {gb(row['encode_published_bytes']):>9}  "
            f"{gb(row['generate_measured_bytes']):>18}  {gb(row['generate_predicted_bytes']):>9} ({pct(row['generate_prediction_error']):>6})"
            f"  {gb(row['generate_published_bytes']):>9}  {row['ttft_s']:>7.2f}  {row['decode_tokens_per_s'] or 0:>12.2f}  {ppl:>10}"
        )
    return "\n".join(lines)


# ---- history -------------------------------------------------------------------------------------------------


class BenchHistory:
    """Every finished run of the portal and the command line, shared by the team (benchmarks are not private
    the way conversations are): one SQLite file beside the conversation store."""

    def __init__(self, data_dir: Path | str | None = None):
        self.path = Path(data_dir or load_settings().data_dir) / "benchmarks.sqlite3"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            for table in ("memory_runs", "quality_runs"):
                db.execute(
                    f"CREATE TABLE IF NOT EXISTS {table} (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                    "created_at REAL NOT NULL, record TEXT NOT NULL)"
                )

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        return db

    def add(self, record: dict) -> int:
        return self._add("memory_runs", record)

    def list(self, limit: int = 200) -> list[dict]:
        return self._list("memory_runs", limit)

    def add_quality(self, record: dict) -> int:
        """A quality run (bench/quality.py): KL divergence and agreement per level, kept beside the memory runs."""
        return self._add("quality_runs", record)

    def list_quality(self, limit: int = 200) -> list[dict]:
        return self._list("quality_runs", limit)

    def _add(self, table: str, record: dict) -> int:
        with self._connect() as db:
            cursor = db.execute(
                f"INSERT INTO {table} (created_at, record) VALUES (?, ?)",
                (record.get("finished_at") or time.time(), json.dumps(record)),
            )
            return int(cursor.lastrowid)

    def _list(self, table: str, limit: int) -> list[dict]:
        with self._connect() as db:
            rows = db.execute(f"SELECT id, record FROM {table} ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [{"id": row_id, **json.loads(record)} for row_id, record in rows]


class MemoryBenchRunner:
    """At most one run at a time per server process (a memory run or a quality run) (two runs on one machine would distort each other's figures
    and could exhaust its memory); every run that measured something goes to the history."""

    def __init__(self, history: BenchHistory):
        self.history = history
        self.current: MemoryBenchRun | None = None
        self._lock = threading.Lock()

    def start(self, request: MemoryBenchRequest, owner: str) -> MemoryBenchRun:
        source_kind(request.source)  # a bad source is refused now, with its message
        with self._lock:
            if self.current is not None and self.current.active:
                raise RuntimeError("a benchmark is already running on this server; wait for it or cancel it")
            self.current = MemoryBenchRun(request, owner=owner).start(on_finish=self._finished)
            return self.current

    def start_quality(self, request, owner: str):
        """A quality run (bench/quality.py) in the same one-at-a-time place: it would distort a memory run's
        figures as much as another memory run would."""
        from .quality import QualityBenchRun

        with self._lock:
            if self.current is not None and self.current.active:
                raise RuntimeError("a benchmark is already running on this server; wait for it or cancel it")
            self.current = QualityBenchRun(request, owner=owner).start(on_finish=self._finished)
            return self.current

    def _finished(self, run) -> None:
        if run.kind == "quality":
            from .quality import quality_record

            if run.result is not None and any("error" not in r for r in run.result["levels"]):
                self.history.add_quality(quality_record(run))
        elif any("error" not in r for r in run.results):
            self.history.add(run_record(run))


CSV_FIELDS = (
    "run",
    "date",
    "state",
    "model",
    "weights",
    "device",
    "device_name",
    "torch",
    "transformers",
    "encode_tokens",
    "generate_tokens",
    "level",
    "error",
    "weights_bytes",
    "predicted_weights_bytes",
    "encode_measured_bytes",
    "encode_predicted_bytes",
    "encode_prediction_error",
    "encode_published_bytes",
    "encode_vs_published",
    "generate_measured_bytes",
    "generate_predicted_bytes",
    "generate_prediction_error",
    "generate_published_bytes",
    "generate_vs_published",
    "ttft_s",
    "decode_tokens_per_s",
    "perplexity",
)


def csv_rows(records: list[dict]) -> list[dict]:
    """One row per run and level, every figure in bytes or seconds; text cells cannot run as formulas."""
    from datetime import datetime

    from ..conversations.exchange import spreadsheet_safe

    rows = []
    for record in records:
        request, env = record["request"], record.get("environment", {})
        date = datetime.fromtimestamp(record.get("finished_at") or record["started_at"], UTC).isoformat()
        for row in comparison_rows(record):
            full = {
                "run": record.get("id", ""),
                "date": date,
                "state": record.get("state", ""),
                "model": request["source"],
                "device": env.get("device", ""),
                "device_name": env.get("device_name", ""),
                "torch": env.get("torch", ""),
                "transformers": env.get("transformers", ""),
                "encode_tokens": request["encode"],
                "generate_tokens": request["generate"],
                **row,
            }
            rows.append({k: "" if full.get(k) is None else spreadsheet_safe(full.get(k)) for k in CSV_FIELDS})
    return rows


def predict(request: MemoryBenchRequest) -> list[dict]:
    """The estimator's figures for a request, with the published ones where they exist (before any run)."""
    _, cfg = source_config(request.source)
    device_type = resolve_device(request.device).type
    table = published(request.source, request.encode, request.generate) or {}
    rows = []
    for e in estimate(cfg, list(request.levels), request.encode, request.generate, device_type, request.group_size):
        encode_pub, generate_pub = table.get(e.level, (None, None))
        rows.append({**e.to_dict(), "encode_published_bytes": encode_pub, "generate_published_bytes": generate_pub})
    return rows
