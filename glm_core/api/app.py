"""The API as one FastAPI application over whatever backend is loaded now: `create_app(current_backend)`.

`python -m glm_core serve` runs it alone with uvicorn; the portal mounts the same application on its own port
(portal.py), so browser chats and API clients share one model and one batch.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException

from ..admin import Admin, admin_for
from ..protocol import Backend
from . import completions, openai_routes, responses, seed_routes
from .config import ApiConfig, load_api_config
from .errors import error_body, install_error_handlers
from .generation import model_name
from .state import ApiState, api_state

DESCRIPTION = """The GLM Chat Dashboard's model over HTTP: OpenAI-compatible routes under `/v1`, and the routes of
the documents this project grew from (ChatGLM's api.py, a stream API, the GLM API) with their exact fields.

With API keys configured (`GLM_API_KEYS`, `GLM_API_ADMIN_KEYS` or `api_keys` in `.streamlit/secrets.toml`), every
route but `/health` and these docs needs `Authorization: Bearer <key>`; without keys, only clients on this
machine are answered. Embeddings are the loaded chat model's final hidden states, mean-pooled over the tokens
and L2-normalised."""
DOCS_ASSETS = "/docs-assets"


def create_app(
    current_backend: Callable[[], Backend | None],
    config: ApiConfig | None = None,
    accounts: Admin | None = None,
    accounting: bool = True,
    backend_name: str | None = None,
) -> FastAPI:
    """`accounts`: where personal keys, usage and quotas are kept (default: the data folder's, GLM_DATA_DIR);
    `accounting` False: none of them (`bench accounting` measures what they cost); `backend_name`: the served
    backend's name in the hub (default "local"), whose access rules (the Admin page's Backends) apply."""
    config = config or load_api_config()
    if not accounting:
        accounts = None
    elif accounts is None:
        accounts = admin_for()
    # /docs and /redoc with their scripts served from the pinned fastapi-offline package, not from a CDN that
    # these machines (and many company networks) cannot reach.
    app = FastAPIOffline(title="GLM Chat Dashboard API", description=DESCRIPTION, version="1", static_url=DOCS_ASSETS)
    app.state.api = ApiState.create(current_backend, config, accounts, backend_name)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=config.limits.max_body_bytes)
    app.include_router(openai_routes.router)
    app.include_router(completions.router)
    app.include_router(responses.router)
    app.include_router(seed_routes.router)

    @app.get("/health", tags=["Health"], summary="Is a model loaded (no key needed)")
    async def health(state: ApiState = Depends(api_state)):
        backend = state.current_backend()
        if backend is None:
            return JSONResponse({"status": "no model loaded"}, status_code=503)
        health = {"status": "ok", "model": model_name(backend), **backend.load_report().to_dict()}
        fast_path = backend.card().fast_path  # a local engine's compiled decode path: off, compiling, ready, ...
        return health | ({"fast_path": fast_path} if fast_path else {})

    return app


class BodyTooLarge(HTTPException):
    def __init__(self):
        super().__init__(413, "the request body is larger than this server takes (GLM_API_MAX_BODY_MB)")


class BodySizeLimit:
    """413 for a body over the limit, before it is read whole: at once by its Content-Length, else as it arrives.
    (FastAPI's own max_body_size answers a declared length in plain text, not in the API's error shape.)"""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            exc = BodyTooLarge()
            return await JSONResponse(error_body(413, exc.detail, "request_too_large"), status_code=413)(
                scope, receive, send
            )
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge()  # FastAPI passes HTTPExceptions on to the error handlers
            return message

        await self.app(scope, counted_receive, send)
