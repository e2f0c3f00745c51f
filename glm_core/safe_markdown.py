"""Text from users, models and other servers, made safe to show in Streamlit, which renders Markdown.

- `no_remote_images`: messages keep their Markdown, but no image loads from anywhere. Streamlit renders Markdown
  images (`![alt](https://host/pixel.png)`), so a stored or imported message, or a reply a model was talked into
  writing, could make every reader's browser fetch an address of the writer's choosing (a tracking pixel that
  reveals who read it, and when). HTML is already shown as text. A zero-width space goes between every `!` and `[`
  outside code blocks, which leaves at most an ordinary link (followed only when clicked) and looks the same.
  Which lines are code blocks is decided by a CommonMark parser (markdown-it-py), not by pattern matching: an
  escaped backtick, or a backtick fence whose info string holds a backtick (no fence at all in CommonMark), cannot
  hide an image from it. Code blocks stay exactly as written, so code copies as it was; inside inline code spans
  the space is invisible.
- `plain`: any other text (model names, error texts from remote servers, titles, stats lines) shows exactly as
  typed: every Markdown, directive (`:red[...]`), emoji-shortcode and LaTeX character is escaped.
"""

from __future__ import annotations

import functools
import re

ZERO_WIDTH_SPACE = "\u200b"
_IMAGE_START = "!["
_DEFUSED = "!" + ZERO_WIDTH_SPACE + "["
_MARKDOWN_SPECIALS = re.compile(r"([\\`*_{}\[\]()#+\-.!|~<>:$&=^])")


@functools.lru_cache(maxsize=1)
def _parser():
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark")  # code blocks are the same in GitHub's flavour, which Streamlit renders


def no_remote_images(text: str) -> str:
    """`text` with every Markdown image turned into a link (or plain text); fenced and indented code blocks
    unchanged."""
    if _IMAGE_START not in text:
        return text
    lines = text.splitlines(keepends=True)
    code = [False] * len(lines)
    for token in _parser().parse(text):
        if token.type in ("fence", "code_block") and token.map:  # a fence's own lines show no image either
            for index in range(token.map[0], min(token.map[1], len(lines))):
                code[index] = True
    return "".join(line if is_code else line.replace(_IMAGE_START, _DEFUSED) for line, is_code in zip(lines, code))


def plain(text: str) -> str:
    """Text made safe for places that render Markdown (captions, labels, error boxes): it shows exactly as typed."""
    return _MARKDOWN_SPECIALS.sub(r"\\\1", str(text))


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
        return text.replace(_IMAGE_START, _DEFUSED)

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
