"""The chat page's conversations: which one is open (its id in the session and, once stored, in the URL as ?c=),
the sidebar list with search, and the actions on one (rename, pin, archive, share, delete, its model)."""

from __future__ import annotations

from dataclasses import dataclass

import streamlit as st

from glm_core.conversations.conversation import Conversation, new_conversation_id
from glm_core.conversations.store import NotFound, StorageError, Store
from glm_core.safe_markdown import plain
from ui.accounting import share_link, stop_sharing, visible_backends
from ui.render import share_url
from ui.resources import get_hub

LIST_LIMIT = 50  # conversations listed in the sidebar; search or the Conversations page find the rest


def open_conversation(store: Store, workspace: str) -> tuple[Conversation, bool]:
    """The conversation this session shows, read from the store on every run (another tab of this workspace may
    have changed it), and whether it is stored; not stored yet, it is a draft, stored with its first message."""
    state = st.session_state
    if state.get("conversation_workspace") != workspace:  # first run, or another user signed in on this session
        state.pop("conversation_id", None)
        state.conversation_workspace = workspace
    if "conversation_id" not in state:
        from_url = st.query_params.get("c")
        state.conversation_id = (
            from_url if from_url and store.get_conversation(workspace, from_url) else new_conversation_id()
        )
    conversation = store.get_conversation(workspace, state.conversation_id) or Conversation(id=state.conversation_id)
    stored = conversation.updated_at is not None
    if stored:
        st.query_params["c"] = conversation.id
    elif "c" in st.query_params:
        del st.query_params["c"]
    return conversation, stored


@dataclass
class ConversationActions:
    """What the buttons do to this workspace's conversations (Streamlit callbacks: they run before the redraw)."""

    store: Store
    workspace: str

    def switch_to(self, conversation_id: str) -> None:
        st.session_state.conversation_id = conversation_id
        st.session_state.pop("editing", None)

    def guarded(self, action, *args) -> bool:
        """Run a change to a stored conversation; when the store cannot be written (disk full, locked) or the
        conversation was deleted in another tab, leave the reason for the sidebar instead of a traceback."""
        try:
            action(*args)
            return True
        except (StorageError, NotFound) as exc:
            st.session_state.sidebar_error = f"Nothing was changed: {exc}."
            return False

    def choose_backend(self, conversation_id: str, is_stored: bool) -> None:
        """Switch this conversation's model: only this conversation, for every tab that opens it; nobody else's."""
        name = st.session_state.get(f"backend_{conversation_id}")
        if is_stored:
            self.guarded(self.store.set_backend, self.workspace, conversation_id, name)
        else:
            st.session_state.draft_backend = name

    def rename(self, conversation_id: str) -> None:
        title = st.session_state.get(f"title_{conversation_id}", "")
        self.guarded(self.store.rename_conversation, self.workspace, conversation_id, title)

    def delete(self, conversation_id: str) -> None:
        if self.guarded(self.store.delete_conversation, self.workspace, conversation_id):
            engine = get_hub().engine
            if engine is not None:
                engine.forget(conversation_id)
            if st.session_state.conversation_id == conversation_id:
                self.switch_to(new_conversation_id())


@st.dialog("Delete this conversation?", on_dismiss=lambda: st.session_state.pop("pending_delete", None))
def confirm_delete(actions: ConversationActions, conversation_id: str, title: str) -> None:
    st.markdown(f"**{plain(title)}** and all its messages will be deleted. This cannot be undone.")
    left, right = st.columns(2)
    if left.button("Delete", type="primary", key="confirm_delete", width="stretch"):
        st.session_state.pop("pending_delete", None)
        actions.delete(conversation_id)
        st.rerun()
    if right.button("Cancel", key="cancel_delete", width="stretch"):
        st.session_state.pop("pending_delete", None)
        st.rerun()


def conversation_list(actions: ConversationActions, conversation: Conversation) -> None:
    """The sidebar's list: a new conversation, search, archived ones, and the workspace's conversations."""
    st.button(
        "New conversation",
        key="new_conversation",
        width="stretch",
        on_click=lambda: actions.switch_to(new_conversation_id()),
    )
    search = st.text_input("Search titles and messages", key="conversation_search", placeholder="Search")
    show_archived = st.toggle("Show archived", key="show_archived")
    summaries = actions.store.list_conversations(actions.workspace, search, archived=show_archived)
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
            on_click=actions.switch_to,
            args=(summary.id,),
            type="primary" if summary.id == conversation.id else "secondary",
            width="stretch",
            help=f"{summary.message_count} messages",
        )
    if len(summaries) > LIST_LIMIT:
        st.caption(f"{len(summaries) - LIST_LIMIT} more: search, or browse them on the Conversations page.")
    if st.session_state.get("sidebar_error"):
        st.error(plain(st.session_state.pop("sidebar_error")))


def conversation_menu(actions: ConversationActions, conversation: Conversation) -> None:
    """Rename, pin, archive, share or delete the open (stored) conversation."""
    store, workspace = actions.store, actions.workspace
    with st.expander("Rename, pin, archive, share or delete"):
        st.text_input("Title", value=conversation.title, key=f"title_{conversation.id}", max_chars=200)
        st.button(
            "Rename", key="rename_conversation", on_click=actions.rename, args=(conversation.id,), width="stretch"
        )
        left, right = st.columns(2)
        left.button(
            "Unpin" if conversation.pinned else "Pin",
            key="pin_conversation",
            width="stretch",
            on_click=actions.guarded,
            args=(store.set_pinned, workspace, conversation.id, not conversation.pinned),
        )
        right.button(
            "Unarchive" if conversation.archived else "Archive",
            key="archive_conversation",
            width="stretch",
            on_click=actions.guarded,
            args=(store.set_archived, workspace, conversation.id, not conversation.archived),
        )
        token = store.share_token(workspace, conversation.id)
        if token is None:
            st.button(
                "Share a read-only link",
                key="share_conversation",
                width="stretch",
                on_click=actions.guarded,
                args=(share_link, store, workspace, conversation.id),
            )
        else:
            st.caption("Anyone with this link sees this conversation, read-only, and nothing else:")
            st.code(share_url(token), language=None, wrap_lines=True)
            st.button(
                "Stop sharing",
                key="revoke_share",
                width="stretch",
                on_click=actions.guarded,
                args=(stop_sharing, store, workspace, conversation.id),
            )
        st.button(
            "Delete…",
            key="delete_conversation",
            width="stretch",
            on_click=lambda: st.session_state.update(pending_delete=(conversation.id, conversation.title)),
        )


def model_choice(actions: ConversationActions, conversation: Conversation, stored: bool, backend_name) -> None:
    """Which model this conversation talks to, where there is more than one."""
    names = visible_backends(get_hub().names())
    if len(names) > 1:
        st.selectbox(
            "Model for this conversation",
            names,
            index=names.index(backend_name) if backend_name in names else 0,
            key=f"backend_{conversation.id}",
            on_change=actions.choose_backend,
            args=(conversation.id, stored),
            help="Only this conversation switches; its history is sent to the model it talks to now.",
        )
