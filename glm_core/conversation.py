"""A conversation as the pages keep it: plain text messages with the figures of each reply."""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, field

from .engine import Reply


@dataclass
class ChatMessage:
    role: str  # "user" or "assistant"
    content: str
    stats: dict | None = None  # ReplyStats as a dict, for assistant messages
    finish_reason: str | None = None
    error: str | None = None

    @property
    def stopped(self) -> bool:
        return self.finish_reason == "stopped"

    def stats_line(self) -> str:
        """The figures shown under a reply."""
        if not self.stats:
            return ""
        s = self.stats
        parts = [
            f"prompt {s['prompt_tokens']:,} tokens ({s['reused_tokens']:,} from cache)",
            f"completion {s['completion_tokens']:,} tokens",
            f"time to first token {s['ttft_s']:.2f} s",
            f"{s['decode_tokens_per_s']:.1f} tokens/s",
        ]
        if s.get("queue_s", 0) >= 0.5:
            parts.append(f"waited {s['queue_s']:.1f} s in queue")
        if self.stopped:
            parts.append("stopped")
        elif self.finish_reason == "length":
            parts.append("cut at the token limit")
        return " · ".join(parts)


@dataclass
class Conversation:
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    messages: list[ChatMessage] = field(default_factory=list)
    created_at: float = field(default_factory=time.time)

    def model_messages(self, system_prompt: str = "", new_prompt: str | None = None) -> list[dict]:
        """What the engine sees: the system prompt, then every user/assistant message."""
        out = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
        out += [{"role": m.role, "content": m.content} for m in self.messages]
        if new_prompt is not None:
            out.append({"role": "user", "content": new_prompt})
        return out

    def add_user(self, text: str) -> ChatMessage:
        message = ChatMessage("user", text)
        self.messages.append(message)
        return message

    def add_reply(self, reply: Reply) -> ChatMessage:
        message = ChatMessage(
            "assistant", reply.text, stats=asdict(reply.stats), finish_reason=reply.finish_reason, error=reply.error
        )
        self.messages.append(message)
        return message
