"""`bench memory`: per precision level, the memory held while encoding N tokens and while generating M tokens,
next to the estimator's prediction and the published figures. The Quantization page runs the same code.

Each level runs in a fresh process of its own (so each peak is that level's alone), at low CPU priority (so the
chats of the portal keep their share of the CPU), and can be cancelled by killing that process; the process
speaks the protocol of glm_core/bench/child.py. The rooms:

- request.py: what a run is asked (MemoryBenchRequest) and what its source is;
- child.py: one level measured in the child process (load, encode, generate, perplexity);
- supervisor.py: the run over the levels in the parent (MemoryBenchRun), one child per level;
- report.py: a level's typed figures (LevelReport, LevelError), the comparison with the estimator, text and CSV;
- glm_core/bench/history.py: the team's history of runs (shared with the quality benchmark).
"""

from ..history import BenchHistory, environment
from ..runs import BenchRunner
from .report import (
    CSV_FIELDS,
    LevelError,
    LevelReport,
    comparison_rows,
    csv_rows,
    format_memory_report,
    predict,
)
from .request import LEVELS, MemoryBenchRequest, device_type, source_config, source_kind
from .supervisor import MemoryBenchRun, run_memory_bench

__all__ = [
    "CSV_FIELDS",
    "LEVELS",
    "BenchHistory",
    "BenchRunner",
    "LevelError",
    "LevelReport",
    "MemoryBenchRequest",
    "MemoryBenchRun",
    "comparison_rows",
    "csv_rows",
    "device_type",
    "environment",
    "format_memory_report",
    "predict",
    "run_memory_bench",
    "source_config",
    "source_kind",
]
