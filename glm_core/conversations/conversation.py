"""Conversations and their messages as the store keeps them and the pages show them.

A conversation is a tree: each message has a parent (None for a first message). Regenerate adds a sibling reply
(another version of it), Edit a sibling prompt (a branch). The conversation shown, sent to the model and
exported in the linear formats is one path through the tree, the chosen path: from the first message down to the
chosen message, then on through the newest child at each step.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field, fields

from ..protocol import ReplyStats
from ..reasoning import split_reasoning

# A message's status: "complete"; "partial" while its reply is being generated (the text so far is written every
# second); "interrupted" when the process generating it died, so it will never be completed.
STATUSES = ("complete", "partial", "interrupted")
# A partial row not written for this long belongs to a process that died while another kept running (the portal
# marks every partial row interrupted when it starts); generation writes at least every second while tokens flow.
STALE_PARTIAL_S = 120.0
STATS_FIELDS = tuple(f.name for f in fields(ReplyStats))
TITLE_MAX_CHARS = 200


def new_conversation_id() -> str:
    """Unguessable (122 random bits): an id alone never reaches another workspace's data, but it is no key either;
    every store query also filters by workspace."""
    return uuid.uuid4().hex


def title_from_prompt(prompt: str, limit: int = 60) -> str:
    """A default title: the first line of the first prompt, shortened."""
    line = next((ln.strip() for ln in prompt.splitlines() if ln.strip()), "")
    if not line:
        return "New conversation"
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"


@dataclass
class ChatMessage:
    role: str  # "system", "user", "assistant" or "tool" (a tool's result, answering an assistant's call)
    content: str
    created_at: float = field(default_factory=time.time)
    updated_at: float | None = None  # last write; a partial row's heartbeat
    params: dict | None = None  # assistant: the SamplingParams used, plus "system_prompt"
    model: str | None = None  # assistant: model name
    precision: str | None = None  # assistant: precision level
    stats: dict | None = None  # assistant: ReplyStats as a dict
    finish_reason: str | None = None  # "eos", "length", "stopped" or "error"
    error: str | None = None
    status: str = "complete"
    id: int | None = None  # row id in the store
    parent_id: int | None = None  # the message this one answers or follows; None for a first message
    chosen_at: float | None = None  # when this version was last chosen (made, or flipped to); see chosen_path
    # assistant: the tool calls the reply made, [{"id", "name", "arguments" (JSON text)}]; its content is then the
    # text said besides them (often "")
    tool_calls: list[dict] | None = None
    tool_call_id: str | None = None  # tool: the id of the call this result answers
    tool_name: str | None = None  # tool: the function that was called

    @property
    def stopped(self) -> bool:
        return self.finish_reason == "stopped"

    @property
    def reasoning(self) -> str:
        """An assistant reply's thinking (GLM-Z1, GLM-4.5+: <think>...</think>), "" when it has none."""
        return split_reasoning(self.content)[0] if self.role == "assistant" else ""

    @property
    def answer(self) -> str:
        """The reply without its thinking (the whole content for other roles)."""
        return split_reasoning(self.content)[1] if self.role == "assistant" else self.content

    def model_message(self) -> dict:
        """This message as the model sees it again: an assistant's answer as content and its thinking as
        reasoning_content, which the chat template keeps or drops (GLM-4.5's keeps only the thinking after the last
        user message; a template that never reads it drops it)."""
        if self.role == "tool":
            return {
                "role": "tool",
                "content": self.content,
                "tool_call_id": self.tool_call_id or "",
                "name": self.tool_name or "",
            }
        if self.role != "assistant":
            return {"role": self.role, "content": self.content}
        reasoning, answer = split_reasoning(self.content)
        message = {"role": "assistant", "content": answer, **({"reasoning_content": reasoning} if reasoning else {})}
        if self.tool_calls:
            message["tool_calls"] = [dict(call) for call in self.tool_calls]
        return message

    def unanswered_calls(self, following: list[ChatMessage]) -> list[dict]:
        """An assistant's calls that the tool messages in `following` (the messages after it) do not answer yet."""
        answered = set()
        for message in following:
            if message.role != "tool":
                break
            answered.add(message.tool_call_id)
        return [call for call in self.tool_calls or [] if call["id"] not in answered]

    def is_interrupted(self, now: float | None = None) -> bool:
        """The reply stopped growing because its process died (not because someone pressed stop)."""
        if self.status == "interrupted":
            return True
        if self.status != "partial":
            return False
        last = self.updated_at or self.created_at
        return (now if now is not None else time.time()) - last > STALE_PARTIAL_S

    def stats_line(self) -> str:
        """The figures shown under a reply."""
        parts = []
        s = self.stats
        if s:
            parts += [
                f"prompt {s['prompt_tokens']:,} tokens ({s['reused_tokens']:,} from cache)",
                f"completion {s['completion_tokens']:,} tokens",
                f"time to first token {s['ttft_s']:.2f} s",
                f"{s['decode_tokens_per_s']:.1f} tokens/s",
            ]
            if s.get("queue_s", 0) >= 0.5:
                parts.append(f"waited {s['queue_s']:.1f} s in queue")
        if self.model:
            parts.append(f"{self.model} ({self.precision})" if self.precision else self.model)
        if self.is_interrupted():
            parts.append("interrupted: the server stopped before this reply was finished")
        elif self.status == "partial":
            parts.append("still being generated")
        elif self.stopped:
            parts.append("stopped")
        elif self.finish_reason == "length":
            parts.append("cut at the token limit")
        return " · ".join(parts)


def chosen_path(tree: list[ChatMessage], chosen_id: int | None = None) -> list[ChatMessage]:
    """The chosen path through `tree` (messages in creation order, parents first): from the first messages down,
    at each step the child chosen last (`chosen_at`: flipping to a version or adding one chooses it and its
    ancestors), so flipping back to a branch shows it as it was left. With `chosen_id`: the path through it."""
    by_id = {m.id: m for m in tree}
    children: dict[int | None, list[ChatMessage]] = {}
    for m in tree:
        children.setdefault(m.parent_id if m.parent_id in by_id else None, []).append(m)

    def preferred(options: list[ChatMessage]) -> ChatMessage:
        return max(reversed(options), key=lambda m: m.chosen_at or 0.0)  # a tie: the newest

    if chosen_id in by_id:
        path, node = [], by_id[chosen_id]
        while node is not None:
            path.append(node)
            node = by_id.get(node.parent_id)
        path.reverse()
    elif children.get(None):
        path = [preferred(children[None])]
    else:
        return []
    while children.get(path[-1].id):
        path.append(preferred(children[path[-1].id]))
    return path


@dataclass
class Conversation:
    id: str = field(default_factory=new_conversation_id)
    title: str = ""
    messages: list[ChatMessage] = field(default_factory=list)  # the chosen path
    created_at: float = field(default_factory=time.time)
    updated_at: float | None = None
    backend: str | None = None  # the backend it talks to, by name (None: the portal's default)
    # Every version of every message, parents first; empty when the conversation is one line (`messages`).
    tree: list[ChatMessage] = field(default_factory=list)
    pinned: bool = False
    archived: bool = False
    # The tools its turns offer the model ({"name", "description", "parameters"}; glm_core.tool_calls), kept with it
    # so every turn renders the same tools (the model reads its calls against them, the kept cache stays a prefix).
    tools: list[dict] = field(default_factory=list)

    @classmethod
    def from_tree(cls, tree: list[ChatMessage], chosen_id: int | None = None, **fields_) -> Conversation:
        return cls(messages=chosen_path(tree, chosen_id), tree=tree, **fields_)

    def versions(self, message: ChatMessage) -> list[ChatMessage]:
        """`message` and its siblings (the other replies to the same prompt, the other edits of a prompt), oldest
        first."""
        if not self.tree:
            return [message]
        known = {m.id for m in self.tree}
        parent = message.parent_id if message.parent_id in known else None
        return [m for m in self.tree if (m.parent_id if m.parent_id in known else None) == parent]

    def version_switch(self, message: ChatMessage) -> tuple[int, int, int | None, int | None]:
        """For ‹ 2/3 ›: the message's place among its versions (from 1), how many there are, and the ids of the
        previous and next version (None at either end)."""
        versions = self.versions(message)
        place = next(i for i, m in enumerate(versions) if m is message or (m.id is not None and m.id == message.id))
        before = versions[place - 1].id if place > 0 else None
        after = versions[place + 1].id if place + 1 < len(versions) else None
        return place + 1, len(versions), before, after

    def every_message(self) -> list[ChatMessage]:
        return self.tree or self.messages

    def model_messages(
        self, system_prompt: str = "", upto: int | None = None, new_prompt: str | None = None
    ) -> list[dict]:
        """What the engine sees: a system message, then the first `upto` messages (all by default), then the new prompt.

        A system message stored in the conversation (an imported one) wins over the sidebar's system prompt.
        """
        kept = self.messages if upto is None else self.messages[:upto]
        out = [m.model_message() for m in kept]
        if not (out and out[0]["role"] == "system") and system_prompt.strip():
            out.insert(0, {"role": "system", "content": system_prompt})
        if new_prompt is not None:
            out.append({"role": "user", "content": new_prompt})
        return out

    def thinking_choice(self) -> bool | None:
        """The thinking switch as this conversation's last reply had it (None: never set, the template's default)."""
        for message in reversed(self.messages):
            if message.role == "assistant" and message.params and message.params.get("thinking") is not None:
                return bool(message.params["thinking"])
        return None

    def pending_calls(self) -> list[dict]:
        """The calls of the chosen path's last assistant reply that no tool result answers yet (the page asks for
        their results); [] when the conversation does not wait on a tool."""
        for index in range(len(self.messages) - 1, -1, -1):
            message = self.messages[index]
            if message.role == "assistant":
                return message.unanswered_calls(self.messages[index + 1 :])
            if message.role != "tool":
                return []
        return []

    def last_index(self, role: str) -> int | None:
        for index in range(len(self.messages) - 1, -1, -1):
            if self.messages[index].role == role:
                return index
        return None
