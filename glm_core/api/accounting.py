"""A request under its caller's quotas (429 with Retry-After past one) and its usage recorded when it ends; the
records are written off the request's path (glm_core.admin.usage)."""

from __future__ import annotations

from ..admin.quotas import QuotaExceeded, Ticket
from ..protocol import Backend, Reply
from .access import Caller
from .errors import ApiError

__all__ = ["Ticket", "admit", "settle", "quota_error"]


def quota_error(exc: QuotaExceeded) -> ApiError:
    return ApiError(429, str(exc), f"quota_{exc.limit}", headers={"Retry-After": str(exc.retry_after_s)})


def admit(caller: Caller) -> Ticket | None:
    if caller.accounts is None:
        return None
    who, kind = caller.account
    try:
        return caller.accounts.quotas.admit(who, kind, "api", also=(caller.person,) if caller.person else ())
    except QuotaExceeded as exc:
        raise quota_error(exc) from None


def settle(ticket: Ticket | None, backend: Backend | None, reply: Reply | None) -> None:
    if ticket is not None:
        ticket.finish(backend.card() if backend is not None else None, reply)


def audit(caller: Caller, action: str, target: str | None = None, detail: dict | None = None) -> None:
    """An admin action through the API, in the audit log: who (the key's name or id, or this machine), and from
    which address."""
    if caller.accounts is None:
        return
    who, kind = caller.account
    caller.accounts.audit.record(f"key:{who}" if kind == "key" else who, action, target, detail, caller.client)
