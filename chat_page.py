"""Chat page (Home.py runs it): the workspace's conversations in the sidebar; talk to the shared model; each reply
shows its figures."""

import streamlit as st

from app_shared import (
    admin_panel,
    backend_choice,
    backend_named,
    get_hub,
    get_store,
    load_with_progress,
    open_workspace,
    plain,
    remote_servers_panel,
    share_url,
    show_message,
)
from glm_core import ConversationBusy, EngineClosed, ModelSpec, Queued, QueueFull, Started, Truncated
from glm_core.conversations.conversation import ChatMessage, Conversation, new_conversation_id
from glm_core.conversations.store import CONVERSATION_CHANGED, ConversationChanged, NotFound, StorageError
from glm_core.conversations.turn import start_turn
from glm_core.protocol import MAX_PROMPT_CHARS, MAX_SYSTEM_PROMPT_CHARS
from glm_core.safe_markdown import StreamWithoutImages, no_remote_images
from glm_core.sampling_defaults import (
    CONTROLS,
    LABELS,
    card_defaults,
    clean_overrides,
    compose_params,
    describe_sources,
    effective_controls,
)

LIST_LIMIT = 50  # conversations listed in the sidebar; search or the Conversations page find the rest

st.set_page_config(page_title="GLM Chat", page_icon="💬", layout="wide")
workspace = open_workspace()
store = get_store()
state = st.session_state


# ---- the current conversation: its id lives in the session (and, once stored, in the URL as ?c=) -------------

if state.get("conversation_workspace") != workspace:  # first run, or another user signed in on this session
    state.pop("conversation_id", None)
    state.conversation_workspace = workspace
if "conversation_id" not in state:
    from_url = st.query_params.get("c")
    state.conversation_id = (
        from_url if from_url and store.get_conversation(workspace, from_url) else new_conversation_id()
    )
# Read from the store on every run: another tab of this workspace may have changed it. Not stored yet: a draft,
# stored with its first message.
conversation = store.get_conversation(workspace, state.conversation_id) or Conversation(id=state.conversation_id)
stored = conversation.updated_at is not None
if stored:
    st.query_params["c"] = conversation.id
elif "c" in st.query_params:
    del st.query_params["c"]
# Which backend this conversation talks to: its own (stored with it), or for a draft the one chosen for it.
backend_name, backend_note = backend_choice(conversation.backend if stored else state.get("draft_backend"))
conversation.backend = backend_name  # a draft is stored with it


def switch_to(conversation_id: str) -> None:
    state.conversation_id = conversation_id
    state.pop("editing", None)


def forget(conversation_id: str) -> None:
    engine_now = get_hub().engine
    if engine_now is not None:
        engine_now.forget(conversation_id)


def guarded(action, *args) -> bool:
    """Run a change to a stored conversation; when the store cannot be written (disk full, locked) or the
    conversation was deleted in another tab, leave the reason for the sidebar instead of a traceback."""
    try:
        action(*args)
        return True
    except (StorageError, NotFound) as exc:
        state.sidebar_error = f"Nothing was changed: {exc}."
        return False


def choose_backend(conversation_id: str, is_stored: bool) -> None:
    """Switch this conversation's model: only this conversation, for every tab that opens it; nobody else's."""
    name = state.get(f"backend_{conversation_id}")
    if is_stored:
        guarded(store.set_backend, workspace, conversation_id, name)
    else:
        state.draft_backend = name


def rename(conversation_id: str) -> None:
    guarded(store.rename_conversation, workspace, conversation_id, state.get(f"title_{conversation_id}", ""))


@st.dialog("Delete this conversation?", on_dismiss=lambda: state.pop("pending_delete", None))
def confirm_delete(conversation_id: str, title: str) -> None:
    st.markdown(f"**{plain(title)}** and all its messages will be deleted. This cannot be undone.")
    left, right = st.columns(2)
    if left.button("Delete", type="primary", key="confirm_delete", width="stretch"):
        state.pop("pending_delete", None)
        if guarded(store.delete_conversation, workspace, conversation_id):
            forget(conversation_id)
            if state.conversation_id == conversation_id:
                switch_to(new_conversation_id())
        st.rerun()
    if right.button("Cancel", key="cancel_delete", width="stretch"):
        state.pop("pending_delete", None)
        st.rerun()


engine = backend_named(backend_name)

with st.sidebar:
    st.header("Conversations")
    st.button(
        "New conversation", key="new_conversation", width="stretch", on_click=lambda: switch_to(new_conversation_id())
    )
    search = st.text_input("Search titles and messages", key="conversation_search", placeholder="Search")
    show_archived = st.toggle("Show archived", key="show_archived")
    summaries = store.list_conversations(workspace, search, archived=show_archived)
    if not summaries:
        st.caption(
            "Nothing matches."
            if search.strip()
            else "No archived conversations."
            if show_archived
            else "No conversations yet."
        )
    for summary in summaries[:LIST_LIMIT]:
        st.button(
            ("📌 " if summary.pinned else "") + plain(summary.title),
            key=f"open_{summary.id}",
            on_click=switch_to,
            args=(summary.id,),
            type="primary" if summary.id == conversation.id else "secondary",
            width="stretch",
            help=f"{summary.message_count} messages",
        )
    if len(summaries) > LIST_LIMIT:
        st.caption(f"{len(summaries) - LIST_LIMIT} more: search, or browse them on the Conversations page.")
    if state.get("sidebar_error"):
        st.error(plain(state.pop("sidebar_error")))
    if stored:
        with st.expander("Rename, pin, archive, share or delete"):
            st.text_input("Title", value=conversation.title, key=f"title_{conversation.id}", max_chars=200)
            st.button("Rename", key="rename_conversation", on_click=rename, args=(conversation.id,), width="stretch")
            left, right = st.columns(2)
            left.button(
                "Unpin" if conversation.pinned else "Pin",
                key="pin_conversation",
                width="stretch",
                on_click=guarded,
                args=(store.set_pinned, workspace, conversation.id, not conversation.pinned),
            )
            right.button(
                "Unarchive" if conversation.archived else "Archive",
                key="archive_conversation",
                width="stretch",
                on_click=guarded,
                args=(store.set_archived, workspace, conversation.id, not conversation.archived),
            )
            token = store.share_token(workspace, conversation.id)
            if token is None:
                st.button(
                    "Share a read-only link",
                    key="share_conversation",
                    width="stretch",
                    on_click=guarded,
                    args=(store.share, workspace, conversation.id),
                )
            else:
                st.caption("Anyone with this link sees this conversation, read-only, and nothing else:")
                st.code(share_url(token), language=None, wrap_lines=True)
                st.button(
                    "Stop sharing",
                    key="revoke_share",
                    width="stretch",
                    on_click=guarded,
                    args=(store.revoke_share, workspace, conversation.id),
                )
            st.button(
                "Delete…",
                key="delete_conversation",
                width="stretch",
                on_click=lambda: state.update(pending_delete=(conversation.id, conversation.title)),
            )

    st.header("Model")
    names = get_hub().names()
    if len(names) > 1:
        st.selectbox(
            "Model for this conversation",
            names,
            index=names.index(backend_name) if backend_name in names else 0,
            key=f"backend_{conversation.id}",
            on_change=choose_backend,
            args=(conversation.id, stored),
            help="Only this conversation switches; its history is sent to the model it talks to now.",
        )
    if get_hub().config_error:
        st.warning(plain(get_hub().config_error))
    if engine is not None and engine.card().get("backend") == "remote":
        card = engine.card()
        st.markdown(f"**{plain(card['name'])}**")
        st.caption(
            f"remote server {plain(card['server'])} · {plain(card.get('status', 'asking the server...'))}"
            + (f" · context {card['max_context']:,} tokens" if card.get("max_context") else "")
        )
        st.caption(f"Not known here: {plain(card['unknown_remotely'])}.")
        load = engine.load_report()
        st.caption(
            f"the server is generating {load['running']} request(s) · {load['waiting']} waiting · "
            f"{load['in_flight_here']} from this portal"
        )
    elif engine is not None:
        card = engine.card()
        st.markdown(f"**{plain(card['name'])}**")
        st.caption(
            f"family {plain(card['family'])} · {card['precision']} · {plain(card['device'])} · "
            f"{card['parameters'] / 1e6:,.0f}M parameters · loaded in {card['load_seconds']:.1f} s"
        )
        if "checkpoint" in card:
            st.caption(plain(card["checkpoint"]))
        memory = engine.memory_report()
        st.caption(
            f"weights {card['weights_bytes'] / 2**20:,.0f} MiB "
            f"({card['quantized_weights_bytes'] / 2**20:,.0f} MiB quantized) · "
            f"KV cache {card['kv_bytes_per_token'] / 1024:,.1f} KiB/token · "
            f"{memory['source']} {memory['current'] / 2**20:,.0f} MiB (peak {memory['peak'] / 2**20:,.0f} MiB) · "
            f"kept caches {memory['kv_cache_bytes'] / 2**20:,.1f} MiB for {memory['kv_cache_conversations']} conversation(s)"
        )
        load = engine.load_report()
        st.caption(
            f"generating for {load['running']} conversation(s) at once (at most {load['max_batch']}) · "
            f"{load['waiting']} waiting"
        )
        fast = card["fast_path"]  # off | compiling | ready | failed: reason
        st.caption(
            f"decode fast path: {card['fast_path_scope'] if fast == 'off' else plain(fast)}"
            + ("" if fast == "off" else f" · {card['fast_path_scope']}")
        )
    if admin_panel():
        with st.expander("Load another model", expanded=engine is None), st.form("load_model"):
            current = engine.spec if engine is not None else ModelSpec.from_settings()
            path = st.text_input(
                "Model folder or .gguf file",
                value=current.path,
                help="'embedded' is the built-in model",
                key="load_path",
            )
            precision = st.selectbox(
                "Precision", ["auto", "fp32", "bf16", "fp16", "int8", "int4"], key="load_precision"
            )
            device = st.selectbox("Device", ["auto", "cpu", "cuda", "mps"], key="load_device")
            family = st.selectbox(
                "ChatGLM family",
                ["auto", "chatglm2", "chatglm3"],
                key="load_family",
                help="For ChatGLM checkpoints in the original layout: overrides what the folder suggests",
            )
            if st.form_submit_button("Load", key="load_button"):
                spec = ModelSpec(path.strip() or "embedded", precision, device, family)
                engine = load_with_progress(spec)  # on failure it shows why and returns the running engine
                if engine is not None and engine.spec == spec:
                    st.rerun()  # redraw the model card
        with st.expander("Remote servers"):
            remote_servers_panel()
    else:
        st.caption("Only admins load another model or add servers.")

    st.header("Generation")
    # The model's defaults (and where each came from) under this workspace's own changes, which are kept.
    defaults = card_defaults(engine.card() if engine is not None else None)
    controls = effective_controls(defaults, store.get_setting(workspace, "sampling", {}))
    if state.get("controls_for") != (workspace, defaults):  # first run, another model, another workspace
        state.update({name: value for name, (value, _) in controls.items()}, controls_for=(workspace, defaults))

    def keep_control() -> None:
        store.set_setting(workspace, "sampling", clean_overrides({name: state[name] for name in CONTROLS}, defaults))

    def reset_controls() -> None:
        store.set_setting(workspace, "sampling", {})
        state.update({name: value for name, (value, _) in effective_controls(defaults, {}).items()})

    def source_of(name: str) -> str:
        return f"{LABELS[name].capitalize()} default: {defaults[name]:g}, from {defaults['sources'][name]}"

    st.number_input(
        "Max length (context + reply tokens)",
        64,
        131072,
        step=512,
        key="max_length",
        on_change=keep_control,
        help=source_of("max_length"),
    )
    st.slider("Max new tokens", 1, 4096, key="max_new_tokens", on_change=keep_control, help=source_of("max_new_tokens"))
    st.slider(
        "Temperature (0 = greedy)",
        0.0,
        2.0,
        step=0.05,
        key="temperature",
        on_change=keep_control,
        help=source_of("temperature"),
    )
    st.slider("Top p", 0.05, 1.0, step=0.05, key="top_p", on_change=keep_control, help=source_of("top_p"))
    st.number_input("Top k (0 = off)", 0, 1000, key="top_k", on_change=keep_control, help=source_of("top_k"))
    st.slider(
        "Repetition penalty",
        0.5,
        2.0,
        step=0.05,
        key="repetition_penalty",
        on_change=keep_control,
        help=source_of("repetition_penalty"),
    )
    own = clean_overrides({name: state[name] for name in CONTROLS}, defaults)
    for line in describe_sources(effective_controls(defaults, own), defaults):
        st.caption(plain(line))
    st.button("Reset to the model's defaults", key="reset_controls", on_click=reset_controls, width="stretch")

    # System prompt: this workspace's presets fill it; it is kept for the workspace as typed.
    presets = store.list_presets(workspace)
    if "system_prompt" not in state:
        state.system_prompt = store.get_setting(workspace, "system_prompt", "")

    def apply_preset() -> None:
        state.system_prompt = presets.get(state.preset_choice, "")
        store.set_setting(workspace, "system_prompt", state.system_prompt)

    def save_preset() -> None:
        try:
            name = store.save_preset(workspace, state.get("preset_name", ""), state.system_prompt)
        except ValueError as exc:
            state.preset_error = str(exc)
        else:
            state.preset_choice, state.preset_name = name, ""

    system_prompt = st.text_area(
        "System prompt",
        key="system_prompt",
        max_chars=MAX_SYSTEM_PROMPT_CHARS,
        on_change=lambda: store.set_setting(workspace, "system_prompt", state.system_prompt),
    )
    with st.expander(f"System-prompt presets ({len(presets)})"):
        choice = st.selectbox(
            "Preset",
            list(presets),
            index=None,
            key="preset_choice",
            placeholder="Choose a preset" if presets else "None yet: save one below",
        )
        left, right = st.columns(2)
        left.button("Use", key="use_preset", on_click=apply_preset, disabled=choice is None, width="stretch")
        right.button(
            "Delete",
            key="delete_preset",
            disabled=choice is None,
            width="stretch",
            on_click=lambda: (store.delete_preset(workspace, choice), state.update(preset_choice=None)),
        )
        st.text_input("Preset name (saves the text above)", key="preset_name", max_chars=60)
        st.button("Save as preset", key="save_preset", on_click=save_preset, width="stretch")
        if "preset_error" in state:
            st.error(state.pop("preset_error"))

if state.get("pending_delete"):
    confirm_delete(*state.pending_delete)

st.title("GLM Chat")
if stored:
    st.caption(plain(conversation.title))
if len(get_hub().names()) > 1 and backend_name is not None:
    st.caption(f"Talking to {plain(backend_name)}" + (f" ({plain(engine.card()['name'])})" if engine else ""))
if backend_note:
    st.info(plain(backend_note))
if engine is None:
    st.info("No model is loaded. Choose one in the sidebar.")

# ---- what this run does: a new prompt, or a regenerate / edit requested by a button of the previous run ---------

prompt = st.chat_input("Ask anything", max_chars=MAX_PROMPT_CHARS, submit_mode="stop", disabled=engine is None)
# {"keep": messages kept, "prompt": new prompt or None, "last": id of the last message the page showed}
action = state.pop("pending_action", None)
last_shown = conversation.messages[-1].id if conversation.messages else None
if prompt is not None and prompt.strip():
    action = {"keep": len(conversation.messages), "prompt": prompt.strip(), "last": last_shown}
if engine is None:
    action = None
if action is not None and action["last"] != last_shown:  # a button drawn before another tab changed this conversation
    st.error(CONVERSATION_CHANGED)
    if action["prompt"]:
        st.code(action["prompt"], language=None, wrap_lines=True)
    action = None


def regenerate(keep: int, last: int | None) -> None:
    """Another version of the reply after the first `keep` messages (the old one stays, to flip back to).
    `last`: the last message when the button was drawn (a stale button in a second tab is refused)."""
    state.pending_action = {"keep": keep, "prompt": None, "last": last}


def send_edit(keep: int, last: int | None) -> None:
    """The edited prompt starts a branch after the first `keep` messages (the original stays, to flip back to)."""
    text = (state.get("edit_text") or "").strip()
    state.pop("editing", None)
    if text:
        state.pending_action = {"keep": keep, "prompt": text, "last": last}


def choose(message_id: int) -> None:
    store.choose_version(workspace, conversation.id, message_id)


def message_actions(index: int, message: ChatMessage, idle: bool) -> None:
    """Under a message: ‹ 2/3 › between its versions, copy, and Edit (a prompt) or Regenerate (a reply)."""
    row = st.container(horizontal=True, vertical_alignment="center")
    place, count, before, after = conversation.version_switch(message)
    if count > 1:
        row.button(
            "‹",
            key=f"previous_{message.id}",
            on_click=choose,
            args=(before,),
            type="tertiary",
            disabled=not idle or before is None,
            help="Previous version",
        )
        row.caption(f"{place}/{count}", width="content")
        row.button(
            "›",
            key=f"next_{message.id}",
            on_click=choose,
            args=(after,),
            type="tertiary",
            disabled=not idle or after is None,
            help="Next version",
        )
    with row.popover("Copy", icon=":material/content_copy:", type="tertiary", key=f"copy_{message.id}"):
        st.code(message.content, language="markdown", wrap_lines=True)  # its copy button copies the raw text
    if not idle:
        return
    if message.role == "user":
        row.button(
            "Edit",
            key=f"edit_{message.id}",
            type="tertiary",
            icon=":material/edit:",
            on_click=lambda: state.update(editing=message.id),
        )
        if index == len(conversation.messages) - 1:  # the prompt has no reply (it was taken back or failed)
            row.button(
                "Get a reply",
                key=f"regenerate_{message.id}",
                type="tertiary",
                on_click=regenerate,
                args=(index + 1, last_shown),
            )
    elif message.role == "assistant" and index > 0 and conversation.messages[index - 1].role == "user":
        row.button(
            "Regenerate",
            key=f"regenerate_{message.id}",
            type="tertiary",
            icon=":material/refresh:",
            on_click=regenerate,
            args=(index, last_shown),
        )


shown = conversation.messages[: action["keep"]] if action else conversation.messages
for index, message in enumerate(shown):
    with st.chat_message(message.role):
        idle = action is None and engine is not None
        if idle and message.role == "user" and state.get("editing") == message.id:
            st.text_area("Edit your message", value=message.content, key="edit_text", max_chars=MAX_PROMPT_CHARS)
            left, right = st.columns(2)
            left.button(
                "Send", key="edit_send", on_click=send_edit, args=(index, last_shown), type="primary", width="stretch"
            )
            right.button("Cancel", key="edit_cancel", on_click=lambda: state.pop("editing", None), width="stretch")
            continue
        show_message(message)
        message_actions(index, message, idle)

if action is not None:
    turn = None
    try:
        # The person's own settings (the widgets that differ from the model's defaults) over those defaults.
        params, _ = compose_params(defaults, saved=own)
        turn = start_turn(
            store,
            engine,
            workspace,
            conversation,
            keep=action["keep"],
            prompt=action["prompt"],
            params=params,
            system_prompt=system_prompt,
            owner=workspace,
            expected_last_id=action.get("last"),
        )
    except (ValueError, ConversationBusy, NotFound, ConversationChanged, StorageError, QueueFull, EngineClosed) as exc:
        if isinstance(exc, QueueFull):
            st.error(f"The model is busy, try again in a moment. {plain(exc)}")
        elif isinstance(exc, EngineClosed):
            st.error(f"Not sent: {plain(exc)}. Send it again once the model has loaded.")
        elif isinstance(exc, StorageError):
            st.error(f"Not sent: {plain(exc)}. Send it again in a moment.")
        else:
            st.error(plain(exc))
        if action["prompt"]:
            st.code(action["prompt"], language=None, wrap_lines=True)  # nothing typed is lost

    if turn is not None:
        if action["prompt"] is not None:
            with st.chat_message("user"):
                st.markdown(no_remote_images(action["prompt"]))
        with st.chat_message("assistant"):
            status, notes = st.empty(), []

            def on_event(event):
                if isinstance(event, Queued):
                    status.info(
                        f"Waiting for a place in the batch: {event.position - 1} request(s) ahead of yours."
                        if event.position > 1
                        else "Waiting for a place in the batch: yours is next."
                    )
                elif isinstance(event, Started):
                    status.empty()
                elif isinstance(event, Truncated):
                    notes.append(event.describe())

            try:
                st.write_stream(StreamWithoutImages().wrap(turn.text_stream(on_event)))
            finally:
                # Also runs when the user presses stop or leaves: the partial reply is kept and marked stopped.
                result = turn.finish()
        # Redraw from the store, so the new turn gets its buttons and the sidebar lists it; what is not stored
        # (notes, a reply that failed) is shown once after the redraw.
        failed = result.reply.error if result.reply is not None else "The model did not answer in time."
        if result.storage_error:
            failed = f"The reply could not be stored ({result.storage_error}); it is shown below once."
        state.after_turn = {
            "notes": notes,
            "error": failed if result.message is None else None,
            "handback": action["prompt"] if result.prompt_taken_back else None,
            "unstored": result.reply.text if result.storage_error and result.reply is not None else None,
        }
        st.rerun()

after_turn = state.pop("after_turn", None)
if after_turn:
    for note in after_turn["notes"]:
        st.info(plain(note))
    if after_turn["error"]:
        st.error(plain(after_turn["error"]))
    if after_turn.get("unstored"):
        with st.chat_message("assistant"):
            st.markdown(no_remote_images(after_turn["unstored"]))
    if after_turn["handback"]:
        st.caption("Your message was not added to the conversation; here it is to edit and resend:")
        st.code(after_turn["handback"], language=None)
