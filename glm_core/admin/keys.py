"""Personal API keys kept by the portal: made with 256 random bits, shown once, stored as their SHA-256 digest.

A key is looked up by its digest. A slow password hash (argon2, bcrypt) buys nothing here: it protects guessable
secrets, and a 256-bit random key cannot be guessed; SHA-256 is what GitHub and Stripe do for tokens like these.
Revoked keys stay listed (their name may be given to a new key); expired ones stop working at their time.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import sqlite3
import time
from dataclasses import dataclass

from .db import AdminDB

KEY_PREFIX = "glm_"
NAME_RE = re.compile(r"[A-Za-z0-9@._+-]{1,64}")
SHOWN_PREFIX_CHARS = 8


class KeyProblem(ValueError):
    """A key could not be made or found; str(error) says why."""


class KeyRefused(Exception):
    """A key was given but does not open the API: `reason` is "invalid", "expired" or "revoked"."""

    def __init__(self, reason: str, name: str | None = None):
        super().__init__(reason)
        self.reason, self.name = reason, name


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    prefix: str
    admin: bool
    owner: str | None
    created_at: float
    created_by: str | None
    expires_at: float | None
    revoked_at: float | None
    last_used_at: float | None

    @property
    def key_id(self) -> str:
        return f"key-{self.id}"

    def state(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"

    def public(self) -> dict:
        """What listings show (never the key or its digest)."""
        return {
            "id": self.id,
            "name": self.name,
            "prefix": self.prefix,
            "admin": self.admin,
            "owner": self.owner,
            "created_at": self.created_at,
            "created_by": self.created_by,
            "expires_at": self.expires_at,
            "revoked_at": self.revoked_at,
            "last_used_at": self.last_used_at,
            "state": self.state(),
        }


_COLUMNS = "id, name, prefix, admin, owner, created_at, created_by, expires_at, revoked_at, last_used_at"
LAST_USED_EVERY_S = 60.0  # last_used_at is written at most this often per key: a request is not a write


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _row(row) -> ApiKey:
    return ApiKey(row[0], row[1], row[2], bool(row[3]), *row[4:])


class KeyStore:
    def __init__(self, db: AdminDB):
        self.db = db

    def create(
        self,
        name: str,
        *,
        admin: bool = False,
        expires_days: float | None = None,
        owner: str | None = None,
        created_by: str | None = None,
    ) -> tuple[ApiKey, str]:
        """A new key: its record and the key itself (shown once; only its digest is kept)."""
        if not NAME_RE.fullmatch(name or ""):
            raise KeyProblem(f"a key's name is 1 to 64 letters, digits or @ . _ + -; got {name!r}")
        if expires_days is not None and expires_days <= 0:
            raise KeyProblem("--expires-days must be more than 0")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        now = time.time()
        record = ApiKey(
            secrets.token_hex(6),
            name,
            key[: len(KEY_PREFIX) + SHOWN_PREFIX_CHARS],
            admin,
            owner,
            now,
            created_by,
            now + expires_days * 86400 if expires_days is not None else None,
            None,
            None,
        )
        try:
            with self.db.connect() as db:
                db.execute(
                    f"INSERT INTO api_keys ({_COLUMNS}, digest) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (*_values(record), digest(key)),
                )
        except sqlite3.IntegrityError:
            raise KeyProblem(f"a live key is already named {name!r}; revoke it first or choose another name") from None
        return record, key

    def list(self, owner: str | None = None) -> list[ApiKey]:
        query, args = f"SELECT {_COLUMNS} FROM api_keys", ()
        if owner is not None:
            query, args = query + " WHERE owner = ?", (owner,)
        with self.db.connect() as db:
            return [_row(r) for r in db.execute(query + " ORDER BY created_at", args)]

    def get(self, name: str) -> ApiKey | None:
        with self.db.connect() as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM api_keys WHERE name = ? AND revoked_at IS NULL", (name,))
            found = row.fetchone()
        return _row(found) if found else None

    def revoke(self, name: str, owner: str | None = None) -> ApiKey:
        """Revoke the live key of that name (`owner`: only if it is theirs)."""
        with self.db.transaction() as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM api_keys WHERE name = ? AND revoked_at IS NULL", (name,))
            found = row.fetchone()
            if found is None or (owner is not None and found[4] != owner):
                raise KeyProblem(f"no live key is named {name!r}")
            now = time.time()
            db.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ?", (now, found[0]))
        record = _row(found)
        return ApiKey(**{**record.__dict__, "revoked_at": now})

    def any_live(self) -> bool:
        """Whether any key is active now: then the API asks every caller for one."""
        with self.db.connect() as db:
            row = db.execute(
                "SELECT 1 FROM api_keys WHERE revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?) LIMIT 1",
                (time.time(),),
            ).fetchone()
        return row is not None

    def verify(self, key: str) -> ApiKey:
        """The record of a live key, or KeyRefused."""
        with self.db.connect() as db:
            found = db.execute(f"SELECT {_COLUMNS} FROM api_keys WHERE digest = ?", (digest(key),)).fetchone()
            if found is None:
                raise KeyRefused("invalid")
            record = _row(found)
            state = record.state()
            if state != "active":
                raise KeyRefused(state, record.name)
            now = time.time()
            if record.last_used_at is None or now - record.last_used_at > LAST_USED_EVERY_S:
                db.execute("UPDATE api_keys SET last_used_at = ? WHERE id = ?", (now, record.id))
        return record


def _values(record: ApiKey) -> tuple:
    return (
        record.id,
        record.name,
        record.prefix,
        int(record.admin),
        record.owner,
        record.created_at,
        record.created_by,
        record.expires_at,
        record.revoked_at,
        record.last_used_at,
    )
