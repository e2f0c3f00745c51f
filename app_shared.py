"""Streamlit glue shared by the pages: the process-wide engine hub, conversation store and GPU monitor, the model
loader with a progress bar, the access rules every page applies first (open_workspace), and the HTTP API served
beside the pages (Home.py's st.App)."""

from __future__ import annotations

import functools
import logging
import secrets
import threading
from contextlib import asynccontextmanager
from pathlib import Path

import streamlit as st

from glm_core import Backend, ModelLoadError, ModelSpec, load_settings
from glm_core.access import (
    AttemptThrottle,
    PathNotAllowed,
    RolePolicy,
    check_model_path,
    is_local_client,
    refusal,
    throttle_keys,
)
from glm_core.backends.config import configured_backends, conversation_backend, typed_entry
from glm_core.backends.hub import EngineHub
from glm_core.bench.memory import BenchHistory, MemoryBenchRunner
from glm_core.conversations.conversation import ChatMessage
from glm_core.conversations.store import Store
from glm_core.conversations.workspace import auth_configured, is_url_workspace_id, password_matches, user_identity
from glm_core.safe_markdown import no_remote_images, plain  # noqa: F401 (plain: the pages' import)
from glm_core.telemetry.gpu_monitor import Monitor

WORKSPACE_PARAM = "ws"
log = logging.getLogger(__name__)


@st.cache_resource(show_spinner=False)
def get_hub() -> EngineHub:
    """One hub per server process: every browser session shares the loaded model and the remote backends, as
    secrets.toml's [backends] or GLM_BACKENDS name them (a configuration that cannot be read is shown, and the
    portal falls back to the one local model)."""
    hub = EngineHub()
    try:
        hub.configure(configured_backends(_secret_section("backends")))
    except ValueError as exc:
        hub.config_error = f"The backends configuration was not used: {exc}"
        hub.configure(configured_backends(None, env={}))
    return hub


def _secret_section(name: str) -> dict | None:
    try:
        value = st.secrets.get(name)
    except FileNotFoundError as exc:
        if getattr(exc, "error_id", None) == "no-secrets-found":
            return None
        raise
    return dict(value) if value else None


@st.cache_resource(show_spinner=False)
def _store_for(data_dir: str) -> Store:
    store = Store(data_dir)
    # This runs once per server process, before it has generated anything here: a reply still marked partial
    # was being written by a process that died, so it is marked interrupted.
    store.recover_interrupted()
    return store


@st.cache_resource(show_spinner=False)
def _bench_runner_for(data_dir: str) -> MemoryBenchRunner:
    return MemoryBenchRunner(BenchHistory(data_dir))


def get_bench_runner() -> MemoryBenchRunner:
    """One memory benchmark at a time per server process, and the team's history of runs."""
    return _bench_runner_for(str(load_settings().data_dir))


def get_store() -> Store:
    return _store_for(str(load_settings().data_dir))


@st.cache_resource(show_spinner=False, on_release=Monitor.stop)
def get_monitor() -> Monitor:
    """One sampler per server process, started on the first visit of the GPU monitor page: every browser session
    sees the same history of the last minutes."""
    return Monitor().start()


def load_with_progress(spec: ModelSpec, default: bool = False) -> Backend | None:
    """Load `spec` showing a progress bar; on failure show the reason and keep whatever was loaded.

    Only admins choose what to load; `default` is the automatic load of the configured default model when none
    is loaded, which anyone's visit starts and which never replaces a model loaded meanwhile."""
    hub = get_hub()
    if not default:
        if not is_admin():
            st.error("Only admins load models.")
            return hub.engine
        try:
            spec = ModelSpec(
                check_model_path(spec.path, load_settings().model_dirs),
                spec.precision,
                spec.device,
                spec.family,
                spec.group_size,
            )
        except PathNotAllowed as exc:
            st.error(f"Could not load the model: {plain(exc)}")
            return hub.engine
    bar = st.progress(0.0, text=f"Loading {plain(spec.path)} ...")
    try:
        return hub.load(
            spec,
            progress=lambda fraction, message: bar.progress(min(fraction, 1.0), text=message),
            if_none_loaded=default,
        )
    except ModelLoadError as exc:
        st.error(f"Could not load the model: {plain(exc)}")
        return hub.engine
    finally:
        bar.empty()


def ensure_engine() -> Backend | None:
    """The shared engine, loading the configured default on first use (a failed default is not retried)."""
    hub = get_hub()
    if hub.engine is not None:
        return hub.engine
    spec = hub.default_local_spec()
    if hub.last_error_spec == spec:
        st.error(f"Could not load the model: {plain(hub.last_error)}")
        return None
    return load_with_progress(spec, default=True)


# ---- the HTTP API on the portal's port (Home.py) ----------------------------------------------------------


def api_routes() -> list:
    """The HTTP API as routes of the portal's server: the same process, hub and model as the pages."""
    from glm_core.api import create_app
    from glm_core.api.portal import ApiRoutes

    return [ApiRoutes(create_app(lambda: get_hub().engine))]


@asynccontextmanager
async def api_lifespan(_app):
    """When the server starts, load the configured model in the background: API clients need not wait for a first
    browser visit (they get 503 until it is loaded; a page visit meanwhile waits for the same load)."""

    threading.Thread(
        target=load_configured_local_model, args=(get_hub(),), name="glm-load-default", daemon=True
    ).start()
    print(role_policy().startup_notice(), flush=True)
    yield


def load_configured_local_model(hub: EngineHub) -> None:
    """Load the local model the configuration offers (GLM_BACKENDS' or secrets.toml's local entry, else
    GLM_MODEL_PATH); nothing when only remote servers are configured (loaded anyway, it became the default for new
    conversations as soon as it was ready)."""
    if hub.local_name not in hub.names():
        return
    try:
        hub.load(hub.default_local_spec(), if_none_loaded=True)
    except ModelLoadError as exc:  # the hub keeps the reason; the chat page shows it
        log.error("could not load the default model: %s", exc)


def run_page(file_name: str) -> None:
    """Run a page file kept beside Home.py as part of this script run (Home.py is also the server's ASGI entry)."""
    path = Path(__file__).with_name(file_name)
    exec(_compiled(str(path), path.stat().st_mtime_ns), {"__name__": "__main__", "__file__": str(path)})


@functools.lru_cache(maxsize=8)
def _compiled(path: str, _mtime_ns: int):
    return compile(Path(path).read_text(encoding="utf-8"), path, "exec")


def backend_choice(stored: str | None) -> tuple[str | None, str | None]:
    """The backend name a conversation talks to (see conversation_backend) and a note when its own is gone."""
    hub = get_hub()
    return conversation_backend(stored, hub.names(), hub.default_name)


def remote_servers_panel() -> None:
    """For admins: the remote servers offered beside the local model, one more to offer, or one to stop offering.
    What is added here lasts until the portal restarts (GLM_BACKENDS or secrets.toml keep servers for good)."""
    hub = get_hub()
    for name in hub.names():
        if hub.is_local(name):
            continue
        left, right = st.columns([3, 1], vertical_alignment="center")
        left.caption(f"{plain(name)}: {plain(hub.get(name).card()['source'])}")
        right.button(
            "Remove",
            key=f"remove_backend_{name}",
            on_click=hub.remove,
            args=(name,),
            help="Conversations that talk to it go to the default model, and say so",
        )

    def add() -> None:
        state = st.session_state
        try:
            hub.add_remote(
                typed_entry(
                    state.new_backend_name, state.new_backend_url, api_key=state.new_backend_key.strip() or None
                )
            )
        except ValueError as exc:
            state.backend_error = str(exc)
        else:
            state.new_backend_name = state.new_backend_url = ""
        state.new_backend_key = ""  # never kept in the form, added or not

    with st.form("add_backend"):
        st.text_input("Name", key="new_backend_name", placeholder="glm4", max_chars=40)
        st.text_input(
            "Server",
            key="new_backend_url",
            placeholder="http://gpu1:8000/v1#THUDM/glm-4-9b-chat",
            help="An OpenAI-compatible server (vLLM, SGLang, llama.cpp, another portal's API); after # the "
            "model id, else the server's first model",
        )
        st.text_input(
            "API key", key="new_backend_key", type="password", help="Optional; kept in this process only, never shown"
        )
        st.form_submit_button("Add server", key="add_backend", on_click=add)
    if st.session_state.get("backend_error"):
        st.error(plain(st.session_state.pop("backend_error")))
    st.caption("Servers added here last until the portal restarts; GLM_BACKENDS or secrets.toml keep them.")


def backend_named(name: str | None) -> Backend | None:
    """The named backend; the local one is loaded on first use (with its progress bar)."""
    hub = get_hub()
    if name is None or hub.is_local(name):
        return ensure_engine()
    return hub.get(name)


# ---- who may see what --------------------------------------------------------------------------------------


def _secrets() -> dict | None:
    """The secrets as a dict; None when there is no secrets file. A secrets file that cannot be read raises: a
    typo there must not silently open a password-protected portal."""
    try:
        return st.secrets.to_dict()
    except FileNotFoundError as exc:  # StreamlitSecretNotFoundError is one
        if getattr(exc, "error_id", None) == "no-secrets-found":
            return None
        raise


def read_secret(name: str) -> str | None:
    """A value from .streamlit/secrets.toml; None when there is no secrets file or it is not set."""
    value = (_secrets() or {}).get(name)
    return str(value) if value not in (None, "") else None


@st.cache_resource(show_spinner=False)
def get_throttle() -> AttemptThrottle:
    """Failed password attempts of every session of this server process."""
    return AttemptThrottle()


def client_address() -> str | None:
    """This browser's address as the server saw it; None for this machine (Streamlit's answer for 127.0.0.1 and ::1,
    and for a session with no browser connection, as under AppTest)."""
    address = st.context.ip_address
    return address if isinstance(address, str) and address else None


def _attempt_keys() -> tuple[list[str], str]:
    session = st.session_state.setdefault("attempt_session", secrets.token_hex(8))
    client = client_address() or "local"  # this machine (or a local proxy)
    return throttle_keys(session, client), client


def checked_password(given: str, expected: str, what: str) -> bool:
    """Compare a password under the attempt throttle; shows why a refused attempt was refused."""
    keys, client = _attempt_keys()
    outcome = get_throttle().attempt(keys, lambda: password_matches(given or "", expected), what, client)
    if outcome is True:
        return True
    st.error("Wrong password." if outcome is False else refusal(outcome))
    return False


def require_access_password() -> None:
    """When secrets.toml sets `access_password`, show nothing else until this browser session has given it."""
    expected = read_secret("access_password")
    if expected is None or st.session_state.get("access_granted"):
        return
    st.title("GLM Chat")
    with st.form("access_form"):
        given = st.text_input("Access password", type="password", key="access_password_input")
        submitted = st.form_submit_button("Enter", key="access_submit")
    if submitted and checked_password(given, expected, "access password"):
        st.session_state.access_granted = True
        st.rerun()
    st.stop()


# ---- the admin role ------------------------------------------------------------------------------------------


def role_policy() -> RolePolicy:
    return RolePolicy.from_secrets(_secrets())


def is_admin() -> bool:
    """Whether this browser session may load, unload and switch models, free memory and run large benchmarks."""
    policy = role_policy()
    return (
        (policy.local_admins and is_local_client(client_address()))
        or policy.is_listed_admin(st.user.to_dict())
        or (policy.admin_password is not None and st.session_state.get("admin_granted") is True)
    )


def admin_panel() -> bool:
    """In the sidebar: who is admin here, the admin password form where there is one; returns is_admin()."""
    policy = role_policy()
    admin = is_admin()
    with st.sidebar:
        if policy.local_admins:
            st.caption(policy.describe(local=admin))
        elif admin:
            st.caption("You are an admin on this portal.")
            if st.session_state.get("admin_granted"):
                st.button("Leave admin", key="admin_leave", on_click=lambda: st.session_state.pop("admin_granted"))
        else:
            st.caption(policy.describe())
            if policy.admin_password is not None:
                with st.expander("Admin sign-in"), st.form("admin_form"):
                    given = st.text_input("Admin password", type="password", key="admin_password_input")
                    if st.form_submit_button("Become admin", key="admin_submit") and checked_password(
                        given, policy.admin_password, "admin password"
                    ):
                        st.session_state.admin_granted = True
                        st.rerun()
    return admin


def open_workspace() -> str:
    """Apply the access rules and return this browser's workspace id; call it first on every page.

    - With Streamlit auth configured, nothing shows until the user signs in; the workspace is the one of their
      identity, and the URL plays no part.
    - Otherwise the workspace is the one this browser session already has, else the URL's `?ws=` if it is a
      well-formed id of an existing browser workspace, else a new one; the URL always shows it (a refresh or a
      bookmark keeps it; navigating between pages drops query parameters, the session puts it back).
    """
    require_access_password()
    store = get_store()
    user = st.user.to_dict()
    if auth_configured(user):
        identity = user_identity(user)
        if identity is None:
            st.title("GLM Chat")
            st.info("Sign in to see your conversations.")
            if st.button("Sign in", key="sign_in"):
                st.login()
            st.stop()
        workspace = store.workspace_for_owner(identity)
        if WORKSPACE_PARAM in st.query_params:
            del st.query_params[WORKSPACE_PARAM]
        with st.sidebar:
            st.caption(f"Signed in as {plain(str(user.get('email') or user.get('name') or 'you'))}")
            if st.button("Sign out", key="sign_out"):
                st.logout()
        return workspace

    workspace = st.session_state.get("workspace")
    if workspace is None or not store.workspace_exists(workspace):
        candidate = st.query_params.get(WORKSPACE_PARAM)
        if (
            is_url_workspace_id(candidate)
            and store.workspace_exists(candidate)
            and store.workspace_owner(candidate) is None
        ):  # a signed-in user's workspace is never opened by URL
            workspace = candidate
        else:
            workspace = store.create_workspace()
        st.session_state.workspace = workspace
    if st.query_params.get(WORKSPACE_PARAM) != workspace:
        st.query_params[WORKSPACE_PARAM] = workspace
    return workspace


def require_signed_in() -> None:
    """For pages that open no workspace (a share link): the access password, and with Streamlit auth configured,
    any signed-in user (the portal is the team's, not the internet's)."""
    require_access_password()
    user = st.user.to_dict()
    if auth_configured(user) and user_identity(user) is None:
        st.title("GLM Chat")
        st.info("Sign in to see this conversation.")
        if st.button("Sign in", key="sign_in"):
            st.login()
        st.stop()


SHARE_PAGE = "Shared"  # pages/4_Shared.py


def share_url(token: str) -> str:
    """The address of a share link, on this server as the browser reached it."""
    base = (st.context.url or "").split("?")[0].rstrip("/")
    for page in ("/Conversations", "/GPU_monitor", "/Quantization", f"/{SHARE_PAGE}"):
        base = base.removesuffix(page)
    return f"{base}/{SHARE_PAGE}?share={token}"


def show_message(message: ChatMessage) -> None:
    """A stored message: Markdown without unsafe HTML (any HTML in it shows as text; code blocks are highlighted
    and $...$ renders as LaTeX), its error, and a reply's figures."""
    st.markdown(no_remote_images(message.content))  # images from other hosts become links
    if message.error:  # another server's words, or an imported file's: shown as typed
        st.error(plain(message.error))
    line = message.stats_line() if message.role == "assistant" else ""
    if line:
        st.caption(plain(line))
