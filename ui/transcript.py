"""The chat page's main column: the conversation's messages with their versions and actions, and the turn this run
starts (a new prompt, or a regenerate / edit asked for by a button of the previous run) streamed as it comes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import streamlit as st

from glm_core import Backend, ConversationBusy, EngineClosed, Queued, QueueFull, Started, Truncated
from glm_core.admin.quotas import QuotaExceeded
from glm_core.conversations.conversation import ChatMessage, Conversation
from glm_core.conversations.store import CONVERSATION_CHANGED, ConversationChanged, NotFound, StorageError, Store
from glm_core.conversations.turn import start_turn
from glm_core.protocol import MAX_PROMPT_CHARS
from glm_core.safe_markdown import no_remote_images, plain
from glm_core.sampling_defaults import compose_params
from glm_core.tool_calls import MAX_RESULT_CHARS
from ui.accounting import admit_turn, quota_refusal
from ui.generation_controls import Generation
from ui.reasoning import stream_reply
from ui.render import TOOL_AVATAR, avatar, show_message, show_tool_result
from ui.tools_panel import after_forced_call


@dataclass
class Transcript:
    store: Store
    workspace: str
    conversation: Conversation

    @property
    def last_shown(self) -> int | None:
        messages = self.conversation.messages
        return messages[-1].id if messages else None

    # ---- this run's action: {"keep": messages kept, "prompt": new prompt or None, "last": last message shown,
    # "results": tool results [{"id", "name", "content"}] answering the last reply's calls (instead of a prompt)} ----

    def take_action(self, prompt: str | None, engine: Backend | None) -> dict | None:
        action = st.session_state.pop("pending_action", None)
        if prompt is not None and prompt.strip():
            action = {"keep": len(self.conversation.messages), "prompt": prompt.strip(), "last": self.last_shown}
        if engine is None:
            return None
        if action is not None and action["last"] != self.last_shown:  # a button drawn before another tab changed it
            st.error(CONVERSATION_CHANGED)
            if action["prompt"]:
                st.code(action["prompt"], language=None, wrap_lines=True)
            return None
        return action

    def regenerate(self, keep: int, last: int | None) -> None:
        """Another version of the reply after the first `keep` messages (the old one stays, to flip back to).
        `last`: the last message when the button was drawn (a stale button in a second tab is refused)."""
        st.session_state.pending_action = {"keep": keep, "prompt": None, "last": last}

    def send_edit(self, keep: int, last: int | None) -> None:
        """The edited prompt starts a branch after the first `keep` messages (the original stays, to flip back to)."""
        text = (st.session_state.get("edit_text") or "").strip()
        st.session_state.pop("editing", None)
        if text:
            st.session_state.pending_action = {"keep": keep, "prompt": text, "last": last}

    def send_results(self, calls: list[dict], last: int | None) -> None:
        """The tool results typed for the last reply's calls start the next turn (each result after its call)."""
        state = st.session_state
        typed = [(call, (state.get(f"tool_result_{call['id']}") or "").strip()) for call in calls]
        missing = [call["name"] for call, text in typed if not text]
        if missing:
            state.tool_results_error = f"Enter the result of {', '.join(missing)} first (the tool's output, as text)."
            return
        results = [{"id": call["id"], "name": call["name"], "content": text} for call, text in typed]
        state.pending_action = {
            "keep": len(self.conversation.messages),
            "prompt": None,
            "results": results,
            "last": last,
        }

    def choose(self, message_id: int) -> None:
        self.store.choose_version(self.workspace, self.conversation.id, message_id)

    # ---- drawing ------------------------------------------------------------------------------------------------

    def show(self, action: dict | None, engine: Backend | None) -> None:
        messages = self.conversation.messages
        shown = messages[: action["keep"]] if action else messages
        idle = action is None and engine is not None
        for index, message in enumerate(shown):
            with st.chat_message(message.role, avatar=avatar(message.role)):
                if idle and message.role == "user" and st.session_state.get("editing") == message.id:
                    self.edit_box(index, message)
                    continue
                show_message(message)
                self.message_actions(index, message, idle)
        calls = self.conversation.pending_calls()
        if idle and calls:
            self.results_form(calls)

    def results_form(self, calls: list[dict]) -> None:
        """The last reply called tools: the person runs them and enters what each returned; the model then goes on
        with the results in its history (ChatGLM3's and GLM-4's observation)."""
        with st.chat_message("tool", avatar=TOOL_AVATAR):
            st.caption("The model is waiting for the tools' results. Run them yourself and enter what they returned:")
            with st.form("tool_results", border=False):
                for call in calls:
                    st.text_area(
                        f"Result of {plain(call['name'])}",
                        key=f"tool_result_{call['id']}",
                        max_chars=MAX_RESULT_CHARS,
                        placeholder='e.g. {"temperature": 21, "sky": "clear"}',
                    )
                st.form_submit_button(
                    "Send the result" if len(calls) == 1 else "Send the results",
                    type="primary",
                    on_click=self.send_results,
                    args=(calls, self.last_shown),
                )
            if "tool_results_error" in st.session_state:
                st.error(plain(st.session_state.pop("tool_results_error")))

    def edit_box(self, index: int, message: ChatMessage) -> None:
        st.text_area("Edit your message", value=message.content, key="edit_text", max_chars=MAX_PROMPT_CHARS)
        left, right = st.columns(2)
        left.button(
            "Send",
            key="edit_send",
            on_click=self.send_edit,
            args=(index, self.last_shown),
            type="primary",
            width="stretch",
        )
        right.button(
            "Cancel", key="edit_cancel", on_click=lambda: st.session_state.pop("editing", None), width="stretch"
        )

    def message_actions(self, index: int, message: ChatMessage, idle: bool) -> None:
        """Under a message: ‹ 2/3 › between its versions, copy, and Edit (a prompt) or Regenerate (a reply)."""
        messages = self.conversation.messages
        row = st.container(horizontal=True, vertical_alignment="center")
        place, count, before, after = self.conversation.version_switch(message)
        if count > 1:
            self.version_button(row, "‹", before, f"previous_{message.id}", "Previous version", idle)
            row.caption(f"{place}/{count}", width="content")
            self.version_button(row, "›", after, f"next_{message.id}", "Next version", idle)
        with row.popover("Copy", icon=":material/content_copy:", type="tertiary", key=f"copy_{message.id}"):
            st.code(copy_text(message), language="markdown", wrap_lines=True)  # its copy button copies the raw text
        if not idle:
            return
        if message.role == "tool" and index == len(messages) - 1:
            row.button(  # the results were entered but the reply to them failed or was taken back
                "Get a reply",
                key=f"regenerate_{message.id}",
                type="tertiary",
                on_click=self.regenerate,
                args=(index + 1, self.last_shown),
            )
        if message.role == "user":
            row.button(
                "Edit",
                key=f"edit_{message.id}",
                type="tertiary",
                icon=":material/edit:",
                on_click=lambda: st.session_state.update(editing=message.id),
            )
            if index == len(messages) - 1:  # the prompt has no reply (it was taken back or failed)
                row.button(
                    "Get a reply",
                    key=f"regenerate_{message.id}",
                    type="tertiary",
                    on_click=self.regenerate,
                    args=(index + 1, self.last_shown),
                )
        elif message.role == "assistant" and index > 0 and messages[index - 1].role in ("user", "tool"):
            row.button(
                "Regenerate",
                key=f"regenerate_{message.id}",
                type="tertiary",
                icon=":material/refresh:",
                on_click=self.regenerate,
                args=(index, self.last_shown),
            )

    def version_button(self, row, label: str, target: int | None, key: str, help_text: str, idle: bool) -> None:
        row.button(
            label,
            key=key,
            on_click=self.choose,
            args=(target,),
            type="tertiary",
            disabled=not idle or target is None,
            help=help_text,
        )

    # ---- the turn -----------------------------------------------------------------------------------------------

    def run_turn(self, action: dict, engine: Backend, generation: Generation) -> None:
        """Start the turn, stream the reply, and rerun so the page redraws it from the store."""
        try:
            ticket = admit_turn()  # the person's quotas, before anything is queued or stored
        except QuotaExceeded as exc:
            quota_refusal(exc, action["prompt"])
            return
        try:
            # The person's own settings (the widgets that differ from the model's defaults) over those defaults.
            params, _ = compose_params(generation.defaults, saved=generation.own)
            if generation.thinking is not None:
                params = dataclasses.replace(params, thinking=generation.thinking)
            results = [
                ChatMessage("tool", r["content"], tool_call_id=r["id"], tool_name=r["name"])
                for r in action.get("results") or []
            ]
            turn = start_turn(
                self.store,
                engine,
                self.workspace,
                self.conversation,
                keep=action["keep"],
                prompt=action["prompt"],
                params=params,
                system_prompt=generation.system_prompt,
                owner=self.workspace,
                expected_last_id=action.get("last"),
                tool_results=results,
                tools=self.conversation.tools if generation.tool_choice is not None else [],
                tool_choice=generation.tool_choice or "auto",
            )
        except (
            ValueError,
            ConversationBusy,
            NotFound,
            ConversationChanged,
            StorageError,
            QueueFull,
            EngineClosed,
        ) as exc:
            ticket.cancel()
            st.error(refusal_message(exc))
            if action["prompt"]:
                st.code(action["prompt"], language=None, wrap_lines=True)  # nothing typed is lost
            for result in action.get("results") or []:
                st.code(result["content"], language=None, wrap_lines=True)
            return

        if action["prompt"] is not None:
            with st.chat_message("user"):
                st.markdown(no_remote_images(action["prompt"]))
        for result in results:
            with st.chat_message("tool", avatar=TOOL_AVATAR):
                show_tool_result(result)
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
                # A reply that opens with <think> streams its thinking into a folding section (glm_core.reasoning's
                # rule: a remote reasoning server's replies come that way too); any other reply streams as it is.
                stream_reply(turn.text_stream(on_event))
            finally:
                # Also runs when the user presses stop or leaves: the partial reply is kept and marked stopped.
                result = turn.finish()
                ticket.finish(engine.card(), result.reply, backend=self.conversation.backend)
        # Redraw from the store, so the new turn gets its buttons and the sidebar lists it; what is not stored
        # (notes, a reply that failed) is shown once after the redraw.
        failed = result.reply.error if result.reply is not None else "The model did not answer in time."
        if result.storage_error:
            failed = f"The reply could not be stored ({result.storage_error}); it is shown below once."
        after_forced_call(
            self.conversation.id, generation.tool_choice, bool(result.message is not None and result.message.tool_calls)
        )
        st.session_state.after_turn = {
            "notes": notes,
            "error": failed if result.message is None else None,
            "handback": handback(action) if result.prompt_taken_back else None,
            "unstored": result.reply.text if result.storage_error and result.reply is not None else None,
        }
        st.rerun()


def handback(action: dict) -> str | None:
    """What was typed for a turn that was taken back: the prompt, or the tool results."""
    if action["prompt"] is not None:
        return action["prompt"]
    return "\n\n".join(f"{r['name']}: {r['content']}" for r in action.get("results") or []) or None


def copy_text(message: ChatMessage) -> str:
    """A message as its copy button copies it: the text, and a reply's calls as `name(arguments)` lines."""
    calls = "\n".join(f"{call['name']}({call['arguments']})" for call in message.tool_calls or [])
    return "\n\n".join(part for part in (message.content, calls) if part)


def refusal_message(exc: Exception) -> str:
    """Why a turn was not started, in the words the page shows."""
    if isinstance(exc, QueueFull):
        return f"The model is busy, try again in a moment. {plain(exc)}"
    if isinstance(exc, EngineClosed):
        return f"Not sent: {plain(exc)}. Send it again once the model has loaded."
    if isinstance(exc, StorageError):
        return f"Not sent: {plain(exc)}. Send it again in a moment."
    return plain(exc)


def after_turn() -> None:
    """What the last turn left to say once: notes, an error, an unstored reply, a prompt handed back."""
    left = st.session_state.pop("after_turn", None)
    if not left:
        return
    for note in left["notes"]:
        st.info(plain(note))
    if left["error"]:
        st.error(plain(left["error"]))
    if left.get("unstored"):
        with st.chat_message("assistant"):
            st.markdown(no_remote_images(left["unstored"]))
    if left["handback"]:
        st.caption("Your message was not added to the conversation; here it is to edit and resend:")
        st.code(left["handback"], language=None)
