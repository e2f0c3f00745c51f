"""Who may do what: the admin role, password attempts, and which model paths the pages may load.

The pages apply these rules (app_shared); they live here, free of streamlit, so they are tested directly.

- Roles. Admins load, unload and switch models, free memory, change the server's backends and run memory
  benchmarks above the size anyone may run. An admin is a signed-in identity listed in `.streamlit/secrets.toml`
  (`admins = ["alice@example.com", ...]`: emails, or `issuer|subject` identities), or a browser session that gave
  `admin_password`. With no secrets file at all, only browsers on the server's own machine are admins (one person
  on their own machine keeps every control; a colleague's browser on the network is a user).
- Password attempts (the access password and the admin password) are throttled per browser session and per
  client address: past MAX_FAILURES wrong answers within WINDOW_S, answers are refused unread until the oldest
  failure leaves the window; every failure is logged with the client's address.
- Model paths. With GLM_MODEL_DIRS set, the pages load only models inside those folders (symbolic links are
  resolved first, so a link cannot lead out). A refused path and a missing one get the same message, so the
  load form cannot be used to probe which files exist on the server.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .settings import EMBEDDED

log = logging.getLogger(__name__)

# A memory benchmark anyone may run (the Quantization page's defaults, the published tables' conditions); larger
# ones are for admins: a CPU takes minutes per level and gigabytes at these sizes already.
USER_BENCH_MAX_ENCODE = 2048
USER_BENCH_MAX_GENERATE = 8192


@dataclass(frozen=True)
class RolePolicy:
    """The admin rules of one deployment, read from its secrets (None: there is no secrets file)."""

    secrets_file: bool
    admins: frozenset[str] = frozenset()  # identities (as workspace.user_identity gives them) and emails
    admin_password: str | None = None

    @classmethod
    def from_secrets(cls, secrets: Mapping | None) -> RolePolicy:
        if secrets is None:
            return cls(secrets_file=False)
        listed = secrets.get("admins") or []
        if isinstance(listed, str):
            listed = [listed]
        admins = frozenset(str(a).strip().lower() for a in listed if str(a).strip())
        password = secrets.get("admin_password")
        return cls(True, admins, str(password) if password not in (None, "") else None)

    @property
    def local_admins(self) -> bool:
        """No secrets file: browsers on the server's own machine are admins, everyone else a user."""
        return not self.secrets_file

    def is_listed_admin(self, user_info: Mapping) -> bool:
        """A signed-in user named in `admins` by email or by identity (issuer|subject)."""
        if not user_info.get("is_logged_in") or not self.admins:
            return False
        email = str(user_info.get("email") or "").strip().lower()
        identity = f"{user_info.get('iss') or ''}|{user_info.get('sub') or ''}".lower()
        return bool(email and email in self.admins) or (bool(user_info.get("sub")) and identity in self.admins)

    def describe(self, local: bool = False) -> str:
        """One line for the pages: how one becomes admin here (`local`: the reader's browser is on the server's own
        machine)."""
        if self.local_admins:
            if local:
                return (
                    "You are an admin: this portal has no .streamlit/secrets.toml, so browsers on the server's "
                    "own machine are admins and browsers elsewhere are users."
                )
            return (
                "Only browsers on the server's own machine are admins here. To name others, the server's "
                "owner sets `admins` (with sign-in) or `admin_password` in .streamlit/secrets.toml."
            )
        ways = []
        if self.admins:
            ways.append("sign in as a listed admin")
        if self.admin_password:
            ways.append("give the admin password")
        if not ways:
            return (
                "This portal names no admins (secrets.toml has neither `admins` nor `admin_password`): models "
                "stay as they are."
            )
        return (
            "Loading, unloading and switching models, freeing memory and large benchmarks are for admins: "
            + " or ".join(ways)
            + "."
        )

    def startup_notice(self) -> str:
        """What the portal prints when it starts: who is admin, and how to change it."""
        if self.local_admins:
            return (
                "Admins: browsers on this machine only (no .streamlit/secrets.toml); others are users. Name "
                "admins with `admins = [...]` (sign-in) or `admin_password` in .streamlit/secrets.toml."
            )
        return "Admins: " + self.describe()


def is_local_client(address: str | None) -> bool:
    """Whether a client address is the server's own machine. None is what Streamlit's `st.context.ip_address` gives
    for 127.0.0.1 and ::1 (and outside a browser connection). A dual-stack listener sees an IPv4 client as
    `::ffff:127.0.0.1`, whose `is_loopback` is False on Python 3.11: an IPv4-mapped address is its IPv4 address."""
    if address is None:
        return True
    ip = _client_ip(address)
    return ip.is_loopback if ip is not None else address == "localhost"


def _client_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A client's address as an IP (its IPv6 zone dropped; an IPv4-mapped one as its IPv4 address); None: no IP."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


# ---- password attempts ---------------------------------------------------------------------------------------

MAX_FAILURES = 5
WINDOW_S = 300.0


@dataclass
class AttemptThrottle:
    """Failed password attempts per key ("session:..." and "client:..."), in a sliding window; shared by every
    session of the process (one instance behind st.cache_resource)."""

    max_failures: int = MAX_FAILURES
    window_s: float = WINDOW_S
    clock: callable = time.monotonic
    _failures: dict[str, deque] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def attempt(self, keys: Iterable[str], matches: Callable[[], bool], what: str, client: str | None) -> float | bool:
        """One password attempt: refused unread while one of `keys` is throttled (returns the seconds to wait), else
        `matches()` (returns whether it did) and a failure counted. Check, comparison and count are one lock
        section, so attempts sent at once cannot slip past the limit together."""
        keys = list(keys)
        with self._lock:
            now = self.clock()
            wait = max(
                (
                    times[0] + self.window_s - now
                    for times in (self._prune(key, now) for key in keys)
                    if len(times) >= self.max_failures
                ),
                default=0.0,
            )
            if wait > 0:
                log.warning("%s attempt from client %s refused unread (throttled)", what, client or "unknown")
                return wait
            if matches():
                for key in keys:
                    if key.startswith("session:"):  # a client address may be shared (NAT): it keeps its count
                        self._failures.pop(key, None)
                return True
            counts = []
            for key in keys:
                times = self._prune(key, now)
                times.append(now)
                counts.append(len(times))
            if len(self._failures) > 100_000:  # many clients: forget the quiet ones
                for key in [k for k, v in self._failures.items() if not v]:
                    del self._failures[key]
        log.warning(
            "wrong %s from client %s (%d failure(s) in the last %g s)",
            what,
            client or "unknown",
            max(counts, default=1),
            self.window_s,
        )
        return False

    def _prune(self, key: str, now: float) -> deque:
        times = self._failures.setdefault(key, deque())
        while times and times[0] <= now - self.window_s:
            times.popleft()
        return times


def throttle_keys(session_id: str, client: str | None) -> list[str]:
    """The counts an attempt goes against: its browser session's and its client's. An IPv6 client counts per /64
    (one host usually holds a whole /64, so a fresh address per guess gains nothing); an IPv4-mapped one as IPv4."""
    return [f"session:{session_id}"] + ([f"client:{_client_network(client)}"] if client else [])


def _client_network(client: str) -> str:
    ip = _client_ip(client)
    if ip is None:
        return client
    return str(ipaddress.IPv6Network((ip, 64), strict=False)) if ip.version == 6 else str(ip)


def refusal(wait_s: float) -> str:
    return f"Too many wrong passwords. Try again in {max(1, round(wait_s))} s."


# ---- model paths -------------------------------------------------------------------------------------------


class PathNotAllowed(ValueError):
    pass


def check_model_path(path_text: str, roots: Iterable[Path]) -> str:
    """`path_text` if the pages may load it: the embedded model always; with `roots`, only paths inside one
    of them (after resolving links). The message is the same for a refused path and a missing one."""
    text = path_text.strip()
    roots = [Path(r).expanduser().resolve() for r in roots]
    if text == EMBEDDED or not roots:
        return text
    if not text:
        raise PathNotAllowed("give a model folder or .gguf file")
    resolved = Path(text).expanduser().resolve()
    if not any(resolved == root or root in resolved.parents for root in roots):
        raise PathNotAllowed(
            f"models load only from {', '.join(str(r) for r in roots)} (GLM_MODEL_DIRS); {text[:200]!r} is not there"
        )
    return str(resolved)


# ---- memory benchmarks -----------------------------------------------------------------------------------------


class NotAllowed(ValueError):
    """Something only admins may do; str(error) says what."""


def check_benchmark(
    source: str, encode: int, generate: int, *, admin: bool, presets: Iterable[str], loaded_path: str | None
) -> None:
    """Anyone may benchmark an architecture preset or the loaded model up to the user sizes; admins anything."""
    if admin:
        return
    if source.strip().lower() not in set(presets) and source != loaded_path:
        raise NotAllowed("benchmarks of model folders on the server are for admins")
    if encode > USER_BENCH_MAX_ENCODE or generate > USER_BENCH_MAX_GENERATE:
        raise NotAllowed(
            f"benchmarks above {USER_BENCH_MAX_ENCODE:,} prompt tokens or a "
            f"{USER_BENCH_MAX_GENERATE:,}-token context are for admins"
        )
