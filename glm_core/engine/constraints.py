"""Grammar-constrained decoding, per batch row: a request that must answer with a tool call or with JSON matching a
schema gets a matcher (llguidance) that masks its row's logits before sampling and advances with each token it
samples; the other rows of the same batched step decode freely.

llguidance was chosen over xgrammar and outlines-core: its wheel needs nothing else (xgrammar's requires torch,
triton and transformers pins; outlines-core builds a full index per schema up front), its Lark grammars embed
JSON schemas (`%json {...}`), which the families' call syntaxes need (a name line, then JSON or Python keywords),
and its mask costs well under a millisecond per token on this CPU (docs/ and the README give the measured cost).
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from ..models.tool_formats import json_schema_grammar
from ..protocol import OutputSpec

_TOKENIZERS: dict[
    int, tuple[Any, int, Any]
] = {}  # id(loaded tokenizer) -> llguidance LLTokenizer (building one takes ~0.3-1 s)
_TOKENIZERS_LOCK = threading.Lock()


def grammar_for(output: OutputSpec, chat_format) -> str | None:
    """The Lark grammar a request's reply must follow, or None when it decodes freely. Raises ValueError when the
    request asks for a call the model's format cannot write, or the grammar does not compile."""
    if output.forced_call:
        syntax = getattr(chat_format, "tool_syntax", None)
        if syntax is None:
            raise ValueError(f"this model's format ({chat_format.name}) has no tool calling")
        grammar = syntax.call_grammar(output.tools, output.tool_choice, parallel=output.parallel_tool_calls)
    elif output.json_schema is not None:
        grammar = json_schema_grammar(output.json_schema)
    else:
        return None
    import llguidance

    compiled = llguidance.LLMatcher.grammar_from_lark(grammar)
    error = llguidance.LLMatcher.validate_grammar(compiled)
    if error and not error.startswith("WARNING"):
        raise ValueError(f"the schema cannot be decoded under: {error[:300]}")
    return compiled


def _llg_tokenizer(tokenizer, n_vocab: int, stop_ids: frozenset[int]):
    import llguidance

    key = id(tokenizer)
    with _TOKENIZERS_LOCK:
        cached = _TOKENIZERS.get(key)
        if cached is not None and cached[0] is tokenizer and cached[1] == n_vocab:
            return cached[2]
        if hasattr(tokenizer, "backend_tokenizer"):  # a fast Hugging Face tokenizer
            import llguidance.hf

            built = llguidance.hf.from_tokenizer(tokenizer, n_vocab=n_vocab, eos_token=sorted(stop_ids))
        else:  # the ChatGLM SentencePiece tokenizers
            built = llguidance.LLTokenizer(
                llguidance.TokenizerWrapper(SentencePieceVocabulary(tokenizer, n_vocab)),
                n_vocab=n_vocab,
                eos_token=sorted(stop_ids),
            )
        _TOKENIZERS[key] = (tokenizer, n_vocab, built)
        return built


class SentencePieceVocabulary:
    """What llguidance needs of a tokenizer (each id's bytes, special ids marked with 0xFF), read from a ChatGLM
    SentencePiece model."""

    def __init__(self, tokenizer, n_vocab: int):
        sp = tokenizer.sp
        self._tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_token_id
        self.bos_token_id = None
        tokens, special = [], []
        for i in range(n_vocab):
            if i < sp.get_piece_size() and not (sp.is_control(i) or sp.is_unknown(i)):
                piece = sp.id_to_piece(i)
                if sp.is_byte(i):
                    tokens.append(bytes([int(piece[3:5], 16)]))
                else:
                    tokens.append(piece.replace("\u2581", " ").encode("utf-8"))
            else:
                name = getattr(tokenizer, "special_names", {}).get(i) or (
                    sp.id_to_piece(i) if i < sp.get_piece_size() else ""
                )
                # An id past the pieces without a name (padding of the output layer) gets one of its own: llguidance
                # reads an empty special token as a prefix of every special token, so a grammar that allows one
                # (<|assistant|> between two calls) would allow these too.
                tokens.append(b"\xff" + (name or f"<unused_{i}>").encode("utf-8"))
                special.append(i)
        self.tokens = tokens
        self.special_token_ids = special

    def __call__(self, text: str) -> list[int]:
        """Ids of `text` where it continues other text: SentencePiece's dummy-prefix space taken off again."""
        sp = self._tokenizer.sp
        ids = list(sp.encode(text))
        if not ids or not sp.id_to_piece(ids[0]).startswith("\u2581"):
            return ids
        rest = sp.id_to_piece(ids[0])[1:]
        if not rest:
            return ids[1:]
        whole = sp.piece_to_id(rest)
        head = [whole] if whole != sp.unk_id() else [sp.piece_to_id(f"<0x{b:02X}>") for b in rest.encode("utf-8")]
        return head + ids[1:]


class GrammarFailed(ValueError):
    """A row's grammar could not go on (it never should: the mask allows only tokens it accepts); only that row
    ends, with this as its error."""


class Constraint:
    """One row's matcher: `mask(logits)` before sampling, `accept(token)` after."""

    def __init__(self, grammar: str, tokenizer, n_vocab: int, stop_ids: frozenset[int]):
        import llguidance

        self.matcher = llguidance.LLMatcher(_llg_tokenizer(tokenizer, n_vocab, stop_ids), grammar)
        if self.matcher.is_error():
            raise GrammarFailed(f"the grammar failed: {self.matcher.get_error()[:300]}")
        self.n_vocab = n_vocab
        self._shifts = torch.arange(8, dtype=torch.uint8)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` [vocab] with every token the grammar forbids at -inf (a new tensor)."""
        bits = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.uint8)
        allowed = ((bits[:, None] >> self._shifts) & 1).flatten()[: logits.shape[-1]].bool()
        if allowed.shape[0] < logits.shape[-1]:  # ids past the grammar's vocabulary are never allowed
            allowed = torch.cat([allowed, allowed.new_zeros(logits.shape[-1] - allowed.shape[0])])
        return logits.float().masked_fill(~allowed.to(logits.device), float("-inf"))

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise GrammarFailed(f"the constrained reply went off its grammar: {self.matcher.get_error()[:200]}")

    @property
    def finished(self) -> bool:
        """The grammar admits nothing more (the call or the JSON value is complete)."""
        return self.matcher.is_stopped()
