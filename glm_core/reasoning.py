"""Reasoning replies: GLM-Z1 and GLM-4.5+ think inside <think>...</think> before they answer.

One rule everywhere (the engine's stream, the store, the API, exports, the page): a reply that opens with
`<think>` (after whitespace) holds its reasoning up to `</think>`; the rest is its answer. A reply that does not
open with it has no reasoning. Where the chat template itself opens the thinking in the prompt (GLM-Z1's
generation prompt ends with `<think>`), the engine starts the reply's text with the tag, so the rule holds for
every reply it stores or streams. The raw reply is what the store keeps: both parts, as generated.

No torch, no streamlit: the conversation layer and the API use it.
"""

from __future__ import annotations

OPEN = "<think>"
CLOSE = "</think>"


def split_reasoning(text: str) -> tuple[str, str]:
    """(reasoning, answer) of a whole reply; ("", text) when it does not open with <think>. A reply cut off
    while thinking (a stop, the length limit) is all reasoning and no answer."""
    splitter = ReasoningSplitter()
    reasoning, answer = splitter.push(text)
    more_reasoning, more_answer = splitter.flush()
    return reasoning + more_reasoning, answer + more_answer


def join_reasoning(reasoning: str, answer: str) -> str:
    """The raw reply back from its parts (an imported conversation's reasoning_content and content)."""
    return f"{OPEN}{reasoning}{CLOSE}\n{answer}" if reasoning else answer


class ReasoningSplitter:
    """Splits a streamed reply into reasoning and answer deltas as they arrive. A tag split across deltas is held
    back until it is whole; whitespace between the tags and the texts is dropped (GLM-4.5 writes
    "<think>...</think>\\n" before its answer)."""

    def __init__(self):
        self.state = "start"  # start -> reasoning -> answer, or start -> answer
        self.pending = ""  # text held back: a possible tag prefix, or whitespace whose fate is unknown yet
        self.started = False  # the thinking's first non-blank character has come

    def push(self, text: str) -> tuple[str, str]:
        """(reasoning delta, answer delta) for the next piece of the reply."""
        self.pending += text
        reasoning = answer = ""
        while True:
            if self.state == "start":
                stripped = self.pending.lstrip()
                if stripped.startswith(OPEN):
                    self.state, self.pending = "reasoning", stripped[len(OPEN) :]
                    continue
                if OPEN.startswith(stripped):  # empty, or a prefix of the tag: wait for more
                    return reasoning, answer
                self.state = "answer"
                continue
            if self.state == "reasoning":
                if not self.started:  # whitespace after <think> is no part of the thinking
                    self.pending = self.pending.lstrip()
                    self.started = bool(self.pending)
                end = self.pending.find(CLOSE)
                if end >= 0:
                    reasoning += self.pending[:end].rstrip()
                    self.state, self.pending = "after", self.pending[end + len(CLOSE) :]
                    continue
                keep = _tag_prefix_length(self.pending, CLOSE)
                body = self.pending[: len(self.pending) - keep]
                # Trailing whitespace may be the gap before </think>: hold it until more text decides.
                stripped = body.rstrip()
                reasoning += stripped
                self.pending = body[len(stripped) :] + self.pending[len(self.pending) - keep :]
                return reasoning, answer
            if self.state == "after":  # whitespace between </think> and the answer
                stripped = self.pending.lstrip()
                if not stripped:
                    return reasoning, answer
                self.state, self.pending = "answer", stripped
                continue
            answer += self.pending
            self.pending = ""
            return reasoning, answer

    def flush(self) -> tuple[str, str]:
        """What is held back, at the end of the reply."""
        pending, self.pending = self.pending, ""
        if self.state == "reasoning":
            return pending.rstrip(), ""
        if self.state == "start":
            return "", pending
        return "", "" if self.state == "after" else pending

    @property
    def thinking(self) -> bool:
        """Inside the reasoning now (the page shows "Thinking…")."""
        return self.state == "reasoning"


def _tag_prefix_length(text: str, tag: str) -> int:
    """Length of the longest end of `text` that begins `tag` (a tag that may complete in the next delta)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
