"""Chat page: the workspace's conversations in the sidebar; talk to the shared model; each reply shows its figures."""

import streamlit as st

from glm_core.protocol import MAX_PROMPT_CHARS
from glm_core.safe_markdown import plain
from ui.access import admin_panel, current_workspace, is_admin
from ui.accounting import quota_left
from ui.compare_view import compare_view
from ui.conversation_list import (
    ConversationActions,
    confirm_delete,
    conversation_list,
    conversation_menu,
    model_choice,
    open_conversation,
)
from ui.generation_controls import generation_controls
from ui.reasoning import thinking_switch
from ui.render import model_card
from ui.resources import backend_choice, backend_named, get_hub, get_store
from ui.servers import load_model_form, remote_servers_panel
from ui.tools_panel import tools_section
from ui.transcript import Transcript, after_turn

st.set_page_config(page_title="GLM Chat", page_icon="💬", layout="wide")
workspace, store, hub = current_workspace(), get_store(), get_hub()
conversation, stored = open_conversation(store, workspace)
# Which backend this conversation talks to: its own (stored with it), or for a draft the one chosen for it.
backend_name, backend_note = backend_choice(conversation.backend if stored else st.session_state.get("draft_backend"))
conversation.backend = backend_name  # a draft is stored with it
actions = ConversationActions(store, workspace)
engine = backend_named(backend_name)

with st.sidebar:
    st.header("Conversations")
    conversation_list(actions, conversation)
    if stored:
        conversation_menu(actions, conversation)

    st.header("Model")
    model_choice(actions, conversation, stored, backend_name)
    if hub.config_error:
        st.warning(plain(hub.config_error))
    if engine is not None:
        model_card(engine)
    if admin_panel():
        engine = load_model_form(engine)
        with st.expander("Remote servers"):
            remote_servers_panel()
    else:
        st.caption("Only admins load another model or add servers.")

    st.header("Generation")
    generation = generation_controls(store, workspace, engine.card() if engine is not None else None)
    generation.thinking = thinking_switch(engine.card() if engine is not None else None, conversation)
    if left_today := quota_left():
        st.caption(left_today)

    st.header("Tools")
    generation.tool_choice = tools_section(store, workspace, conversation, stored, engine)

if st.session_state.get("pending_delete"):
    confirm_delete(actions, *st.session_state.pending_delete)

st.title("GLM Chat")
if st.toggle("Compare", key="compare_mode", help="One prompt to 2-4 configurations side by side, with blind votes"):
    compare_view(hub, workspace, generation, is_admin())
    st.stop()
if stored:
    st.caption(plain(conversation.title))
if len(hub.names()) > 1 and backend_name is not None:
    st.caption(f"Talking to {plain(backend_name)}" + (f" ({plain(engine.card()['name'])})" if engine else ""))
if backend_note:
    st.info(plain(backend_note))
if engine is None:
    st.info("No model is loaded. Choose one in the sidebar.")

transcript = Transcript(store, workspace, conversation)
prompt = st.chat_input("Ask anything", max_chars=MAX_PROMPT_CHARS, submit_mode="stop", disabled=engine is None)
action = transcript.take_action(prompt, engine)
transcript.show(action, engine)
if action is not None:
    transcript.run_turn(action, engine, generation)
after_turn()
