"""Who is calling: the API key in `Authorization: Bearer ...` (compared in constant time), or, without keys
configured, an anonymous client, which only this machine's (loopback) clients may be unless the server is told
otherwise. Keys come from the configuration (GLM_API_KEYS, secrets.toml) and from the portal's own key store
(glm_core.admin.keys: personal keys, created and revoked by admins); as soon as either holds a live key, every
caller needs one. A caller's `scope` keeps one key's cached conversations apart from every other key's; its
`owner` bounds its share of the model's queue; its `account` is whom its usage and quotas count against."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from ..access import is_local_client
from ..admin.backend_access import Person, may_use
from ..admin.keys import ApiKey, KeyRefused
from ..backends.config import DEFAULT_LOCAL_NAME
from .config import ApiConfig
from .errors import ApiError

if TYPE_CHECKING:
    from ..admin import Admin


@dataclass(frozen=True)
class BrowserHeaders:
    """What a request says about the page that sent it: Host, Origin and Sec-Fetch-Site (None when absent)."""

    host: str | None
    origin: str | None = None
    fetch_site: str | None = None


@dataclass(frozen=True)
class Caller:
    key_id: str | None  # "key-" + 12 hex digits of the key's SHA-256: safe to log, names the key
    admin: bool
    client: str  # the client's address
    name: str | None = None  # a personal key's name (the portal's key store)
    person: str | None = None  # the person a personal key belongs to, where it names one
    accounts: Admin | None = field(default=None, compare=False, repr=False)  # usage and quotas

    @property
    def owner(self) -> str | None:
        """The queue share: one per key. Anonymous clients on this machine share only the global bound."""
        return self.key_id if self.key_id else (None if _is_loopback(self.client) else f"client-{self.client}")

    @property
    def scope(self) -> str:
        return self.key_id or f"anonymous-{self.client}"

    @property
    def account(self) -> tuple[str, str]:
        """(who, kind) for usage and quotas: a personal key's name, a configured key's id, else the client."""
        if self.name:
            return self.name, "key"
        if self.key_id:
            return self.key_id, "key"
        return ("local" if _is_loopback(self.client) else f"client-{self.client}"), "client"


def key_id(key: str) -> str:
    return "key-" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]


class Access:
    def __init__(self, config: ApiConfig, accounts: Admin | None = None, backend_name: str = DEFAULT_LOCAL_NAME):
        self.config, self.accounts = config, accounts
        self.backend_name = backend_name  # the hub's name of the backend this API serves (access rules name it)
        # Only digests are kept and compared: equal lengths, and compare_digest runs in constant time.
        self._keys = [(hashlib.sha256(k.encode("utf-8")).digest(), key_id(k), False) for k in config.keys]
        self._keys += [(hashlib.sha256(k.encode("utf-8")).digest(), key_id(k), True) for k in config.admin_keys]

    def identify(self, authorization: str | None, client: str, **options) -> Caller:
        """The caller (see `_identify`), or 403 when an admin restricted the served backend to others."""
        caller = self._identify(authorization, client, **options)
        if self.accounts is not None and not caller.admin:
            allowed = self.accounts.backend_access.allowed(self.backend_name)
            names = frozenset(n.lower() for n in (caller.name, caller.person) if n)
            if allowed and not may_use(allowed, Person(names)):
                raise ApiError(
                    403,
                    f"the model {self.backend_name!r} is restricted to listed people and keys",
                    "backend_restricted",
                )
        return caller

    def _identify(
        self,
        authorization: str | None,
        client: str,
        *,
        key_optional: bool = False,
        browser: BrowserHeaders | None = None,
    ) -> Caller:
        """The caller, or ApiError 401 (missing or wrong key) / 403 (a client this server does not answer)."""
        given = _bearer(authorization)
        if self.keys_required():
            if given is not None:
                return self._match(given, client)
            if not key_optional:
                raise ApiError(401, "this API needs a key: send `Authorization: Bearer <key>`", "missing_api_key")
            self._check_browser(browser)  # GLM_API_SEEDS_WITHOUT_KEY: the seeds' old clients send no key
            return Caller(None, admin=False, client=client, accounts=self.accounts)
        if given is not None and self.accounts is not None:
            self._refuse_dead_key(self.accounts, given)  # a revoked or expired key is refused even where none is needed
        if not (self.config.open_to_network or _is_loopback(client)):
            raise ApiError(
                403,
                "without API keys configured, this server answers only clients on its own machine "
                "(set GLM_API_KEYS, or GLM_API_OPEN_TO_NETWORK=1)",
                "remote_client",
            )
        self._check_browser(browser)
        # Without keys, this machine's clients may do what the portal's admins may (the portal without a secrets
        # file makes this machine's browsers admins); other machines' clients, when let in, may not change it.
        return Caller(None, admin=_is_loopback(client), client=client, accounts=self.accounts)

    def keys_required(self) -> bool:
        """Keys configured, or any live key in the portal's store."""
        return self.config.keys_configured or (self.accounts is not None and self.accounts.keys.any_live())

    def _check_browser(self, browser: BrowserHeaders | None) -> None:
        """Without a key, a request proves nothing about who sent it, so a web page must not be able to send one:
        a DNS-rebinding name (a Host that is not this machine's), another site's Origin, or a cross-site request a
        page makes without one (`<img src=".../free_gc">`, told by Sec-Fetch-Site) is refused. The seeds' clients
        and other programs send no Origin nor Sec-Fetch-Site and keep working."""
        if browser is None:
            return
        host = _host_name(browser.host)
        if not (self.config.open_to_network or _is_loopback(host) or host in self.config.allowed_hosts):
            raise ApiError(
                403,
                f"this server answers requests addressed to this machine, not to {host[:100]!r} "
                "(add public names to GLM_API_ALLOWED_HOSTS, or configure API keys)",
                "foreign_host",
            )
        if browser.origin is not None:
            origin = _host_name(urlsplit(browser.origin).netloc)
            if origin != host and origin not in self.config.allowed_hosts:
                raise ApiError(403, "requests from other sites' pages are refused without an API key", "cross_site")
        elif browser.fetch_site in ("cross-site", "same-site"):
            raise ApiError(403, "requests from other sites' pages are refused without an API key", "cross_site")

    def _match(self, given: str, client: str) -> Caller:
        digest = hashlib.sha256(given.encode("utf-8")).digest()
        found = None
        for stored, ident, admin in self._keys:  # no early exit: the time does not tell which key matched
            if hmac.compare_digest(digest, stored) and found is None:
                found = Caller(ident, admin, client, accounts=self.accounts)
        if found is not None:
            return found
        if self.accounts is not None:
            record = self._refuse_dead_key(self.accounts, given)
            if record is not None:
                return Caller(
                    record.key_id, record.admin, client, name=record.name, person=record.owner, accounts=self.accounts
                )
        raise ApiError(401, "the API key is not valid", "invalid_api_key")

    @staticmethod
    def _refuse_dead_key(accounts: Admin, given: str) -> ApiKey | None:
        """The portal's record of a live key; 401 for a key it revoked or that expired; None: not its key."""
        try:
            return accounts.keys.verify(given)
        except KeyRefused as refused:
            if refused.reason == "expired":
                raise ApiError(401, f"the API key {refused.name!r} has expired", "expired_api_key") from None
            if refused.reason == "revoked":
                raise ApiError(401, f"the API key {refused.name!r} was revoked", "revoked_api_key") from None
        return None


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def _is_loopback(host: str) -> bool:
    return bool(host) and is_local_client(host)


def _host_name(host: str | None) -> str:
    """The name in a Host header (or an Origin's authority), without the port, lower-cased; [::1] -> ::1."""
    host = (host or "").strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host
