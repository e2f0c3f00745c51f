"""What one server process holds for every browser session: the hub of backends, the conversation store, the
memory benchmark runner and the GPU monitor; loading a model with a progress bar."""

from __future__ import annotations

import streamlit as st

from glm_core import Backend, ModelLoadError, ModelSpec, load_settings
from glm_core.access import PathNotAllowed, check_model_path
from glm_core.backends.config import configured_backends, conversation_backend
from glm_core.backends.hub import BackendHub
from glm_core.bench.estimator import spec_weights_bytes
from glm_core.bench.history import BenchHistory
from glm_core.bench.runs import BenchRunner
from glm_core.conversations.store import Store
from glm_core.safe_markdown import plain
from glm_core.telemetry.gpu_monitor import Monitor
from ui.secrets import secret_section


@st.cache_resource(show_spinner=False)
def get_hub() -> BackendHub:
    """One hub per server process: every browser session shares the loaded model and the remote backends, as
    secrets.toml's [backends] or GLM_BACKENDS name them (a configuration that cannot be read is shown, and the
    portal falls back to the one local model)."""
    hub = BackendHub(predict_weights=spec_weights_bytes)  # the Compare mode loads models beside, within the budget
    try:
        hub.configure(configured_backends(secret_section("backends")))
    except ValueError as exc:
        hub.config_error = f"The backends configuration was not used: {exc}"
        hub.configure(configured_backends(None, env={}))
    return hub


@st.cache_resource(show_spinner=False)
def _store_for(data_dir: str) -> Store:
    store = Store(data_dir)
    # This runs once per server process, before it has generated anything here: a reply still marked partial
    # was being written by a process that died, so it is marked interrupted.
    store.recover_interrupted()
    return store


@st.cache_resource(show_spinner=False)
def _bench_runner_for(data_dir: str) -> BenchRunner:
    return BenchRunner(BenchHistory(data_dir))


def get_bench_runner() -> BenchRunner:
    """One memory benchmark at a time per server process, and the team's history of runs."""
    return _bench_runner_for(str(load_settings().data_dir))


def get_store() -> Store:
    return _store_for(str(load_settings().data_dir))


@st.cache_resource(show_spinner=False, on_release=Monitor.stop)
def get_monitor() -> Monitor:
    """One sampler per server process, started on the first visit of the GPU monitor page: every browser session
    sees the same history of the last minutes."""
    return Monitor().start()


def load_with_progress(spec: ModelSpec, admin: bool, default: bool = False) -> Backend | None:
    """Load `spec` showing a progress bar; on failure show the reason and keep whatever was loaded.

    Only admins choose what to load; `default` is the automatic load of the configured default model when none
    is loaded, which anyone's visit starts and which never replaces a model loaded meanwhile."""
    hub = get_hub()
    if not default:
        if not admin:
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
    return load_with_progress(spec, admin=False, default=True)


def backend_choice(stored: str | None) -> tuple[str | None, str | None]:
    """The backend name a conversation talks to (see conversation_backend) and a note when its own is gone."""
    from ui.accounting import visible_backends  # ui.accounting reads the access rules, which import this module

    hub = get_hub()
    names = visible_backends(hub.names())
    if hub.names() and not names:
        return None, "No model here is offered to you; an admin can change that on the Admin page."
    return conversation_backend(stored, names, names[0] if names else None)


def backend_named(name: str | None) -> Backend | None:
    """The named backend; the local one is loaded on first use (with its progress bar)."""
    hub = get_hub()
    if name is None and hub.names():  # every offered backend is restricted to others (backend_choice said so)
        return None
    if name is None or hub.is_local(name):
        return ensure_engine()
    return hub.get(name)
