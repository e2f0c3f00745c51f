"""A conversation opened by its share link (?share=TOKEN): that conversation only, read-only, as its chosen path."""

import streamlit as st

from glm_core.safe_markdown import plain
from ui.render import avatar, show_message
from ui.resources import get_store

st.set_page_config(page_title="Shared conversation", page_icon="🔗", layout="centered")

conversation = get_store().shared_conversation(st.query_params.get("share"))
if conversation is None:
    st.title("Shared conversation")
    st.info("This link is not valid, or its owner stopped sharing the conversation.")
    st.stop()

st.title(plain(conversation.title))
st.caption(f"Shared read-only · {len(conversation.messages)} messages")
for message in conversation.messages:
    with st.chat_message(message.role, avatar=avatar(message.role)):
        show_message(message)
