"""The administration records of one data folder: personal API keys (hashed), usage, quotas, the audit log and
who may use which backend, in their own SQLite file (WAL) beside the conversation store.

Apart from conversations.sqlite3 so that the usage writer's batches never wait on (or hold up) a conversation's
writes, and so that this schema moves on its own versions. Every API request reads it (its key, its quota), so
each thread keeps one connection open: opening one costs about 0.5 ms, a query on an open one about 20 us
(`bench accounting`). WAL lets the portal's threads and the CLI read while one of them writes.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DB_NAME = "admin.sqlite3"
SCHEMA_VERSION = 1

_SCHEMA_V1 = """
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,            -- 12 hex digits; "key-" + id names the key in logs and queue shares
    name TEXT NOT NULL,
    digest TEXT NOT NULL UNIQUE,    -- SHA-256 of the key (hex); the key itself is shown once and never stored
    prefix TEXT NOT NULL,           -- its first characters, so a person can tell their keys apart
    admin INTEGER NOT NULL DEFAULT 0,
    owner TEXT,                     -- the person it belongs to (who made it for themselves), NULL: a service key
    created_at REAL NOT NULL,
    created_by TEXT,
    expires_at REAL,
    revoked_at REAL,
    last_used_at REAL
);
CREATE UNIQUE INDEX api_keys_live_name ON api_keys(name) WHERE revoked_at IS NULL;
CREATE TABLE usage (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    day TEXT NOT NULL,              -- UTC date, YYYY-MM-DD
    who TEXT NOT NULL,              -- a person, a key's name or a workspace
    kind TEXT NOT NULL,             -- person | key | workspace | client
    door TEXT NOT NULL,             -- browser | api
    backend TEXT,
    model TEXT,
    level TEXT,                     -- precision level
    prompt_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    ttft_s REAL,
    duration_s REAL,
    outcome TEXT                    -- the finish reason, or "error"
);
CREATE INDEX usage_by_who_day ON usage(who, day);
CREATE INDEX usage_by_day ON usage(day);
CREATE TABLE quotas (
    name TEXT PRIMARY KEY,          -- a person, a key's name, or "*" (everyone without their own)
    tokens_per_day INTEGER,
    requests_per_minute INTEGER,
    running INTEGER,
    updated_at REAL NOT NULL,
    updated_by TEXT
);
CREATE TABLE audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT,
    detail TEXT,
    client TEXT
);
CREATE INDEX audit_by_time ON audit(at);
CREATE TABLE backend_access (
    backend TEXT PRIMARY KEY,
    allowed TEXT NOT NULL,          -- JSON list of people (emails, identities) and groups ("group:NAME")
    updated_at REAL NOT NULL,
    updated_by TEXT
);
CREATE TABLE admin_settings (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL             -- JSON
);
"""

MIGRATIONS = {1: _SCHEMA_V1}


class AdminDB:
    def __init__(self, data_dir: Path | str):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.data_dir / DB_NAME
        self._local = threading.local()
        with self.connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            if db.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
                self._migrate(db)

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        db.execute("BEGIN IMMEDIATE")
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"{DB_NAME} is schema version {version}, newer than this app ({SCHEMA_VERSION})")
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[step].split(";\n"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version={step}")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection (autocommit: each statement is its own transaction unless one is begun)."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=True)
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        yield db

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self.connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
