"""The benchmark child protocol: how the portal and the command line run a benchmark in a process of its own.

A benchmark measures in a fresh process (so each memory peak is that run's alone, and a cancel is a kill). The
parent writes one request as JSON on the child's stdin; the child answers with JSON lines on stdout:

    {"event": "progress", "fraction": 0.4, "message": "INT4: encoding 2048 tokens"}
    {"event": "partial", "item": {...}}          # one finished piece (a quality level), kept if the child dies later
    {"event": "result", "result": {...}}         # the job's result, once, last
    {"event": "error", "kind": "bad_model", "message": "no such file or folder: /x"}   # instead of a result

and keeps stderr for warnings and tracebacks (the parent keeps its tail for the error line). The same protocol
serves the memory, quant and quality benchmarks: `JOBS` names what each job reads and runs.

The parent's side is `ChildProcess`: start it, read its progress, cancel it (a kill), kill it past a time limit;
a child that ends without a result gives one `ChildError` line, with the partial items it had sent.

Run as `python -m glm_core.bench.child` (the parent does that; a person runs `python -m glm_core bench ...`).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TextIO

from ..settings import PROJECT_ROOT

PROTOCOL = 1
PARENT_PID_ENV = "GLM_BENCH_PARENT_PID"
STDERR_KEPT_BYTES = 64 * 1024  # the tail of a child's stderr kept for its error line; the rest is read and dropped
CHILD_COMMAND = (sys.executable, "-m", "glm_core.bench.child")

# job name -> (the request's dataclass, the function the child runs: f(request, progress, partial) -> a JSON-able
# dict; progress(fraction, message) and partial(item) send events).
# A fixed table: the request names a job, never a module.
JOBS: dict[str, tuple[str, str]] = {
    "memory": ("glm_core.bench.memory.request:MemoryBenchRequest", "glm_core.bench.memory.child:run_level"),
    "quant": ("glm_core.bench.quant:QuantLevelRequest", "glm_core.bench.quant:run_level"),
    "quality": ("glm_core.bench.quality:QualityBenchRequest", "glm_core.bench.quality:run_in_child"),
}

Progress = Callable[[float, str], None]


class ErrorKind(StrEnum):
    """Why a child gave no result: what the page and the command line tell apart."""

    OUT_OF_MEMORY = "out_of_memory"  # torch or Python ran out of memory (the kernel's OOM killer is CRASHED)
    BAD_MODEL = "bad_model"  # the model path, preset or config cannot be used
    BAD_REQUEST = "bad_request"  # the request itself is malformed (a bug in the parent, or a bad value)
    FAILED = "failed"  # the job raised: the message is its first line
    CANCELLED = "cancelled"  # the parent cancelled it
    TIMED_OUT = "timed_out"  # past its time limit; killed
    CRASHED = "crashed"  # ended without a result: killed, segfault, a traceback outside the job


@dataclass(frozen=True)
class ChildError:
    kind: ErrorKind
    message: str

    def to_dict(self) -> dict:
        return {"kind": self.kind.value, "message": self.message}


@dataclass
class ChildOutcome:
    """What a child gave back: its result, or why not; the partial items it sent either way."""

    result: dict | None = None
    error: ChildError | None = None
    partials: list[dict] = field(default_factory=list)
    last_message: str = ""  # its last progress message: where it was when it ended


# ---- the request -----------------------------------------------------------------------------------------------


def _load(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def job_of(request) -> str:
    """The job whose request class `request` is."""
    cls = type(request)
    for job, (request_type, _) in JOBS.items():
        if request_type == f"{cls.__module__}:{cls.__qualname__}":
            return job
    raise ValueError(f"{cls.__name__} is not a benchmark request ({', '.join(JOBS)})")


def encode_request(request) -> str:
    """The JSON the parent writes on the child's stdin."""
    return json.dumps({"protocol": PROTOCOL, "job": job_of(request), "request": dataclasses.asdict(request)})


def decode_request(text: str):
    """The request a child reads from its stdin, as its dataclass (ValueError says what is wrong)."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"the request is not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("protocol") != PROTOCOL:
        raise ValueError(f"the request is not protocol {PROTOCOL}: {str(data)[:80]}")
    job, fields = data.get("job"), data.get("request")
    if job not in JOBS:
        raise ValueError(f"unknown benchmark job {job!r} ({', '.join(JOBS)})")
    if not isinstance(fields, dict):
        raise ValueError("the request has no fields")
    return request_from_dict(_load(JOBS[job][0]), fields)


def request_from_dict(cls, fields: dict):
    """`cls(**fields)`, with JSON's lists back as the tuples the dataclass declares, and unknown fields refused."""
    declared = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - set(declared))
    if unknown:
        raise ValueError(f"{cls.__name__} has no field {', '.join(unknown)}")
    values = {
        name: tuple(value) if isinstance(value, list) and str(declared[name].type).startswith("tuple") else value
        for name, value in fields.items()
    }
    return cls(**values)


# ---- the child's side --------------------------------------------------------------------------------------------


class Emitter:
    """Writes the child's events, one JSON line each, flushed at once (the parent reads them as they come)."""

    def __init__(self, out: TextIO):
        self.out = out

    def _write(self, event: dict) -> None:
        self.out.write(json.dumps(event) + "\n")
        self.out.flush()

    def progress(self, fraction: float, message: str) -> None:
        self._write({"event": "progress", "fraction": float(fraction), "message": str(message)})

    def partial(self, item: dict) -> None:
        self._write({"event": "partial", "item": item})

    def result(self, result: dict) -> None:
        self._write({"event": "result", "result": result})

    def error(self, kind: ErrorKind, message: str) -> None:
        self._write({"event": "error", "kind": kind.value, "message": message})


def first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:300]


def classify(exc: BaseException) -> ErrorKind:
    """The kind of a job's exception."""
    import torch

    from ..protocol import ModelLoadError
    from .estimator import ConfigError

    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return ErrorKind.OUT_OF_MEMORY
    if isinstance(exc, (ModelLoadError, ConfigError)):
        return ErrorKind.BAD_MODEL
    return ErrorKind.FAILED


def die_with_parent() -> None:
    """In a child: end when the process that started it ends (a portal killed with -9 must not leave a benchmark
    eating the machine). Linux: the kernel sends SIGKILL at once (PR_SET_PDEATHSIG); elsewhere, and in case the
    parent died before that was set, a thread checks the parent every half second."""
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


def lower_priority(device: str) -> None:
    """On the CPU, the portal's chats keep their share while a benchmark runs."""
    from ..models.precision import resolve_device

    try:
        on_cpu = resolve_device(device).type == "cpu"
    except ValueError:
        return  # the job reports the bad device
    if on_cpu and hasattr(os, "nice"):
        os.nice(10)


def serve(stdin: TextIO, stdout: TextIO) -> int:
    """The child: one request from `stdin`, its events on `stdout`; 0 when it gave a result."""
    emit = Emitter(stdout)
    try:
        request = decode_request(stdin.read())
        run = _load(JOBS[job_of(request)][1])
    except (ValueError, TypeError) as exc:
        emit.error(ErrorKind.BAD_REQUEST, first_line(exc))
        return 2
    lower_priority(getattr(request, "device", "auto"))
    try:
        result = run(request, emit.progress, emit.partial)
    except Exception as exc:  # the job's error, typed; the traceback stays on stderr for a bug
        kind = classify(exc)
        if kind is ErrorKind.FAILED:
            import traceback

            traceback.print_exc()
        emit.error(kind, first_line(exc))
        return 1
    emit.result(result)
    return 0


def main() -> int:
    die_with_parent()
    return serve(sys.stdin, sys.stdout)


# ---- the parent's side ---------------------------------------------------------------------------------------------


class ChildProcess:
    """One benchmark child: `start()`, then `read()` in the thread that waits for it; `cancel()` from any thread."""

    def __init__(self, request, command: list[str] | tuple[str, ...] = CHILD_COMMAND):
        self.request = request
        self.command = list(command)
        self.process: subprocess.Popen | None = None
        self.cancelled = False
        self._timed_out = threading.Event()

    def start(self) -> ChildProcess:
        env = {
            **os.environ,
            PARENT_PID_ENV: str(os.getpid()),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
        }
        self.process = subprocess.Popen(
            self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        try:
            self.process.stdin.write(encode_request(self.request).encode())
            self.process.stdin.close()
        except BrokenPipeError:  # it ended before reading: read() says why
            pass
        return self

    def poll(self) -> int | None:
        return self.process.poll() if self.process is not None else None

    def cancel(self) -> None:
        self.cancelled = True
        self.kill()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()

    def read(
        self,
        on_progress: Progress | None = None,
        on_partial: Callable[[dict], None] | None = None,
        time_limit_s: float = 30 * 60,
    ) -> ChildOutcome:
        """Read the child's events until it ends, killing it past `time_limit_s`; its outcome."""
        process = self.process
        # Both pipes are read at once: a child writing a long traceback to an unread stderr would block, and
        # with it this thread waiting for its stdout.
        stderr_tail = bytearray()

        def drain_stderr() -> None:
            for chunk in iter(lambda: process.stderr.read1(65536), b""):
                stderr_tail.extend(chunk)
                del stderr_tail[:-STDERR_KEPT_BYTES]

        reader = threading.Thread(target=drain_stderr, name="bench-stderr", daemon=True)
        reader.start()

        def time_up() -> None:
            self._timed_out.set()
            self.kill()

        timer = threading.Timer(time_limit_s, time_up)
        timer.daemon = True
        timer.start()
        outcome = ChildOutcome()
        try:
            for raw in process.stdout:
                event = _event(raw)
                kind = event.get("event")
                if kind == "progress":
                    outcome.last_message = str(event.get("message", ""))
                    if on_progress is not None:
                        on_progress(float(event.get("fraction", 0)), outcome.last_message)
                elif kind == "partial" and isinstance(event.get("item"), dict):
                    outcome.partials.append(event["item"])
                    if on_partial is not None:
                        on_partial(event["item"])
                elif kind == "result" and isinstance(event.get("result"), dict):
                    outcome.result = event["result"]
                elif kind == "error":
                    outcome.error = _child_error(event)
            code = process.wait()
        finally:
            timer.cancel()
            if process.poll() is None:  # this thread is leaving early: the child must not outlive it
                process.kill()
                process.wait()
        reader.join(timeout=5)
        if self.cancelled:
            return ChildOutcome(
                None, ChildError(ErrorKind.CANCELLED, "cancelled"), outcome.partials, outcome.last_message
            )
        if self._timed_out.is_set():
            error = ChildError(ErrorKind.TIMED_OUT, f"took longer than the limit of {time_limit_s:g} s; stopped")
            return ChildOutcome(None, error, outcome.partials, outcome.last_message)
        if outcome.result is None and outcome.error is None:
            outcome.error = ChildError(ErrorKind.CRASHED, _crash_line(code, stderr_tail, outcome.last_message))
        return outcome


def _event(raw: bytes) -> dict:
    try:
        event = json.loads(raw)
    except ValueError:  # a stray print in a library: not ours
        return {}
    return event if isinstance(event, dict) else {}


def _child_error(event: dict) -> ChildError:
    try:
        kind = ErrorKind(event.get("kind"))
    except ValueError:
        kind = ErrorKind.FAILED
    return ChildError(kind, str(event.get("message", ""))[:300])


def _crash_line(code: int, stderr_tail: bytearray, last_message: str) -> str:
    """One line for a child that ended without a result."""
    where = f" during {last_message!r}" if last_message else ""
    if code < 0 or code == 137:
        signal_number = -code if code < 0 else 9
        return f"the benchmark process was killed (signal {signal_number}){where}; out of memory?"
    lines = stderr_tail.decode("utf-8", "replace").strip().splitlines()
    return (lines[-1] if lines else f"the benchmark process ended (exit status {code}){where} without a result")[:300]


def run_child(
    request,
    on_progress: Progress | None = None,
    time_limit_s: float = 30 * 60,
    command: list[str] | tuple[str, ...] = CHILD_COMMAND,
) -> ChildOutcome:
    """Start a child for `request` and read it to its end (the command line's synchronous way)."""
    return ChildProcess(request, command).start().read(on_progress, time_limit_s=time_limit_s)


def as_result(outcome: ChildOutcome) -> dict[str, Any]:
    """The outcome as the dict a stored record holds for one piece: the result, or {"error", "error_kind"}."""
    if outcome.error is None and outcome.result is not None:
        return outcome.result
    error = outcome.error or ChildError(ErrorKind.CRASHED, "no result")
    return {"error": error.message, "error_kind": error.kind.value}


if __name__ == "__main__":
    sys.exit(main())
