"""Prompt formats: turn a conversation (list of {"role", "content"}) into the token ids the model sees.

A format must be prefix-stable in practice: the ids of a conversation extended by a reply and a new user
message should start with the ids of the conversation before it. The engine does not rely on it blindly:
it reuses only the longest common prefix of the cached ids and the new ids, so a format that re-tokenizes
a reply differently costs a little recompute, never a wrong answer.
"""

from __future__ import annotations

from typing import Protocol, Sequence


class ChatFormat(Protocol):
    name: str
    stop_token_ids: frozenset[int]

    def encode(self, messages: Sequence[dict]) -> list[int]:
        """Ids for the whole conversation, ending where the assistant's reply starts."""
        ...


class TemplateChatFormat:
    """Any Hugging Face tokenizer with a chat template (SmolLM2, GLM-4-hf, Qwen, Llama ...)."""

    name = "chat template"

    def __init__(self, tokenizer, stop_token_ids: set[int]):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template, so the model cannot be used for chat")
        self.tokenizer = tokenizer
        self.stop_token_ids = frozenset(stop_token_ids)

    def encode(self, messages: Sequence[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            [{"role": m["role"], "content": m["content"]} for m in messages],
            add_generation_prompt=True,
            tokenize=False,
        )
        # The template already wrote every special token (bos included) as text.
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
