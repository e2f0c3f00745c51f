"""For admins, in the chat sidebar: load another local model, and offer or stop offering remote servers."""

from __future__ import annotations

import streamlit as st

from glm_core import Backend, ModelSpec
from glm_core.admin.audit import without_credentials
from glm_core.backends.config import typed_entry
from glm_core.safe_markdown import plain
from ui.accounting import audit
from ui.resources import get_hub, load_with_progress

PRECISIONS = ["auto", "fp32", "bf16", "fp16", "int8", "int4"]
DEVICES = ["auto", "cpu", "cuda", "mps"]
FAMILIES = ["auto", "chatglm2", "chatglm3"]


def load_model_form(engine: Backend | None) -> Backend | None:
    """The admin's form to load another model; returns the engine now loaded (the running one on failure)."""
    with st.expander("Load another model", expanded=engine is None), st.form("load_model"):
        current = engine.spec if engine is not None else ModelSpec.from_settings()
        path = st.text_input(
            "Model folder or .gguf file", value=current.path, help="'embedded' is the built-in model", key="load_path"
        )
        precision = st.selectbox("Precision", PRECISIONS, key="load_precision")
        device = st.selectbox("Device", DEVICES, key="load_device")
        family = st.selectbox(
            "ChatGLM family",
            FAMILIES,
            key="load_family",
            help="For ChatGLM checkpoints in the original layout: overrides what the folder suggests",
        )
        if st.form_submit_button("Load", key="load_button"):
            spec = ModelSpec(path.strip() or "embedded", precision, device, family)
            engine = load_with_progress(spec, admin=True)  # on failure it shows why and returns the running engine
            if engine is not None and engine.spec == spec:
                audit("model.load", spec.path, {"precision": precision, "device": device, "family": family})
                st.rerun()  # redraw the model card
    return engine


def remote_servers_panel() -> None:
    """The remote servers offered beside the local model, one more to offer, or one to stop offering. What is
    added here lasts until the portal restarts (GLM_BACKENDS or secrets.toml keep servers for good)."""
    hub = get_hub()

    def remove(name: str) -> None:
        hub.remove(name)
        audit("backend.remove", name)

    for name in hub.names():
        if hub.is_local(name):
            continue
        left, right = st.columns([3, 1], vertical_alignment="center")
        left.caption(f"{plain(name)}: {plain(hub.get(name).card().source)}")
        right.button(
            "Remove",
            key=f"remove_backend_{name}",
            on_click=remove,
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
            server = without_credentials(state.new_backend_url.strip())
            audit("backend.add", state.new_backend_name.strip(), {"server": server})
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
