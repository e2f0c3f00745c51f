"""What every route shares (the backend of the moment, who may call, the limits, the stateless conversations)
and the FastAPI dependencies that hand it to them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..protocol import Backend
from .access import Access, BrowserHeaders, Caller
from .config import ApiConfig, ApiLimits
from .conversation_ids import StatelessConversations
from .errors import ApiError

if TYPE_CHECKING:
    from ..admin import Admin


@dataclass
class ApiState:
    current_backend: Callable[[], Backend | None]  # the hub's engine now: a model may be loaded or replaced
    access: Access
    limits: ApiLimits
    conversations: StatelessConversations

    @classmethod
    def create(
        cls,
        current_backend: Callable[[], Backend | None],
        config: ApiConfig,
        accounts: Admin | None = None,
        backend_name: str | None = None,
    ) -> ApiState:
        def forget(conversation_id: str) -> None:
            backend = current_backend()
            if backend is not None:
                backend.forget(conversation_id)

        return cls(
            current_backend,
            Access(config, accounts, *([backend_name] if backend_name else [])),
            config.limits,
            StatelessConversations(forget),
        )


# Declared so /docs offers an "Authorize" button; the check itself is Access.identify.
_bearer = HTTPBearer(auto_error=False, description="An API key (GLM_API_KEYS); without keys configured, none.")


def api_state(request: Request) -> ApiState:
    return request.app.state.api


def _client(request: Request) -> str:
    return request.client.host if request.client else ""


def _browser(request: Request) -> BrowserHeaders:
    headers = request.headers
    return BrowserHeaders(headers.get("host"), headers.get("origin"), headers.get("sec-fetch-site"))


def api_caller(
    request: Request,
    state: ApiState = Depends(api_state),
    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
) -> Caller:
    """Every route but /health: a valid key when keys are configured."""
    return state.access.identify(request.headers.get("authorization"), _client(request), browser=_browser(request))


def seed_caller(
    request: Request,
    state: ApiState = Depends(api_state),
    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
) -> Caller:
    """The seeds' routes: like api_caller, but keyless when GLM_API_SEEDS_WITHOUT_KEY says so."""
    return state.access.identify(
        request.headers.get("authorization"),
        _client(request),
        key_optional=state.access.config.seeds_without_key,
        browser=_browser(request),
    )


def admin_caller(caller: Caller = Depends(api_caller)) -> Caller:
    if not caller.admin:
        raise ApiError(403, "this route changes the server: it needs an admin key (GLM_API_ADMIN_KEYS)", "not_admin")
    return caller


def loaded_backend(state: ApiState = Depends(api_state)) -> Backend:
    backend = state.current_backend()
    if backend is None:
        raise ApiError(503, "no model is loaded yet; try again in a moment", "no_model")
    return backend
