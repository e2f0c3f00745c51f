"""The administration commands: `keys create|list|revoke`, `usage`, `quota set|list`, `audit`. They act on the data
folder (GLM_DATA_DIR) the portal uses, and each change is in the audit log as made from the command line by the
account that ran it."""

from __future__ import annotations

import argparse
import getpass
import json
import socket
from datetime import UTC, datetime

from . import Admin, admin_for
from .keys import KeyProblem
from .quotas import DEFAULT, Quota
from .usage import GROUPS, to_csv, usage_summary


def _actor() -> tuple[str, str]:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"cli:{user}", f"cli@{socket.gethostname()}"


def _admin() -> Admin:
    return admin_for()


def _date(value: str) -> str:
    try:
        return datetime.strptime(value, "%Y-%m-%d").strftime("%Y-%m-%d")
    except ValueError:
        raise argparse.ArgumentTypeError(f"give a date as YYYY-MM-DD, not {value!r}") from None


def _when(at: float | None) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M UTC") if at else "-"


def cmd_keys_create(args) -> int:
    admin, (actor, client) = _admin(), _actor()
    try:
        record, key = admin.keys.create(
            args.name, admin=args.admin, expires_days=args.expires_days, owner=args.owner, created_by=actor
        )
    except KeyProblem as exc:
        raise ValueError(str(exc)) from None
    admin.audit.record(
        actor, "key.create", record.name, {"admin": record.admin, "expires_at": record.expires_at}, client
    )
    if args.json:
        print(json.dumps({**record.public(), "key": key}))
    else:
        print(f"key {record.name!r} created; it is shown this once, keep it now:\n{key}")
    return 0


def cmd_keys_list(args) -> int:
    keys = [k.public() for k in _admin().keys.list()]
    if args.json:
        print(json.dumps(keys))
        return 0
    for k in keys:
        flags = " admin" if k["admin"] else ""
        print(f"{k['name']:<24} {k['prefix']}...  {k['state']:<8}{flags}  expires {_when(k['expires_at'])}")
    return 0


def cmd_keys_revoke(args) -> int:
    admin, (actor, client) = _admin(), _actor()
    try:
        record = admin.keys.revoke(args.name)
    except KeyProblem as exc:
        raise ValueError(str(exc)) from None
    admin.audit.record(actor, "key.revoke", record.name, {}, client)
    print(f"key {record.name!r} revoked")
    return 0


def cmd_usage(args) -> int:
    admin = _admin()
    admin.usage.flush()
    rows = usage_summary(admin.db, args.since, tuple(args.by or ("person", "model", "day")))
    if args.json:
        print(json.dumps(rows))
    else:
        print(to_csv(rows), end="")
    return 0


def cmd_quota_set(args) -> int:
    admin, (actor, client) = _admin(), _actor()
    name = DEFAULT if args.default else args.name
    if not name:
        raise ValueError("give --name NAME (a person or a key's name) or --default")
    quota = Quota(args.tokens_per_day, args.requests_per_minute, args.running)
    admin.quotas.set(name, quota, by=actor)
    admin.audit.record(actor, "quota.set", name, quota.public(), client)
    if args.json:
        print(json.dumps({"name": name, **quota.public()}))
    else:
        print(f"quota for {name} removed" if quota.unlimited else f"quota for {name}: {quota.public()}")
    return 0


def cmd_quota_list(args) -> int:
    quotas = {name: q.public() for name, q in _admin().quotas.all().items()}
    print(json.dumps(quotas) if args.json else "\n".join(f"{n}: {q}" for n, q in quotas.items()))
    return 0


def cmd_audit(args) -> int:
    entries = [e.public() for e in _admin().audit.entries(limit=args.limit)]
    if args.json:
        print(json.dumps(entries))
    else:
        for e in entries:
            print(f"{_when(e['at'])}  {e['actor']}  {e['action']}  {e['target'] or ''}  {e['client'] or ''}")
    return 0


def add_commands(sub) -> None:
    keys = sub.add_parser("keys", help="personal API keys kept by the portal (hashed; each shown once)")
    keys_sub = keys.add_subparsers(dest="keys", required=True)
    create = keys_sub.add_parser("create", help="make a key and print it (the only time it is shown)")
    create.add_argument("--name", required=True, help="what the key is called in listings, usage and quotas")
    create.add_argument("--admin", action="store_true", help="the key may also call admin routes (/free_gc)")
    create.add_argument("--expires-days", type=float, help="the key stops working after this many days")
    create.add_argument("--owner", help="the person the key belongs to (their quota applies when the key has none)")
    create.add_argument("--json", action="store_true")
    create.set_defaults(func=cmd_keys_create)
    listing = keys_sub.add_parser("list", help="the keys (never the keys themselves)")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_keys_list)
    revoke = keys_sub.add_parser("revoke", help="stop a key working at once")
    revoke.add_argument("--name", required=True)
    revoke.set_defaults(func=cmd_keys_revoke)

    usage = sub.add_parser("usage", help="requests and tokens per person, model and day (browser and API)")
    usage.add_argument("--since", type=_date, help="from this day on (YYYY-MM-DD, UTC)")
    usage.add_argument(
        "--by", action="append", choices=list(GROUPS), help="group by (repeat for several; default person, model, day)"
    )
    usage.add_argument("--json", action="store_true", help="JSON (default: CSV)")
    usage.set_defaults(func=cmd_usage)

    quota = sub.add_parser("quota", help="quotas per person or key, and the default for everyone")
    quota_sub = quota.add_subparsers(dest="quota", required=True)
    qset = quota_sub.add_parser("set", help="set a quota (a limit left out means none; all left out removes it)")
    who = qset.add_mutually_exclusive_group(required=True)
    who.add_argument("--name", help="a person (email or identity) or a key's name")
    who.add_argument("--default", action="store_true", help="everyone without a quota of their own")
    qset.add_argument("--tokens-per-day", type=int, help="prompt and reply tokens per UTC day")
    qset.add_argument("--requests-per-minute", type=int)
    qset.add_argument("--running", type=int, help="replies running at once")
    qset.add_argument("--json", action="store_true")
    qset.set_defaults(func=cmd_quota_set)
    qlist = quota_sub.add_parser("list", help="the quotas set")
    qlist.add_argument("--json", action="store_true")
    qlist.set_defaults(func=cmd_quota_list)

    audit = sub.add_parser("audit", help="the audit log, newest first")
    audit.add_argument("--limit", type=int, default=100)
    audit.add_argument("--json", action="store_true")
    audit.set_defaults(func=cmd_audit)
