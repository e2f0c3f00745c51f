"""Conversations page: the workspace's conversations as a table, filters, export and import."""

from datetime import UTC, datetime, time

import pandas as pd
import streamlit as st

from glm_core.conversations.exchange import (
    EXPORT_FORMATS,
    MAX_IMPORT_BYTES,
    ImportRejected,
    check_import_size,
    export_conversations,
    export_file_name,
    import_file,
)
from glm_core.conversations.store import StorageError
from glm_core.safe_markdown import plain
from ui.access import current_workspace
from ui.resources import get_store

st.set_page_config(page_title="Conversations", page_icon="🗂️", layout="wide")
workspace = current_workspace()
store = get_store()

st.title("Conversations")
table_area = st.container()  # filled after the import section, so a file imported in this run is listed

# ---- import ------------------------------------------------------------------------------------------------

st.header("Import")
st.caption(
    f"A JSON file of at most {MAX_IMPORT_BYTES // 2**20} MiB: this app's JSON export, an OpenAI-style "
    '`{"messages": [...]}`, or ChatGLM history pairs `[[question, answer], ...]`. The file is checked whole first: '
    "if anything is wrong, nothing is imported."
)
uploaded = st.file_uploader(
    "Conversation file", type=["json"], key="import_file", max_upload_size=MAX_IMPORT_BYTES // 2**20
)
if st.button("Import", key="import_button", disabled=uploaded is None):
    try:
        check_import_size(uploaded.size)  # before reading it
        imported = import_file(store, workspace, uploaded.getvalue())
    except (ImportRejected, StorageError) as exc:
        st.error(f"Not imported: {plain(exc)}. Nothing was changed.")
    else:
        st.success(f"Imported {len(imported)} conversation(s).")

# ---- the table, filters and export -------------------------------------------------------------------------

with table_area:
    everything = store.list_conversations(workspace)
    if not everything:
        st.info("No conversations in this workspace yet. Chat on the Home page, or import a file below.")
        st.stop()

    left, middle, right = st.columns(3)
    search = left.text_input("Search titles and messages", key="filter_search")
    models = sorted({model for s in everything for model in s.models})
    chosen_models = middle.multiselect("Model", models, key="filter_models", placeholder="Any model")
    since = right.date_input("Active since", value=None, key="filter_since", format="YYYY-MM-DD")

    listed = store.list_conversations(workspace, search) if search.strip() else everything
    if chosen_models:
        listed = [s for s in listed if set(chosen_models) & set(s.models)]
    if since is not None:
        start = datetime.combine(since, time.min).astimezone().timestamp()  # local midnight
        listed = [s for s in listed if s.updated_at >= start]

    table = pd.DataFrame(
        {
            "Title": [s.title for s in listed],
            "Messages": [s.message_count for s in listed],
            "Started": [datetime.fromtimestamp(s.created_at, UTC) for s in listed],
            "Last active": [datetime.fromtimestamp(s.updated_at, UTC) for s in listed],
            "Models": [", ".join(s.models) for s in listed],
            "Talks to": [s.backend or "(default)" for s in listed],
            "Prompt tokens": [s.prompt_tokens for s in listed],
            "Completion tokens": [s.completion_tokens for s in listed],
            "Unfinished replies": [s.unfinished for s in listed],
            "Pinned": [s.pinned for s in listed],
            "Archived": [s.archived for s in listed],
            "Shared": [s.shared for s in listed],
        }
    )
    st.caption(f"{len(listed)} of {len(everything)} conversation(s)")
    st.dataframe(
        table,
        hide_index=True,
        column_config={
            "Started": st.column_config.DatetimeColumn(format="YYYY-MM-DD HH:mm"),
            "Last active": st.column_config.DatetimeColumn(format="YYYY-MM-DD HH:mm"),
        },
        key="conversation_table",
    )

    st.header("Export")
    titles = {s.id: f"{s.title} · {datetime.fromtimestamp(s.updated_at):%Y-%m-%d %H:%M}" for s in listed}
    picked = st.multiselect(
        f"Conversations to export (none chosen: all {len(listed)} listed above)",
        list(titles),
        format_func=titles.get,
        key="export_selection",
    )
    ids = picked or list(titles)
    if ids:
        heads = [s for s in listed if s.id in set(ids)]
        columns = st.columns(len(EXPORT_FORMATS))
        for column, (fmt, spec) in zip(columns, EXPORT_FORMATS.items()):
            column.download_button(
                spec.label,
                help=spec.description,
                # Built when clicked (deferred), from the store as it is then: nothing is held in memory meanwhile.
                data=lambda fmt=fmt, ids=tuple(ids): export_conversations(store.get_conversations(workspace, ids), fmt),
                file_name=export_file_name(heads, fmt),
                mime=spec.mime,
                key=f"export_{fmt}",
                on_click="ignore",
                width="stretch",
            )
    if len(picked) == 1 and st.button("Open in chat", key="open_in_chat"):
        st.session_state.conversation_id = picked[0]
        st.switch_page("ui/pages/chat.py")
