"""The memory benchmark's run over its levels, in the parent: each level in a child process of its own (so each
peak is that level's alone), refused first when the estimator predicts it cannot fit."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import ClassVar

from ...models.precision import parse_precision, resolve_device
from ..child import ErrorKind
from ..estimator import estimate
from ..runs import BenchRun
from .report import LevelError, LevelReport
from .request import MemoryBenchRequest, source_config


def free_memory_bytes(device: str) -> int:
    from ...telemetry.memory import free_memory_bytes as free_on

    return free_on(resolve_device(device))


@dataclass
class MemoryBenchRun(BenchRun):
    """One benchmark over the request's levels; `results` holds one dict per level (a LevelReport's or a
    LevelError's), in level order, kept as each level ends."""

    kind: ClassVar[str] = "memory"
    request: MemoryBenchRequest
    results: list[dict] = field(default_factory=list)
    estimates: dict = field(default_factory=dict)

    def execute(self) -> None:
        request = self.request
        _, cfg = source_config(request.source)
        on = resolve_device(request.device).type
        self.estimates = {
            e.level: e.to_dict()
            for e in estimate(cfg, list(request.levels), request.encode, request.generate, on, request.group_size)
        }
        count = len(request.levels)
        for number, level in enumerate(request.levels):
            if self.cancelled:
                return
            predicted = self.estimates[parse_precision(level, resolve_device(request.device)).value]
            need = max(predicted["encode_peak_bytes"], predicted["generate_peak_bytes"])
            free = free_memory_bytes(request.device)
            if request.check_memory and need > free:
                why = f"predicted peak {need / 2**30:.1f} GiB exceeds the {free / 2**30:.1f} GiB free; not run"
                self.results.append(LevelError(level, why, "not_run").to_dict())
                continue
            self.message = f"{level.upper()}: starting"
            self.results.append(self.run_level(level, number, count))

    def run_level(self, level: str, number: int = 0, count: int = 1) -> dict:
        """One level in its child: its report, or why there is none (a child that died says where it was)."""

        def on_progress(fraction: float, message: str) -> None:
            self.fraction, self.message = (number + fraction) / count, message

        outcome = self.run_child(replace(self.request, levels=(level,)), on_progress, self.request.time_limit_s)
        if outcome.error is not None:
            return LevelError(level, outcome.error.message, outcome.error.kind.value).to_dict()
        try:
            return LevelReport.from_dict(outcome.result).to_dict()
        except (TypeError, ValueError) as exc:
            return LevelError(level, str(exc), ErrorKind.CRASHED.value).to_dict()

    def measured(self) -> bool:
        return any("error" not in r for r in self.results)

    def record(self) -> dict:
        return {
            "request": self.request.describe(),
            "results": self.results,
            "estimates": self.estimates,
            "state": self.state,
            "error": self.error,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "environment": self.environment,
        }


def run_memory_bench(
    request: MemoryBenchRequest, progress: Callable[[float, str], None] | None = None
) -> MemoryBenchRun:
    """The command line's synchronous run (the page starts one through the BenchRunner and polls it)."""
    run = MemoryBenchRun(request).start()
    last = None
    while run.wait(0.5).active:
        if progress is not None and (run.fraction, run.message) != last:
            last = (run.fraction, run.message)
            progress(*last)
    return run
