"""What one iteration of the worker must do, as the scheduler decides it and the runner carries it out (the split
of vLLM's `EngineCore.step`: the scheduler's output, then the model runner's execution).

A plan names the prefilling sequences that leave because they were asked to stop, then, in order, each chunk of
prompt to prefill (at most the iteration's prefill budget in all, so a long prompt never freezes the others for
more than one bounded chunk; a model that must see its whole prompt at once takes it whole), and whether the
running batch then decodes one token. A sequence whose prompt is all fed joins the batch after its chunk (a chunk
of 0 tokens: it was prefilled earlier and waits for room in the batch's KV memory).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .runner import Sequence


@dataclass(frozen=True)
class Chunk:
    sequence: Sequence
    tokens: int  # prompt tokens to feed now; 0: prefilled already, it only tries to join the batch


@dataclass(frozen=True)
class StepPlan:
    stopped: tuple[Sequence, ...] = ()  # prefilling sequences asked to stop: they leave (a partial prefill is not kept)
    chunks: tuple[Chunk, ...] = ()
    decode: bool = False  # the running batch (with the sequences joining it now) decodes one token

    @property
    def prefill_tokens(self) -> int:
        return sum(chunk.tokens for chunk in self.chunks)


def plan_step(prefilling: Seq[Sequence], decoding: Seq[Sequence], budget: int, whole_prompt: bool) -> StepPlan:
    """The next iteration's plan: first come first served among the prefilling sequences within `budget` prompt
    tokens; a sequence that does not fit waits for the next iteration, and so does every one behind it."""
    stopped: list[Sequence] = []
    chunks: list[Chunk] = []
    for sequence in prefilling:
        if sequence.request.stop_requested:
            stopped.append(sequence)
            continue
        if sequence.prefilled:
            chunks.append(Chunk(sequence, 0))
            continue
        if budget <= 0:
            break
        left = len(sequence.ids) - sequence.fed
        take = left if whole_prompt else min(budget, left)
        chunks.append(Chunk(sequence, take))
        budget -= take
    return StepPlan(tuple(stopped), tuple(chunks), decode=bool(decoding) or bool(chunks))
