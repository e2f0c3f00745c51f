"""The HTTP API on the portal's port: Home.py's st.App serves these routes from the same process, hub and model as
the pages, so browser chats and API clients share one batch."""

from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager

from glm_core import ModelLoadError
from glm_core.backends.hub import BackendHub
from ui.access import role_policy
from ui.resources import get_hub

log = logging.getLogger(__name__)


def api_routes() -> list:
    from glm_core.api import create_app
    from glm_core.api.portal import ApiRoutes

    return [ApiRoutes(create_app(lambda: get_hub().engine, backend_name=get_hub().local_name))]


@asynccontextmanager
async def api_lifespan(_app):
    """When the server starts, load the configured model in the background: API clients need not wait for a first
    browser visit (they get 503 until it is loaded; a page visit meanwhile waits for the same load)."""

    threading.Thread(
        target=load_configured_local_model, args=(get_hub(),), name="glm-load-default", daemon=True
    ).start()
    print(role_policy().startup_notice(), flush=True)
    yield


def load_configured_local_model(hub: BackendHub) -> None:
    """Load the local model the configuration offers (GLM_BACKENDS' or secrets.toml's local entry, else
    GLM_MODEL_PATH); nothing when only remote servers are configured (loaded anyway, it became the default for new
    conversations as soon as it was ready)."""
    if hub.local_name not in hub.names():
        return
    try:
        hub.load(hub.default_local_spec(), if_none_loaded=True)
    except ModelLoadError as exc:  # the hub keeps the reason; the chat page shows it
        log.error("could not load the default model: %s", exc)
