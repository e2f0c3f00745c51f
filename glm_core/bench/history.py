"""The team's benchmark history: every finished memory and quality run of the portal and the command line, with
what it was measured on."""

from __future__ import annotations

import json
import os
import platform
import sqlite3
import time
from pathlib import Path

from ..settings import load_settings

TABLES = {"memory": "memory_runs", "quality": "quality_runs"}


class BenchHistory:
    """Every finished run, shared by the team (benchmarks are not private the way conversations are): one SQLite
    file beside the conversation store, a table per kind of run."""

    def __init__(self, data_dir: Path | str | None = None):
        self.path = Path(data_dir or load_settings().data_dir) / "benchmarks.sqlite3"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            for table in TABLES.values():
                db.execute(
                    f"CREATE TABLE IF NOT EXISTS {table} (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                    "created_at REAL NOT NULL, record TEXT NOT NULL)"
                )

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        return db

    def add_record(self, kind: str, record: dict) -> int:
        """Keep a run's record under its kind ("memory" or "quality"); its id."""
        with self._connect() as db:
            cursor = db.execute(
                f"INSERT INTO {TABLES[kind]} (created_at, record) VALUES (?, ?)",
                (record.get("finished_at") or time.time(), json.dumps(record)),
            )
            return int(cursor.lastrowid)

    def records(self, kind: str, limit: int = 200) -> list[dict]:
        """The newest records of a kind first, each with its "id"."""
        with self._connect() as db:
            rows = db.execute(f"SELECT id, record FROM {TABLES[kind]} ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [{"id": row_id, **json.loads(record)} for row_id, record in rows]

    def add(self, record: dict) -> int:
        return self.add_record("memory", record)

    def list(self, limit: int = 200) -> list[dict]:
        return self.records("memory", limit)

    def add_quality(self, record: dict) -> int:
        return self.add_record("quality", record)

    def list_quality(self, limit: int = 200) -> list[dict]:
        return self.records("quality", limit)


def environment(device: str) -> dict:
    """What a stored run was measured on (ValueError for a device that cannot be used)."""
    import torch
    import transformers

    from ..models.precision import resolve_device

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
