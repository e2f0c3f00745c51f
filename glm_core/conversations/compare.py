"""The chat's Compare mode: one prompt to 2-4 configurations at once (levels of the loaded model, other local
models, remote backends), each reply streaming on its own, with its figures; the result is saved as an arena
comparison (arena.py) for a vote. Torch-free: it talks to Backends only.

Blind mode shows the columns as "Answer A", "Answer B"... in an order shuffled per comparison, so the position of a
configuration tells nothing; the names are revealed after the vote.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..protocol import Backend, Request, SamplingParams
from .arena import MAX_COLUMNS, MIN_COLUMNS, Arena, ArenaError, Column


@dataclass
class CompareTarget:
    label: str  # the configuration's name: "SmolLM2-135M-Instruct INT4", "remote vllm"
    backend: Backend


@dataclass
class CompareColumn:
    target: CompareTarget
    request: Request | None = None
    conversation_id: str = field(default_factory=lambda: "compare-" + uuid.uuid4().hex)
    error: str | None = None  # could not even start (busy, closed)

    @property
    def done(self) -> bool:
        return self.request is None or self.request.done

    @property
    def text(self) -> str:
        if self.request is None:
            return ""
        reply = self.request.reply
        return reply.text if reply is not None else self.request.text_so_far

    def stats(self) -> dict:
        """Tokens, time to first token, tokens/s, the model and level, and the memory it holds."""
        card = self.target.backend.card()
        out = {
            "model": card.name,
            "precision": card.precision,
            "weights_bytes": card.weights_bytes,
        }
        reply = self.request.reply if self.request is not None else None
        if reply is not None:
            out.update(
                completion_tokens=reply.stats.completion_tokens,
                prompt_tokens=reply.stats.prompt_tokens,
                ttft_s=reply.stats.ttft_s,
                decode_tokens_per_s=reply.stats.decode_tokens_per_s,
                total_s=reply.stats.total_s,
                finish_reason=reply.finish_reason,
            )
        memory = self.target.backend.memory_report()
        if memory is not None and card.weights_bytes is not None:
            # the process's figure is shared by every local model; its own part is its weights and its caches
            out["memory_bytes"] = memory.own_bytes(card.weights_bytes)
        return out

    def describe(self) -> str:
        """The stats line under a column."""
        s = self.stats()
        parts = [f"{s['model']} · {s['precision']}"]
        if "completion_tokens" in s:
            parts += [
                f"{s['completion_tokens']} tokens",
                f"first token {s['ttft_s']:.2f} s",
                f"{s['decode_tokens_per_s']:.1f} tokens/s",
            ]
        if s.get("memory_bytes"):
            parts.append(f"{s['memory_bytes'] / 2**20:,.0f} MiB")
        return " · ".join(parts)


class CompareRun:
    """The replies of one prompt from each target, generated at once."""

    def __init__(
        self,
        targets: Sequence[CompareTarget],
        messages: list[dict],
        params: SamplingParams,
        owner: str | None = None,
        blind: bool = False,
        seed: int | None = None,
    ):
        if not MIN_COLUMNS <= len(targets) <= MAX_COLUMNS:
            raise ArenaError(f"compare {MIN_COLUMNS} to {MAX_COLUMNS} configurations, not {len(targets)}")
        if len({t.label for t in targets}) != len(targets):
            raise ArenaError("each column must be a different configuration")
        order = list(targets)
        if blind:
            random.Random(seed).shuffle(order)
        self.columns = [CompareColumn(t) for t in order]
        self.messages, self.params, self.owner, self.blind = messages, params, owner, blind
        self.started_at = time.time()
        self.comparison_id: str | None = None
        self.voted = False

    def start(self) -> CompareRun:
        for column in self.columns:
            try:
                column.request = column.target.backend.submit(
                    column.conversation_id, self.messages, self.params, owner=self.owner
                )
            except Exception as exc:  # busy, unloaded meanwhile, prompt too long: that column says so
                column.error = str(exc) or type(exc).__name__
        return self

    def heading(self, index: int) -> str:
        """The column's title: its configuration, or "Answer A" in blind mode until a vote reveals it."""
        if self.blind and not self.voted:
            return f"Answer {chr(ord('A') + index)}"
        return self.columns[index].target.label

    @property
    def done(self) -> bool:
        return all(c.done for c in self.columns)

    def wait(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        for column in self.columns:
            if column.request is not None:
                left = None if deadline is None else max(deadline - time.monotonic(), 0)
                column.request.wait(left)
        return self.done

    def stop(self) -> None:
        for column in self.columns:
            if column.request is not None:
                column.request.stop()

    def finish(self, arena: Arena, workspace: str) -> str:
        """Once every reply is done: free what the backends kept and save the comparison; returns its id."""
        if not self.done:
            raise ArenaError("the replies are still being generated")
        if self.comparison_id is None:
            for column in self.columns:
                column.target.backend.forget(column.conversation_id)
            prompt = next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), "")
            self.comparison_id = arena.save_comparison(workspace, prompt, self.result_columns(), self.blind)
        return self.comparison_id

    def result_columns(self) -> list[Column]:
        columns = []
        for column in self.columns:
            stats = column.stats()
            reply = column.request.reply if column.request is not None else None
            error = column.error or (reply.error if reply is not None else None)
            columns.append(
                Column(
                    config=column.target.label,
                    text=column.text,
                    model=stats.pop("model", None),
                    precision=stats.pop("precision", None),
                    stats=stats,
                    error=error,
                )
            )
        return columns

    def vote(self, arena: Arena, workspace: str, best_index: int | None) -> None:
        """The person's pick: the better column's index, or None for a tie; reveals the names."""
        if self.comparison_id is None:
            raise ArenaError("save the comparison before voting")
        best = None if best_index is None else self.columns[best_index].target.label
        arena.vote(workspace, self.comparison_id, best)
        self.voted = True
