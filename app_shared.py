"""Streamlit glue shared by the pages: the process-wide engine hub and the model loader with a progress bar."""

from __future__ import annotations

import streamlit as st

from glm_core import Engine, ModelLoadError, ModelSpec
from glm_core.hub import EngineHub


@st.cache_resource(show_spinner=False)
def get_hub() -> EngineHub:
    """One hub per server process: every browser session shares the loaded model and its engine."""
    return EngineHub()


def load_with_progress(spec: ModelSpec) -> Engine | None:
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


def ensure_engine() -> Engine | None:
    """The shared engine, loading the configured default on first use (a failed default is not retried)."""
    hub = get_hub()
    if hub.engine is not None:
        return hub.engine
    spec = ModelSpec.from_settings()
    if hub.last_error_spec == spec:
        st.error(f"Could not load the model: {hub.last_error}")
        return None
    return load_with_progress(spec)
