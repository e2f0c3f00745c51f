"""Who is calling: the API key in `Authorization: Bearer ...` (compared in constant time), or, without keys
configured, an anonymous client, which only this machine's (loopback) clients may be unless the server is told
otherwise. A caller's `scope` keeps one key's cached conversations apart from every other key's; its `owner`
bounds its share of the model's queue."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from ..access import is_local_client
from .config import ApiConfig
from .errors import ApiError


@dataclass(frozen=True)
class Caller:
    key_id: str | None  # "key-" + 12 hex digits of the key's SHA-256: safe to log, names the key
    admin: bool
    client: str  # the client's address

    @property
    def owner(self) -> str | None:
        """The queue share: one per key. Anonymous clients on this machine share only the global bound."""
        return self.key_id if self.key_id else (None if _is_loopback(self.client) else f"client-{self.client}")

    @property
    def scope(self) -> str:
        return self.key_id or f"anonymous-{self.client}"


def key_id(key: str) -> str:
    return "key-" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]


class Access:
    def __init__(self, config: ApiConfig):
        self.config = config
        # Only digests are kept and compared: equal lengths, and compare_digest runs in constant time.
        self._keys = [(hashlib.sha256(k.encode("utf-8")).digest(), key_id(k), False) for k in config.keys]
        self._keys += [(hashlib.sha256(k.encode("utf-8")).digest(), key_id(k), True) for k in config.admin_keys]

    def identify(self, authorization: str | None, client: str, *, key_optional: bool = False) -> Caller:
        """The caller, or ApiError 401 (missing or wrong key) / 403 (a client this server does not answer)."""
        given = _bearer(authorization)
        if self.config.keys_configured:
            if given is not None:
                return self._match(given, client)
            if key_optional:  # GLM_API_SEEDS_WITHOUT_KEY: the seeds' old clients send no key
                return Caller(None, admin=False, client=client)
            raise ApiError(401, "this API needs a key: send `Authorization: Bearer <key>`", "missing_api_key")
        if not (self.config.open_to_network or _is_loopback(client)):
            raise ApiError(403, "without API keys configured, this server answers only clients on its own machine "
                                "(set GLM_API_KEYS, or GLM_API_OPEN_TO_NETWORK=1)", "remote_client")
        # Without keys, this machine's clients may do what the portal's admins may (the portal without a secrets
        # file makes this machine's browsers admins); other machines' clients, when let in, may not change it.
        return Caller(None, admin=_is_loopback(client), client=client)

    def _match(self, given: str, client: str) -> Caller:
        digest = hashlib.sha256(given.encode("utf-8")).digest()
        found = None
        for stored, ident, admin in self._keys:  # no early exit: the time does not tell which key matched
            if hmac.compare_digest(digest, stored) and found is None:
                found = Caller(ident, admin, client)
        if found is None:
            raise ApiError(401, "the API key is not valid", "invalid_api_key")
        return found


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def _is_loopback(host: str) -> bool:
    return bool(host) and is_local_client(host)
