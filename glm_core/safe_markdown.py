"""Markdown from users and models, made safe to show: no image loads from anywhere.

Streamlit renders Markdown images (`![alt](https://host/pixel.png)`), so a stored or imported message, or a
reply a model was talked into writing, could make every reader's browser fetch an address of the writer's
choosing (a tracking pixel that reveals who read it, and when). HTML is already shown as text. Here a
zero-width space goes between `!` and `[`, which leaves an ordinary link (followed only when clicked) and
looks the same; code blocks and code spans are left exactly as written.
"""

from __future__ import annotations

import re

ZERO_WIDTH_SPACE = "\u200b"
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
# A code span (a run of backticks, its text, the same run), or the start of an image.
_SPAN_OR_IMAGE = re.compile(r"(?<!`)(`+)(?!`).+?(?<!`)\1(?!`)|!\[", re.S)


def _defuse(text: str) -> str:
    return _SPAN_OR_IMAGE.sub(lambda m: m.group(0) if m.group(1) else "!" + ZERO_WIDTH_SPACE + "[", text)


def no_remote_images(text: str) -> str:
    """`text` with every Markdown image turned into a link; fenced code blocks and code spans unchanged."""
    if "![" not in text:
        return text
    out: list[str] = []
    prose: list[str] = []
    fence: str | None = None
    for line in text.splitlines(keepends=True):
        opening = _FENCE.match(line)
        if fence is None and opening:
            out.append(_defuse("".join(prose)))
            prose = []
            fence = opening.group(1)
            out.append(line)
        elif fence is not None:
            out.append(line)
            closing = _FENCE.match(line)
            if closing and closing.group(1)[0] == fence[0] and len(closing.group(1)) >= len(fence) \
                    and not line.strip().lstrip(fence[0]):
                fence = None
        else:
            prose.append(line)
    out.append(_defuse("".join(prose)))
    return "".join(out)


class StreamWithoutImages:
    """The same for text that arrives in pieces (a reply being streamed): an `!` at the end of a piece waits for
    the next piece. Code blocks are not told apart here; a zero-width space there is invisible, and the stored
    reply is shown through no_remote_images once it is finished."""

    def __init__(self):
        self._held = ""

    def push(self, piece: str) -> str:
        text = self._held + piece
        self._held = "!" if text.endswith("!") else ""
        if self._held:
            text = text[:-1]
        return text.replace("![", "!" + ZERO_WIDTH_SPACE + "[")

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    def wrap(self, pieces):
        for piece in pieces:
            text = self.push(piece)
            if text:
                yield text
        tail = self.flush()
        if tail:
            yield tail
