"""Usage accounting: one record per reply (browser or API), written by a thread of its own in batches.

`record()` only appends to a list under a lock (about a microsecond): the page's thread and the API's event loop
never wait on the disk, and the engine's decode loop never sees it at all. The writer wakes every FLUSH_EVERY_S
(or when BATCH records wait) and inserts what is there in one transaction. Tokens recorded but not yet written
still count toward today's totals (`tokens_today`), so a quota cannot be outrun by the writer's delay.
"""

from __future__ import annotations

import atexit
import csv
import io
import logging
import threading
import time
from dataclasses import astuple, dataclass, fields
from datetime import UTC, datetime, timedelta

from .db import AdminDB

log = logging.getLogger(__name__)
FLUSH_EVERY_S = 0.5
BATCH = 512
STORED_FOR_S = 10.0


def utc_day(at: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(at))


def seconds_to_next_utc_day(now: float | None = None) -> float:
    now = time.time() if now is None else now
    today = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return (today + timedelta(days=1)).timestamp() - now


@dataclass(frozen=True)
class UsageRecord:
    at: float
    who: str
    kind: str  # person | key | workspace | client
    door: str  # browser | api
    backend: str | None
    model: str | None
    level: str | None
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    ttft_s: float | None
    duration_s: float | None
    outcome: str | None

    @property
    def tokens(self) -> int:
        """What a day's token quota counts: the prompt (as OpenAI counts it, cached tokens included) and the reply."""
        return self.prompt_tokens + self.completion_tokens


_FIELDS = [f.name for f in fields(UsageRecord)]
_INSERT = f"INSERT INTO usage (day, {', '.join(_FIELDS)}) VALUES ({', '.join('?' * (len(_FIELDS) + 1))})"
GROUPS = {"person": "who", "model": "model", "day": "day", "backend": "backend", "door": "door"}


class UsageRecorder:
    def __init__(self, db: AdminDB, flush_every_s: float = FLUSH_EVERY_S):
        self.db, self.flush_every_s = db, flush_every_s
        self._lock = threading.Condition()
        self._waiting: list[UsageRecord] = []
        self._writing: list[UsageRecord] = []  # taken by the writer, not committed yet
        self._unwritten_tokens: dict[tuple[str, str], int] = {}  # (who, day) -> tokens recorded, not yet committed
        # (who, day) -> (tokens stored, when read): today's sum read once, then kept up to date by the writer's
        # commits, so a quota check costs no scan of a busy person's day; re-read after STORED_FOR_S to see what
        # another process (a `serve` beside the portal) stored meanwhile.
        self._stored_tokens: dict[tuple[str, str], tuple[int, float]] = {}
        self._commit_lock = threading.Lock()  # a commit and its bookkeeping, against a read of the stored sum
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="glm-usage-writer", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def record(self, record: UsageRecord) -> None:
        key = (record.who, utc_day(record.at))
        with self._lock:
            self._waiting.append(record)
            self._unwritten_tokens[key] = self._unwritten_tokens.get(key, 0) + record.tokens
            if len(self._waiting) >= BATCH:
                self._lock.notify_all()

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._waiting and not self._closed:
                    self._lock.wait(self.flush_every_s)
                if not self._waiting:
                    if self._closed:
                        return
                    continue
                self._writing, self._waiting = self._waiting, []
            self._commit_lock.acquire()
            try:
                self._write(self._writing)
            except Exception:  # a full disk must not end accounting for good: these are retried with the next batch
                self._commit_lock.release()
                log.exception("could not write %d usage record(s); retrying", len(self._writing))
                with self._lock:
                    self._waiting[:0], self._writing = self._writing, []
                time.sleep(self.flush_every_s)
                continue
            with self._lock:
                for record in self._writing:
                    key = (record.who, utc_day(record.at))
                    left = self._unwritten_tokens.get(key, 0) - record.tokens
                    if left > 0:
                        self._unwritten_tokens[key] = left
                    else:
                        self._unwritten_tokens.pop(key, None)
                    if key in self._stored_tokens:
                        stored, read_at = self._stored_tokens[key]
                        self._stored_tokens[key] = (stored + record.tokens, read_at)
                self._writing = []
                self._lock.notify_all()
            self._commit_lock.release()

    def _write(self, records: list[UsageRecord]) -> None:
        with self.db.transaction() as db:
            db.executemany(_INSERT, [(utc_day(r.at), *astuple(r)) for r in records])

    def flush(self, timeout: float = 10) -> bool:
        """Wait until everything recorded so far is written (the CLI, the Admin page's download, tests)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._lock.notify_all()
            while self._waiting or self._writing:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(min(left, 0.05))
                self._lock.notify_all()
        return True

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._thread.join(timeout=10)

    def tokens_today(self, who: str, now: float | None = None) -> int:
        """Tokens `who` used this UTC day: stored and not yet written."""
        key = (who, utc_day(time.time() if now is None else now))
        with self._lock:
            cached = self._stored_tokens.get(key)
            if cached is not None and time.monotonic() - cached[1] < STORED_FOR_S:
                return cached[0] + self._unwritten_tokens.get(key, 0)
        with self._commit_lock:  # no commit between the sum and the unwritten count: nothing counted twice or lost
            with self.db.connect() as db:
                (stored,) = db.execute(
                    "SELECT COALESCE(SUM(prompt_tokens + completion_tokens), 0) FROM usage WHERE who = ? AND day = ?",
                    key,
                ).fetchone()
            with self._lock:
                if len(self._stored_tokens) > 10_000:
                    self._stored_tokens.clear()
                self._stored_tokens[key] = (int(stored), time.monotonic())
                return int(stored) + self._unwritten_tokens.get(key, 0)


def usage_summary(
    db: AdminDB, since: str | None = None, by: tuple[str, ...] = ("person", "model", "day")
) -> list[dict]:
    """Requests, tokens and times grouped by `by` (person, model, day, backend, door), from `since` (YYYY-MM-DD)."""
    unknown = [g for g in by if g not in GROUPS]
    if unknown:
        raise ValueError(f"group usage by {', '.join(GROUPS)}; not {', '.join(unknown)}")
    keys = [GROUPS[g] for g in by]
    where, args = ("WHERE day >= ?", (since,)) if since else ("", ())
    select = ", ".join(f"{column} AS {name}" for name, column in zip(by, keys))
    query = f"""SELECT {select + ", " if select else ""}COUNT(*), SUM(prompt_tokens), SUM(cached_tokens),
        SUM(completion_tokens), AVG(ttft_s), AVG(duration_s)
        FROM usage {where} {"GROUP BY " + ", ".join(keys) if keys else ""}
        {"ORDER BY " + ", ".join(keys) if keys else ""}"""
    with db.connect() as conn:
        rows = conn.execute(query, args).fetchall()
    out = []
    for row in rows:
        head = dict(zip(by, row[: len(by)]))
        requests, prompt, cached, completion, ttft, duration = row[len(by) :]
        out.append(
            {
                **head,
                "requests": requests,
                "prompt_tokens": prompt or 0,
                "cached_tokens": cached or 0,
                "completion_tokens": completion or 0,
                "total_tokens": (prompt or 0) + (completion or 0),
                "mean_ttft_s": round(ttft, 4) if ttft is not None else None,
                "mean_duration_s": round(duration, 4) if duration is not None else None,
            }
        )
    return out


def usage_records(db: AdminDB, since: str | None = None, limit: int = 100_000) -> list[dict]:
    where, args = ("WHERE day >= ?", (since,)) if since else ("", ())
    with db.connect() as conn:
        rows = conn.execute(f"SELECT day, {', '.join(_FIELDS)} FROM usage {where} ORDER BY at LIMIT ?", (*args, limit))
        return [dict(zip(["day", *_FIELDS], row)) for row in rows]


def to_csv(rows: list[dict]) -> str:
    if not rows:
        return ""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows({k: _cell(v) for k, v in row.items()} for row in rows)
    return out.getvalue()


def _cell(value):
    """A text cell a spreadsheet would run as a formula (=, +, -, @ first) is quoted with a leading apostrophe."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value
