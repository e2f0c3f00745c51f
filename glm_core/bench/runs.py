"""A benchmark run in the background, and the one-at-a-time place that starts them.

`BenchRun` is the lifecycle the memory and quality runs share: started in a thread, progress (fraction and
message) readable at any time, cancel (the running child is killed), a state, a stored record. A subclass says
what its run does (`execute`, which runs children through `run_child`) and what its record holds (`record`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .child import CHILD_COMMAND, ChildError, ChildOutcome, ChildProcess, ErrorKind, Progress, first_line
from .history import BenchHistory, environment


@dataclass
class BenchRun:
    """One benchmark in a background thread, its measuring in child processes (killed to cancel)."""

    kind: ClassVar[str] = ""  # "memory" or "quality": which history table keeps it
    request: Any
    owner: str = ""  # the workspace that started it (the page lets only it cancel)
    fraction: float = 0.0
    message: str = "starting"
    state: str = "pending"  # pending, running, done, cancelled, failed
    error: str | None = None
    environment: dict = field(default_factory=dict)  # what it runs on, read once when it starts
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    child: ChildProcess | None = None  # the child running now, or the last one
    _cancelled: bool = False
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # ---- what a kind of run says ----

    def execute(self) -> None:
        """The run's work, in its thread: children through run_child; results kept on self. An exception is
        the run's error (state "failed")."""
        raise NotImplementedError

    def record(self) -> dict:
        """What the history keeps of this run."""
        raise NotImplementedError

    def measured(self) -> bool:
        """Whether anything was measured (only such runs go to the history)."""
        raise NotImplementedError

    def child_command(self) -> list[str]:
        return list(CHILD_COMMAND)

    # ---- the lifecycle ----

    def start(self, on_finish: Callable[[BenchRun], None] | None = None) -> BenchRun:
        self.state = "running"
        self.environment = environment(self.request.device)
        self._thread = threading.Thread(target=self._run, args=(on_finish,), name=f"bench-{self.kind}", daemon=True)
        self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> BenchRun:
        if self._thread is not None:
            self._thread.join(timeout)
        return self

    @property
    def active(self) -> bool:
        return self.state in ("pending", "running")

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            if self.child is not None:
                self.child.cancel()

    def run_child(
        self,
        request,
        on_progress: Progress,
        time_limit_s: float,
        on_partial: Callable[[dict], None] | None = None,
    ) -> ChildOutcome:
        """One child for `request`, read to its end; cancelled at once if the run was."""
        with self._lock:
            if self._cancelled:
                return ChildOutcome(None, ChildError(ErrorKind.CANCELLED, "cancelled"))
            self.child = ChildProcess(request, self.child_command()).start()
        return self.child.read(on_progress, on_partial, time_limit_s)

    def _run(self, on_finish) -> None:
        try:
            self.execute()
            if self._cancelled:
                self.state = "cancelled"
            elif self.state == "running":
                self.state = "done"
        except Exception as exc:  # a broken request: shown as the run's error
            self.state, self.error = "failed", first_line(exc)
        self.finished_at = time.time()
        self.fraction = 1.0 if self.state == "done" else self.fraction
        if on_finish is not None:
            on_finish(self)


class BenchRunner:
    """At most one run at a time per server process, memory or quality (two runs on one machine would distort
    each other's figures and could exhaust its memory); every run that measured something goes to the history."""

    def __init__(self, history: BenchHistory):
        self.history = history
        self.current: BenchRun | None = None
        self._lock = threading.Lock()

    def start(self, request, owner: str) -> BenchRun:
        """A run of `request` (a MemoryBenchRequest or a QualityBenchRequest) for the workspace `owner`."""
        from .memory.request import MemoryBenchRequest, source_kind
        from .memory.supervisor import MemoryBenchRun
        from .quality import QualityBenchRequest, QualityBenchRun

        if isinstance(request, MemoryBenchRequest):
            source_kind(request.source)  # a bad source is refused now, with its message
            run: BenchRun = MemoryBenchRun(request, owner=owner)
        elif isinstance(request, QualityBenchRequest):
            run = QualityBenchRun(request, owner=owner)
        else:
            raise TypeError(f"not a benchmark request: {type(request).__name__}")
        with self._lock:
            if self.current is not None and self.current.active:
                raise RuntimeError("a benchmark is already running on this server; wait for it or cancel it")
            self.current = run.start(on_finish=self._finished)
            return self.current

    def _finished(self, run: BenchRun) -> None:
        if run.measured():
            self.history.add_record(run.kind, run.record())
