"""Turn a stream of token ids into text deltas without ever emitting half a character."""

from __future__ import annotations


class IncrementalDecoder:
    """Decodes a short window of recent tokens per step, so streaming costs O(1) per token.

    Decoding a window that starts a few tokens back keeps tokenizer details right (SentencePiece's leading
    space, byte-fallback pieces); text ending in U+FFFD is held back until the multi-byte character completes.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start
        self.read_offset = 0  # tokens before this are already emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        emitted = self._decode(self.ids[self.prefix_offset : self.read_offset])
        current = self._decode(self.ids[self.prefix_offset :])
        if len(current) > len(emitted) and not current.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return current[len(emitted) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end stays as U+FFFD)."""
        emitted = self._decode(self.ids[self.prefix_offset : self.read_offset])
        current = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return current[len(emitted) :] if len(current) > len(emitted) else ""


class RewritingDecoder:
    """Streams a reply through a whole-text rewrite (ChatGLM-6B's `process_response`) without ever taking back
    text already sent: after each token, the rewrite of the settled part of the raw text (all but its last
    `unsettled(raw)` characters, which a later character could still change) is sent beyond what was sent; the
    end rewrites the whole text. The concatenated deltas are the rewrite of the whole reply, as the original
    chat() returned it."""

    def __init__(self, decoder: IncrementalDecoder, rewrite, unsettled):
        self.decoder, self.rewrite, self.unsettled = decoder, rewrite, unsettled
        self.raw = ""
        self.sent = ""

    def _send(self, final: bool) -> str:
        settled = self.raw if final else self.raw[: len(self.raw) - self.unsettled(self.raw)]
        text = self.rewrite(settled)
        delta = text[len(self.sent) :] if text.startswith(self.sent) else ""
        self.sent += delta
        return delta

    def push(self, token_id: int) -> str:
        self.raw += self.decoder.push(token_id)
        return self._send(final=False)

    def flush(self) -> str:
        self.raw += self.decoder.flush()
        return self._send(final=True)
