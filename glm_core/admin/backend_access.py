"""Which backends a person may use: an admin may restrict a backend (a remote server, a large local model) to
listed people (emails or sign-in identities) and groups ("group:NAME", matched against the sign-in provider's
`groups` claim where it sends one). A backend with no rule is everyone's; others do not see a restricted one."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .db import AdminDB

GROUP = "group:"


@dataclass(frozen=True)
class Person:
    """Who is asking, as the access rules see them."""

    names: frozenset[str]  # lower-cased email and identity
    groups: frozenset[str] = frozenset()
    admin: bool = False

    @classmethod
    def from_user_info(cls, user_info: Mapping, admin: bool = False) -> Person:
        names = set()
        if user_info.get("is_logged_in"):
            if user_info.get("email"):
                names.add(str(user_info["email"]).strip().lower())
            if user_info.get("sub"):
                names.add(f"{user_info.get('iss') or ''}|{user_info['sub']}".lower())
        groups = user_info.get("groups") or []
        if isinstance(groups, str):
            groups = [groups]
        return cls(frozenset(names), frozenset(str(g).strip().lower() for g in groups), admin)


def clean_allowed(entries: Iterable[str]) -> list[str]:
    return sorted({e.strip().lower() for e in entries if e and e.strip()})


class BackendAccess:
    def __init__(self, db: AdminDB):
        self.db = db

    def rules(self) -> dict[str, list[str]]:
        with self.db.connect() as db:
            return {b: json.loads(a) for b, a in db.execute("SELECT backend, allowed FROM backend_access")}

    def restrict(self, backend: str, allowed: Iterable[str] | None, by: str | None = None) -> None:
        """Restrict `backend` to `allowed`; None or empty lifts the restriction."""
        allowed = clean_allowed(allowed or [])
        with self.db.connect() as db:
            if not allowed:
                db.execute("DELETE FROM backend_access WHERE backend = ?", (backend,))
                return
            db.execute(
                "INSERT INTO backend_access (backend, allowed, updated_at, updated_by) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(backend) DO UPDATE SET allowed = excluded.allowed, updated_at = excluded.updated_at, "
                "updated_by = excluded.updated_by",
                (backend, json.dumps(allowed), time.time(), by),
            )

    def allowed(self, backend: str) -> list[str] | None:
        """Who may use `backend` (None: everyone)."""
        with self.db.connect() as db:
            row = db.execute("SELECT allowed FROM backend_access WHERE backend = ?", (backend,)).fetchone()
        return json.loads(row[0]) if row else None

    def visible(self, names: Iterable[str], person: Person, rules: Mapping[str, list[str]] | None = None) -> list[str]:
        """The backends of `names` this person may see and use (admins see all)."""
        rules = self.rules() if rules is None else rules
        return [n for n in names if person.admin or may_use(rules.get(n), person)]


def may_use(allowed: list[str] | None, person: Person) -> bool:
    if not allowed:
        return True
    for entry in allowed:
        if entry.startswith(GROUP):
            if entry[len(GROUP) :] in person.groups:
                return True
        elif entry in person.names:
            return True
    return False
