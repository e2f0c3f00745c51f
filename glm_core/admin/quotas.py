"""Quotas per person or key, and a default for everyone ("*"): tokens per day (UTC), requests per minute, replies
running at once. `Quotas.admit(who)` checks all three before a request is queued and returns a Ticket that holds
one running place until `done()` records the reply's usage; past a quota it raises QuotaExceeded naming the limit
and how long to wait. Requests per minute and running replies are counted in this process (the portal serves the
browser and the API from one process); tokens per day come from the usage records.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

from ..protocol import ModelCard, Reply, ReplyStats
from .db import AdminDB
from .usage import UsageRecord, UsageRecorder, seconds_to_next_utc_day

DEFAULT = "*"
WINDOW_S = 60.0


@dataclass(frozen=True)
class Quota:
    tokens_per_day: int | None = None
    requests_per_minute: int | None = None
    running: int | None = None

    def public(self) -> dict:
        return {
            "tokens_per_day": self.tokens_per_day,
            "requests_per_minute": self.requests_per_minute,
            "running": self.running,
        }

    @property
    def unlimited(self) -> bool:
        return self.tokens_per_day is None and self.requests_per_minute is None and self.running is None


class QuotaExceeded(Exception):
    """Past a quota: `limit` names it, `retry_after_s` says when trying again can succeed; str(error) is the
    sentence shown to the person and sent to the client."""

    def __init__(self, message: str, limit: str, retry_after_s: float):
        super().__init__(message)
        self.limit, self.retry_after_s = limit, max(1, int(retry_after_s + 0.999))


@dataclass
class Ticket:
    """One admitted request: holds its running place; `done()` records its usage and gives the place back."""

    quotas: Quotas
    who: str
    kind: str
    door: str
    started: float = field(default_factory=time.monotonic)
    _done: bool = False

    def cancel(self) -> None:
        """The request was not queued after all: give the place back and record nothing."""
        if not self._done:
            self._done = True
            self.quotas._release(self.who)

    def finish(self, card: ModelCard | None, reply: Reply | None, backend: str | None = None) -> None:
        """done() from a backend's card and the reply (None: the backend never answered)."""
        self.done(
            backend=backend or (card.backend if card is not None else "local"),
            model=card.name if card is not None else None,
            level=card.precision if card is not None else None,
            stats=reply.stats if reply is not None else None,
            outcome=("error" if reply.error else reply.finish_reason) if reply is not None else "gone",
        )

    def done(
        self,
        *,
        backend: str | None,
        model: str | None,
        level: str | None,
        stats: ReplyStats | None,
        outcome: str | None,
    ) -> None:
        if self._done:
            return
        self._done = True
        self.quotas._release(self.who)
        stats = stats or ReplyStats()
        self.quotas.recorder.record(
            UsageRecord(
                at=time.time(),
                who=self.who,
                kind=self.kind,
                door=self.door,
                backend=backend,
                model=model,
                level=level,
                prompt_tokens=int(stats.prompt_tokens),
                cached_tokens=int(stats.reused_tokens),
                completion_tokens=int(stats.completion_tokens),
                ttft_s=round(stats.queue_s + stats.ttft_s, 4) if stats.completion_tokens else None,
                duration_s=round(time.monotonic() - self.started, 4),
                outcome=outcome,
            )
        )


class Quotas:
    def __init__(self, db: AdminDB, recorder: UsageRecorder, clock=time.monotonic):
        self.db, self.recorder, self.clock = db, recorder, clock
        self._lock = threading.Lock()
        self._recent: dict[str, deque] = {}
        self._running: dict[str, int] = {}

    # ---- settings ----

    def set(self, name: str, quota: Quota, by: str | None = None) -> None:
        for value in quota.public().values():
            if value is not None and value < 0:
                raise ValueError("quotas are whole numbers, 0 or more (0: none allowed)")
        with self.db.connect() as db:
            if quota.unlimited:
                db.execute("DELETE FROM quotas WHERE name = ?", (name,))
                return
            db.execute(
                "INSERT INTO quotas (name, tokens_per_day, requests_per_minute, running, updated_at, updated_by) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET tokens_per_day = excluded.tokens_per_day, "
                "requests_per_minute = excluded.requests_per_minute, running = excluded.running, "
                "updated_at = excluded.updated_at, updated_by = excluded.updated_by",
                (name, quota.tokens_per_day, quota.requests_per_minute, quota.running, time.time(), by),
            )

    def all(self) -> dict[str, Quota]:
        with self.db.connect() as db:
            rows = db.execute("SELECT name, tokens_per_day, requests_per_minute, running FROM quotas ORDER BY name")
            return {row[0]: Quota(*row[1:]) for row in rows}

    def for_(self, who: str, also: tuple[str, ...] = ()) -> Quota:
        """The quota that applies: the name's own, else the first of `also` (a key's owner) that has one, else the
        default, else none."""
        names = (who, *also, DEFAULT)
        with self.db.connect() as db:
            rows = dict(
                (row[0], Quota(*row[1:]))
                for row in db.execute(
                    f"SELECT name, tokens_per_day, requests_per_minute, running FROM quotas WHERE name IN "
                    f"({', '.join('?' * len(names))})",
                    names,
                )
            )
        return next((rows[n] for n in names if n in rows), Quota())

    # ---- admission ----

    def admit(self, who: str, kind: str, door: str, also: tuple[str, ...] = ()) -> Ticket:
        quota = self.for_(who, also)
        if quota.tokens_per_day is not None:
            used = self.recorder.tokens_today(who)
            if used >= quota.tokens_per_day:
                raise QuotaExceeded(
                    f"Daily token quota reached: {used:,} of {quota.tokens_per_day:,} tokens used today (UTC) by "
                    f"{who}. It resets at midnight UTC.",
                    "tokens_per_day",
                    seconds_to_next_utc_day(),
                )
        with self._lock:
            now = self.clock()
            recent = self._recent.setdefault(who, deque())
            while recent and recent[0] <= now - WINDOW_S:
                recent.popleft()
            if quota.requests_per_minute is not None and len(recent) >= quota.requests_per_minute:
                wait = (recent[0] + WINDOW_S - now) if recent else WINDOW_S
                raise QuotaExceeded(
                    f"Request quota reached: {quota.requests_per_minute} request(s) per minute for {who}. "
                    f"Try again in {max(1, round(wait))} s.",
                    "requests_per_minute",
                    wait,
                )
            running = self._running.get(who, 0)
            if quota.running is not None and running >= quota.running:
                raise QuotaExceeded(
                    f"Running quota reached: {who} may have {quota.running} repl{'y' if quota.running == 1 else 'ies'} "
                    "running at once. Try again when one has finished.",
                    "running",
                    1,
                )
            recent.append(now)
            self._running[who] = running + 1
        return Ticket(self, who, kind, door)

    def _release(self, who: str) -> None:
        with self._lock:
            left = self._running.get(who, 0) - 1
            if left > 0:
                self._running[who] = left
            else:
                self._running.pop(who, None)

    def left_today(self, who: str, also: tuple[str, ...] = ()) -> tuple[int, int] | None:
        """(tokens left today, the daily quota) for `who`; None without a daily quota."""
        quota = self.for_(who, also)
        if quota.tokens_per_day is None:
            return None
        return max(0, quota.tokens_per_day - self.recorder.tokens_today(who)), quota.tokens_per_day
