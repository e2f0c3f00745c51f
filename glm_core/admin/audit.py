"""The audit log: what admins (and the portal on their behalf) changed, by whom, when and from where.

Entries name things (a key's name, a model's path, a backend's name, a conversation's id), never a key, a
password or a prompt: `record` refuses a detail that holds a portal key.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from .db import AdminDB
from .keys import KEY_PREFIX

_KEY_RE = re.compile(re.escape(KEY_PREFIX) + r"[A-Za-z0-9_-]{30,}")

ACTIONS = (
    "model.load",
    "model.unload",
    "backend.add",
    "backend.remove",
    "backend.access",
    "key.create",
    "key.revoke",
    "quota.set",
    "role.admin_granted",
    "role.admin_left",
    "settings.change",
    "memory.free",
    "share.create",
    "share.revoke",
)


@dataclass(frozen=True)
class AuditEntry:
    at: float
    actor: str
    action: str
    target: str | None
    detail: dict
    client: str | None

    def public(self) -> dict:
        return {
            "at": self.at,
            "actor": self.actor,
            "action": self.action,
            "target": self.target,
            "detail": self.detail,
            "client": self.client,
        }


class AuditLog:
    def __init__(self, db: AdminDB):
        self.db = db

    def record(
        self, actor: str, action: str, target: str | None = None, detail: dict | None = None, client: str | None = None
    ) -> None:
        if action not in ACTIONS:
            raise ValueError(f"unknown audit action {action!r}")
        text = json.dumps(detail or {}, ensure_ascii=False, sort_keys=True)
        if _KEY_RE.search(text):
            raise ValueError("an audit entry must not hold an API key")
        with self.db.connect() as db:
            db.execute(
                "INSERT INTO audit (at, actor, action, target, detail, client) VALUES (?, ?, ?, ?, ?, ?)",
                (time.time(), actor or "unknown", action, target, text, client),
            )

    def entries(self, since: float | None = None, limit: int = 1000) -> list[AuditEntry]:
        where, args = ("WHERE at >= ?", (since,)) if since is not None else ("", ())
        with self.db.connect() as db:
            rows = db.execute(
                f"SELECT at, actor, action, target, detail, client FROM audit {where} ORDER BY id DESC LIMIT ?",
                (*args, limit),
            ).fetchall()
        return [AuditEntry(r[0], r[1], r[2], r[3], json.loads(r[4] or "{}"), r[5]) for r in rows]


def without_credentials(url: str) -> str:
    """A server's address for the log: any user:password@ in it dropped."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
