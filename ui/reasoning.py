"""A reasoning model's replies on the chat page (GLM-Z1, GLM-4.5+): the thinking in a collapsible section above
the answer, streamed as it comes and folded once the answer starts; the conversation's switch that turns the
thinking off where the chat template supports it. The split itself is glm_core.reasoning's."""

from __future__ import annotations

from collections.abc import Iterator

import streamlit as st

from glm_core.conversations.conversation import Conversation
from glm_core.protocol import ModelCard
from glm_core.reasoning import ReasoningSplitter
from glm_core.safe_markdown import StreamWithoutImages, no_remote_images


def thinking_switch(card: ModelCard | None, conversation: Conversation) -> bool | None:
    """The conversation's thinking switch, where the model's template has one (None elsewhere): on by default, as
    its last reply had it otherwise."""
    if card is None or not card.thinking_switch:
        return None
    chosen = conversation.thinking_choice()
    return st.toggle(
        "Think before answering",
        value=True if chosen is None else chosen,
        key=f"thinking_{conversation.id}",
        help="This model reasons in <think>...</think> first; off, it answers at once (enable_thinking=false).",
    )


def stream_reply(deltas: Iterator[str]) -> None:
    """The reply as it streams: thinking in an expander that stays open while the model thinks, then the answer
    below it."""
    place = st.empty()  # where the thinking goes, above the answer
    splitter, shown = ReasoningSplitter(), {"text": "", "box": None}

    def think(text: str) -> None:
        if not text:
            return
        if shown["box"] is None:
            shown["box"] = place.container().expander("Thinking", expanded=True, icon=":material/psychology:").empty()
        shown["text"] += text
        shown["box"].markdown(no_remote_images(shown["text"]))

    def answers() -> Iterator[str]:
        for delta in deltas:
            reasoning, answer = splitter.push(delta)
            think(reasoning)
            if answer:
                yield answer
        reasoning, answer = splitter.flush()
        think(reasoning)
        if answer:
            yield answer

    st.write_stream(StreamWithoutImages().wrap(answers()))


def show_thinking(reasoning: str) -> None:
    """A stored reply's thinking, folded above its answer."""
    with st.expander("Thinking", expanded=False, icon=":material/psychology:"):
        st.markdown(no_remote_images(reasoning))
