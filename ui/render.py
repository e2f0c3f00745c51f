"""How the pages draw shared things: a stored message, the loaded model's card (full in the chat sidebar, one line
on the GPU monitor) and a share link's address. Model output is always escaped Markdown (glm_core.safe_markdown)."""

from __future__ import annotations

import streamlit as st

from glm_core import Backend
from glm_core.bench.estimator import parameters_line
from glm_core.conversations.conversation import ChatMessage
from glm_core.safe_markdown import no_remote_images, plain
from glm_core.telemetry.memory import format_bytes
from glm_core.tool_calls import arguments_text
from ui.reasoning import show_thinking

SHARE_PAGE = "Shared"  # the share page's url_path (Home.py)
TOOL_AVATAR = ":material/build:"


def avatar(role: str) -> str | None:
    """For st.chat_message: a tool's result gets a tool's icon; the other roles Streamlit's own."""
    return TOOL_AVATAR if role == "tool" else None


def share_url(token: str) -> str:
    """The address of a share link, on this server as the browser reached it."""
    from ui.frame import URL_PATHS  # the pages' addresses, declared by the frame

    base = (st.context.url or "").split("?")[0].rstrip("/")
    for page in URL_PATHS:
        base = base.removesuffix(f"/{page}")
    return f"{base}/{SHARE_PAGE}?share={token}"


def show_message(message: ChatMessage) -> None:
    """A stored message: Markdown without unsafe HTML (any HTML in it shows as text; code blocks are highlighted
    and $...$ renders as LaTeX), its error, and a reply's figures. A reply's tool calls are drawn as calls (the
    function's name, its arguments as a JSON code block) and a tool's result as the result of its call, both
    exactly as written (code blocks render nothing)."""
    if message.role == "tool":
        show_tool_result(message)
        return
    if message.reasoning:  # a reasoning model's thinking, folded above its answer
        show_thinking(message.reasoning)
    if message.answer or not message.tool_calls:
        st.markdown(no_remote_images(message.answer))  # images from other hosts become links
    for call in message.tool_calls or []:
        show_tool_call(call)
    if message.error:  # another server's words, or an imported file's: shown as typed
        st.error(plain(message.error))
    line = message.stats_line() if message.role == "assistant" else ""
    if line:
        st.caption(plain(line))


def show_tool_call(call: dict) -> None:
    st.markdown(f"{TOOL_AVATAR} Calls **{plain(call['name'])}**")
    st.code(arguments_text(call["arguments"]), language="json", wrap_lines=True)
    st.caption(f"call id {plain(call['id'])}")


def show_tool_result(message: ChatMessage) -> None:
    st.markdown(f"Result of **{plain(message.tool_name or 'the tool')}**")
    st.code(message.content, language=None, wrap_lines=True)
    if message.tool_call_id:
        st.caption(f"for call {plain(message.tool_call_id)}")


def model_card(engine: Backend) -> None:
    """The model a conversation talks to, as the chat sidebar shows it: what it is, its memory and its load."""
    card = engine.card()
    st.markdown(f"**{plain(card.name)}**")
    load = engine.load_report()
    if card.remote:
        st.caption(
            f"remote server {plain(card.server or '')} · {plain(card.status or 'asking the server...')}"
            + (f" · context {card.max_context:,} tokens" if card.max_context else "")
        )
        st.caption(f"Not known here: {plain(card.unknown_remotely or '')}.")
        st.caption(
            f"the server is generating {load.running} request(s) · {load.waiting} waiting · "
            f"{load.in_flight_here} from this portal"
        )
        return
    st.caption(
        f"family {plain(card.family)} · {card.precision} · {plain(card.device)} · "
        f"{parameters_line(card.parameters or 0, card.active_parameters or 0)} · "
        f"loaded in {card.load_seconds or 0:.1f} s"
    )
    if card.checkpoint:
        st.caption(plain(card.checkpoint))
    if card.precision_source:
        st.caption(plain(card.precision_source))
    if card.kernel:
        st.caption(plain(card.kernel))
    memory = engine.memory_report()
    st.caption(
        f"weights {(card.weights_bytes or 0) / 2**20:,.0f} MiB "
        f"({(card.quantized_weights_bytes or 0) / 2**20:,.0f} MiB quantized) · "
        f"KV cache {(card.kv_bytes_per_token or 0) / 1024:,.1f} KiB/token · "
        f"{memory.source} {memory.current / 2**20:,.0f} MiB (peak {memory.peak / 2**20:,.0f} MiB) · "
        f"kept caches {memory.kv_cache_bytes / 2**20:,.1f} MiB for {memory.kv_cache_conversations} conversation(s)"
    )
    st.caption(
        f"generating for {load.running} conversation(s) at once (at most {load.max_batch}) · {load.waiting} waiting"
    )
    fast = card.fast_path or "off"  # off | compiling | ready | failed: reason
    st.caption(
        f"decode fast path: {card.fast_path_scope if fast == 'off' else plain(fast)}"
        + ("" if fast == "off" else f" · {card.fast_path_scope}")
    )


def model_line(engine: Backend) -> None:
    """The model in one line, for pages about memory (GPU monitor): name, level, device, weights, load."""
    card = engine.card()
    if card.remote:
        st.markdown(f"**Model:** {plain(card.name)} on a remote server: see Remote servers below.")
        return
    load = engine.load_report()
    st.markdown(
        f"**Model:** {plain(card.name)} · {card.precision} · {card.device} · weights {format_bytes(card.weights_bytes)}"
    )
    st.caption(
        f"Generating for {load.running} conversation(s) at once (at most {load.max_batch}) · {load.waiting} waiting"
    )
