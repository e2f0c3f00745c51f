"""The chat sidebar's Tools section: the tools a conversation offers the model (a JSON list of OpenAI function
definitions, checked as typed; an example set to start from) and the tool choice of its next turn. Only a model
trained for tool calls gets them (ChatGLM3's and GLM-4's formats, a chat template's `tools`: the backend's
`tool_syntax`), or a remote server (it renders them and reads its model's calls itself); for any other the section
says so and is disabled. The checks and the formats are glm_core's."""

from __future__ import annotations

import streamlit as st

from glm_core import Backend
from glm_core.conversations.conversation import Conversation
from glm_core.conversations.store import NotFound, StorageError, Store
from glm_core.safe_markdown import plain
from glm_core.tool_calls import EXAMPLE_TOOLS, MAX_TOOLS_CHARS, TOOL_CHOICES, check_tools, parse_tools, tools_text

CHOICE_LABELS = {
    "auto": "auto (the model decides)",
    "none": "none (answer in text)",
    "required": "required (call one of them)",
}


def tools_section(store: Store, workspace: str, conversation: Conversation, stored: bool, engine: Backend | None):
    """Draw the section; returns the next turn's tool choice ("auto", "none", "required" or a tool's name), or
    None when the model takes no tools (the turn then sends none). A draft's tools wait in the session and are
    stored with its first message; a stored conversation's are stored as soon as they are valid."""
    state = st.session_state
    draft_key, text_key = f"draft_tools_{conversation.id}", f"tools_text_{conversation.id}"
    if not stored:
        conversation.tools = state.get(draft_key, [])
    if text_key not in state:
        state[text_key] = tools_text(conversation.tools)
    syntax = getattr(engine, "tool_syntax", None) if engine is not None else None
    remote = engine is not None and engine.card().remote
    if syntax is None and not remote:
        if engine is None:
            why = "No model is loaded."
        else:
            why = f"{engine.card().name}'s format was not trained for tool calls (ChatGLM3-6B and GLM-4 were)."
        st.caption(plain(why) + " Tools are off for this model.")
        st.text_area("Tools (JSON)", key=text_key, disabled=True)
        return None

    def keep_typed() -> None:  # saved when the text changes (never on a rerun: another tab may have changed them)
        try:
            tools = parse_tools(state[text_key])
        except ValueError:
            return  # shown below while the text stays wrong
        _keep_tools(store, workspace, conversation, stored, tools)

    def fill_example() -> None:
        chosen = state.get("tools_example")
        if chosen:
            state[text_key] = tools_text(check_tools(EXAMPLE_TOOLS[chosen]))
            keep_typed()

    how = f"The model calls them in its own format ({plain(syntax.name)})" if syntax else "The server renders them"
    if syntax is None:  # a remote server: the tools are relayed, its calls come back read
        how += " and reads the model's calls in the model's format"
    st.caption(how + "; you answer each call with the tool's result.")
    st.selectbox(
        "Example tools",
        list(EXAMPLE_TOOLS),
        index=None,
        key="tools_example",
        placeholder="Fill in an example set",
        on_change=fill_example,
    )
    st.text_area(
        "Tools (a JSON list of OpenAI function definitions)",
        key=text_key,
        max_chars=MAX_TOOLS_CHARS,
        height=160,
        placeholder='[{"type": "function", "function": {"name": "...", "description": "...", "parameters": {...}}}]',
        on_change=keep_typed,
    )
    try:
        parse_tools(state[text_key])
    except ValueError as exc:
        st.error(f"{plain(exc)}. The conversation keeps its previous tools until this is fixed.")
    if "tools_error" in state:
        st.error(plain(state.pop("tools_error")))
    names = [tool["name"] for tool in conversation.tools]
    choice_key = f"tool_choice_{conversation.id}"
    reset = state.pop("reset_tool_choice", None) == conversation.id
    if reset or state.get(choice_key) not in (*TOOL_CHOICES, *names):
        state[choice_key] = "auto"
    choice = st.selectbox(
        "Tool choice",
        [*TOOL_CHOICES, *names],
        key=choice_key,
        format_func=lambda option: CHOICE_LABELS.get(option, f"call {option}"),
        disabled=not names,
        help="Naming a tool forces that call: decoding is constrained so its arguments match the tool's schema.",
    )
    if names:
        st.caption(f"{len(names)} tool(s): " + ", ".join(plain(name) for name in names))
    if reset:
        st.caption("Back to auto after the forced call, so the model can answer its result instead of calling again.")
    return choice


def after_forced_call(conversation_id: str, tool_choice: str | None, made_calls: bool) -> None:
    """A forced choice (required, or a tool by name) holds for one turn: once the model made its call, the next
    turn's choice goes back to auto (as the OpenAI Agents SDK's reset_tool_choice does), which keeps a model from
    calling again and again instead of reading the result."""
    if made_calls and tool_choice not in (None, "auto", "none"):
        st.session_state.reset_tool_choice = conversation_id


def _keep_tools(store: Store, workspace: str, conversation: Conversation, stored: bool, tools: list[dict]) -> None:
    """Store the tools (a draft's wait in the session); runs as a widget's callback, before the page is drawn."""
    if not stored:
        st.session_state[f"draft_tools_{conversation.id}"] = tools
        return
    try:
        store.set_tools(workspace, conversation.id, tools)
    except (StorageError, NotFound) as exc:
        st.session_state.tools_error = f"The tools were not saved: {exc}"
