"""Streamlit glue shared by the pages: the process-wide engine hub, conversation store and GPU monitor, the model
loader with a progress bar, and the access rules every page applies first (open_workspace)."""

from __future__ import annotations

import re

import streamlit as st

from glm_core import Backend, ModelLoadError, ModelSpec, load_settings
from glm_core.bench.memory import BenchHistory, MemoryBenchRunner
from glm_core.telemetry.gpu_monitor import Monitor
from glm_core.backends.hub import EngineHub
from glm_core.conversations.conversation import ChatMessage
from glm_core.conversations.store import Store
from glm_core.conversations.workspace import auth_configured, is_url_workspace_id, password_matches, user_identity

WORKSPACE_PARAM = "ws"


@st.cache_resource(show_spinner=False)
def get_hub() -> EngineHub:
    """One hub per server process: every browser session shares the loaded model and its engine."""
    return EngineHub()


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


def load_with_progress(spec: ModelSpec) -> Backend | None:
    """Load `spec` showing a progress bar; on failure show the reason and keep whatever was loaded."""
    hub = get_hub()
    bar = st.progress(0.0, text=f"Loading {spec.path} ...")
    try:
        return hub.load(spec, progress=lambda fraction, message: bar.progress(min(fraction, 1.0), text=message))
    except ModelLoadError as exc:
        st.error(f"Could not load the model: {exc}")
        return hub.engine
    finally:
        bar.empty()


def ensure_engine() -> Backend | None:
    """The shared engine, loading the configured default on first use (a failed default is not retried)."""
    hub = get_hub()
    if hub.engine is not None:
        return hub.engine
    spec = ModelSpec.from_settings()
    if hub.last_error_spec == spec:
        st.error(f"Could not load the model: {hub.last_error}")
        return None
    return load_with_progress(spec)


# ---- who may see what --------------------------------------------------------------------------------------


def read_secret(name: str) -> str | None:
    """A value from .streamlit/secrets.toml; None when there is no secrets file. A secrets file that cannot be
    read raises: a typo there must not silently open a password-protected portal."""
    try:
        value = st.secrets.get(name)
    except FileNotFoundError as exc:  # StreamlitSecretNotFoundError is one
        if getattr(exc, "error_id", None) == "no-secrets-found":
            return None
        raise
    return str(value) if value not in (None, "") else None


def require_access_password() -> None:
    """When secrets.toml sets `access_password`, show nothing else until this browser session has given it."""
    expected = read_secret("access_password")
    if expected is None or st.session_state.get("access_granted"):
        return
    st.title("GLM Chat")
    with st.form("access_form"):
        given = st.text_input("Access password", type="password", key="access_password_input")
        submitted = st.form_submit_button("Enter", key="access_submit")
    if submitted:
        if password_matches(given or "", expected):
            st.session_state.access_granted = True
            st.rerun()
        st.error("Wrong password.")
    st.stop()


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
        if (is_url_workspace_id(candidate) and store.workspace_exists(candidate)
                and store.workspace_owner(candidate) is None):  # a signed-in user's workspace is never opened by URL
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
    st.markdown(message.content)
    if message.error:
        st.error(message.error)
    line = message.stats_line() if message.role == "assistant" else ""
    if line:
        st.caption(line)


_MARKDOWN_SPECIALS = re.compile(r"([\\`*_{}\[\]()#+\-.!|~<>:$&=^])")


def plain(text: str) -> str:
    """User text made safe for places that render Markdown (button labels, captions): every Markdown, directive
    (`:red[...]`), emoji-shortcode and LaTeX character is escaped, so it shows exactly as typed."""
    return _MARKDOWN_SPECIALS.sub(r"\\\1", text)
