"""The runner: runs the model over the running sequences, one iteration at a time.

An iteration carries out the scheduler's StepPlan (step_plan.py): at most `prefill_budget` prompt tokens of
sequences still being prefilled (so a long prompt never freezes the others for more than one bounded chunk), then
one batched decode step over every sequence that is generating: one forward for all rows over the slot cache,
each row sampled with its own controls and seed.
Sequences join the decode batch when their prefill ends and leave it when they finish; their KV cache then goes
back to the kept-cache pool, so the conversation's next turn prefills only its new tokens.

Only the scheduler's worker thread calls into a runner.
"""

from __future__ import annotations

import functools
import gc
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..models.chat_format import ContinuingFormat, PrefixRulesFormat, RewritingFormat, ThinkingFormat
from ..models.loading import LoadedModel
from ..protocol import (
    FAILED,
    TOO_LONG,
    UNAVAILABLE,
    OutputSpec,
    PromptTooLong,
    Reply,
    ReplyStats,
    Request,
    Started,
    TokenLogprob,
    Truncated,
)
from ..reasoning import OPEN as REASONING_OPEN
from .constraints import Constraint, GrammarFailed
from .context import FittingStopped, common_prefix_length, fit_to_context
from .fast_decode import group_decode_attention
from .generation import PREFILL_CHUNK, model_mask, prefill, prefill_together
from .kv_pool import CachedContext, KVCachePool, cache_can_crop, copy_prefix
from .kv_slots import SlotCache
from .sampling import sample_next
from .step_plan import Chunk, StepPlan
from .textstream import IncrementalDecoder, RewritingDecoder

if TYPE_CHECKING:
    from .fast_decode import FastDecode

log = logging.getLogger(__name__)

OUT_OF_MEMORY = "out of memory while generating; kept caches were freed, try again or start a new conversation"


# A new conversation starts from another kept conversation's cache when they share at least this many ids.
SHARED_PREFIX_MIN = 8


def _reusable(kept: CachedContext, common: int, ids: list[int]) -> tuple[int, torch.Tensor | None]:
    """How many of `ids` a kept context gives (`common`: their reusable prefix), and the logits that follow them
    when it gives them all (its own prompt again); at least one id is fed otherwise."""
    if kept.prompt_logits is not None and len(ids) == kept.prompt_length and common >= len(ids):
        return len(ids), kept.prompt_logits
    return min(common, len(ids) - 1), None


@dataclass
class Sequence:
    """One request being served: its context, its cache while prefilling, its slot while decoding."""

    request: Request
    ids: list[int]  # the context, then each generated token once it is fed back
    cache: Any  # batch-1 DynamicCache while prefilling (and while decoding, when the model cannot batch)
    fed: int  # how many of `ids` the cache holds (all of them once prefilled)
    prompt_length: int  # the context's length
    limit: int  # max tokens to generate
    started: float
    stats: ReplyStats
    dropped: int = 0
    decoder: IncrementalDecoder | RewritingDecoder | None = None
    generator: torch.Generator | None = None
    seen: torch.Tensor | None = None  # ids the repetition penalty looks at
    generated: list[int] = field(default_factory=list)
    next_token: int | None = None  # sampled, fed at the next decode step
    text_started: bool = False
    first_token_at: float | None = None
    last_token_at: float | None = None
    finish: str = ""
    grammar: str | None = None  # the compiled grammar its reply must follow; its matcher is made at the first token
    constraint: Constraint | None = None
    prompt_logits: torch.Tensor | None = None  # what followed the whole prompt (kept with the cache)
    first_from_kept: bool = False  # the prompt was kept whole: the first token comes from prompt_logits

    @property
    def unfed(self) -> list[int]:
        """Generated tokens that were sampled but never fed back (the last one, after a stop or the limit)."""
        return self.generated[len(self.ids) - self.prompt_length :]

    @property
    def prefilled(self) -> bool:
        return self.fed >= len(self.ids)


@dataclass
class StepTiming:
    """Where a decode step's time goes: the whole `_decode` (stop checks, forward, bookkeeping, sampling, events)
    against the model's forward alone. `bench decode` reads it; `sync` (CUDA) waits for the forward's kernels
    before reading the clock, which only a benchmark should pay for."""

    steps: int = 0
    rows: int = 0  # rows decoded, summed over the steps
    decode_s: float = 0.0
    forward_s: float = 0.0
    sync: bool = False

    def reset(self) -> None:
        self.steps, self.rows, self.decode_s, self.forward_s = 0, 0, 0.0, 0.0


def _padded(chunks: list[Chunk]) -> int:
    """Positions a forward of these chunks together holds: each row padded to the longest kept part and the
    longest chunk."""
    kept = max(chunk.sequence.fed for chunk in chunks)
    return len(chunks) * (kept + max(chunk.tokens for chunk in chunks))


def reply_decoder(loaded: LoadedModel, keep_roles: bool = False) -> IncrementalDecoder | RewritingDecoder:
    """Token ids to text deltas; through the chat format's own rewrite of a reply where it has one (ChatGLM-6B's
    process_response, applied while streaming). `keep_roles`: special tokens are written by name, so a reply with
    tools can say `<|assistant|>{name}` mid-turn (ChatGLM3, GLM-4) and be read back as a call."""
    decoder = IncrementalDecoder(loaded.tokenizer, skip_special_tokens=not keep_roles)
    if not isinstance(loaded.chat_format, RewritingFormat):
        return decoder
    return RewritingDecoder(decoder, loaded.chat_format.process_response, loaded.chat_format.unsettled_tail)


def _reads_role_tokens(loaded: LoadedModel, output) -> bool:
    syntax = getattr(loaded.chat_format, "tool_syntax", None)
    return bool(output.tools) and output.tool_choice != "none" and getattr(syntax, "role_marked", False)


def _plain_greedy(sequence: Sequence) -> bool:
    """A greedy row whose logits need nothing before the argmax (no repetition penalty, no grammar)."""
    params = sequence.request.params
    return (
        params.temperature == 0
        and (params.repetition_penalty == 1.0 or sequence.seen is None)
        and (sequence.grammar is None)
    )


def slot_compatible(model) -> bool:
    """Batched decode over slots needs a model whose every layer keeps full attention in a standard cache."""
    if not getattr(model, "batchable", True):
        return False
    from transformers import DynamicCache

    try:
        return cache_can_crop(DynamicCache(config=model.config))
    except Exception:
        return False


def prompt_encoder(loaded: LoadedModel, output: OutputSpec, thinking: bool | None) -> Callable[[list[dict]], list[int]]:
    """How a request's messages become the model's token ids (its chat format, with the output spec's tools and the
    thinking switch where the template has one): the one encoding the runner feeds and the API counts."""
    chat_format = loaded.chat_format
    if thinking is not None and isinstance(chat_format, ThinkingFormat) and chat_format.thinking_switch:
        return functools.partial(chat_format.encode, tools=output.tools, thinking=thinking)
    if output.tools:
        return functools.partial(chat_format.encode, tools=output.tools)
    return chat_format.encode


def raw_prompt_ids(loaded: LoadedModel, messages: list[dict]) -> list[int]:
    """/v1/completions: the last message's text as is, with what the tokenizer puts in front."""
    return list(loaded.tokenizer(messages[-1]["content"])["input_ids"])


class Runner:
    def __init__(
        self,
        loaded: LoadedModel,
        pool: KVCachePool,
        tokenizer_lock: threading.Lock,
        max_batch: int,
        batch_kv_bytes: int,
        prefill_budget: int = PREFILL_CHUNK,
    ):
        self.loaded = loaded
        self.pool = pool
        self.tokenizer_lock = tokenizer_lock
        self.max_batch = max_batch
        self.batch_kv_bytes = batch_kv_bytes  # the slots may grow past this only for a single sequence
        self.prefill_budget = prefill_budget
        self.batched = slot_compatible(loaded.model)
        group_decode_attention(loaded.model)  # eager decode steps too
        self.prefilling: list[Sequence] = []
        self.decoding: list[Sequence] = []  # decoding[i] occupies slot i
        self.slots: SlotCache | None = None
        self.fast: FastDecode | None = None  # the compiled decode path, when on (the engine sets it)
        self.timing = StepTiming()

    # ---- what the scheduler asks -------------------------------------------------------------------------

    @property
    def running(self) -> int:
        return len(self.prefilling) + len(self.decoding)

    def has_room(self) -> bool:
        return self.running < self.max_batch

    def idle(self) -> bool:
        return not self.prefilling and not self.decoding

    def slot_bytes(self) -> int:
        return self.slots.nbytes() if self.slots is not None else 0

    def start(self, request: Request) -> Reply | None:
        """Take a request in: fit its context, reuse its kept cache. Returns a Reply if it ends here."""
        stats = ReplyStats(queue_s=time.perf_counter() - request.submitted_at)
        request.emit(Started())
        if request.stop_requested:
            return Reply(finish_reason="stopped", stats=stats)
        try:
            sequence = self._sequence(request, stats)
        except FittingStopped:
            return Reply(finish_reason="stopped", stats=stats)
        except Exception as exc:
            return self._failure(request, exc)
        self.prefilling.append(sequence)
        return None

    @property
    def whole_prompt(self) -> bool:
        """The model must see its whole prompt in one forward (e.g. bidirectional attention over the prompt)."""
        return bool(getattr(self.loaded.model, "prefill_whole_prompt", False))

    def execute(self, plan: StepPlan) -> list[tuple[Request, Reply]]:
        """One iteration as the scheduler planned it: the stopped leave, each chunk is prefilled (a sequence whose
        prompt is all fed samples its first token and joins the batch), then one decode step. Returns the requests
        that ended."""
        ended: list[tuple[Request, Reply]] = []
        for sequence in plan.stopped:  # stopped during a long prefill: the partial cache is not worth keeping
            self.prefilling.remove(sequence)
            ended.append((sequence.request, self._reply(sequence, "stopped")))
        together = self._prefill_together([chunk for chunk in plan.chunks if chunk.tokens]) if self.batched else {}
        for chunk in plan.chunks:
            self._prefill_chunk(chunk, ended, together.get(id(chunk.sequence)))
        if plan.decode and self.decoding:
            self._decode(ended)
        return ended

    def close(self) -> list[tuple[Request, Reply]]:
        """End everything running (the scheduler is closing): partial replies are kept and marked stopped; a reply
        with no text yet ends as an error, so its prompt goes back to its author."""
        ended = []
        for sequence in self.prefilling + self.decoding:
            reply = self._reply(sequence, "stopped")
            if not reply.text:
                reply.finish_reason, reply.error = "error", "the model was unloaded before this reply started"
                reply.error_kind = UNAVAILABLE
            ended.append((sequence.request, reply))
        self.prefilling, self.decoding = [], []
        if self.slots is not None:
            self.slots.clear()
        return ended

    # ---- starting a sequence -----------------------------------------------------------------------------

    def _continued_ids(self, kept: CachedContext | None, messages: list[dict], budget: int) -> list[int] | None:
        """Ids that continue the kept conversation token for token, if this request continues it exactly."""
        chat_format = self.loaded.chat_format
        if not isinstance(chat_format, ContinuingFormat):
            return None
        if kept is None or kept.messages != messages[:-1] or messages[-1]["role"] != "user":
            return None
        ids = kept.tokens + kept.unfed + chat_format.continuation(messages)
        return ids if len(ids) <= budget else None  # too long: fall back to dropping the oldest turns

    def _sequence(self, request: Request, stats: ReplyStats) -> Sequence:
        from transformers import DynamicCache

        params, loaded = request.params, self.loaded
        started = time.perf_counter()
        max_length = min(params.max_length, loaded.max_context)
        budget = max_length - params.max_new_tokens
        if budget < 1:
            raise PromptTooLong(f"max new tokens ({params.max_new_tokens}) leaves no room in {max_length} tokens")
        kept = self.pool.take(request.conversation_id)
        output = request.output
        with self.tokenizer_lock:
            ids = None if output.tools or output.raw_prompt else self._continued_ids(kept, request.messages, budget)
            dropped = 0
            if ids is None and request.prompt_ids is not None:  # encoded by the door that counted them (the API)
                ids = request.prompt_ids
            elif ids is None and output.raw_prompt:
                ids = raw_prompt_ids(loaded, request.messages)
            if ids is not None and len(ids) > budget:
                raise PromptTooLong(f"the prompt takes {len(ids)} tokens; {budget} fit with this max_tokens")
            if ids is None:
                ids, dropped = fit_to_context(
                    prompt_encoder(loaded, output, params.thinking),
                    request.messages,
                    budget,
                    count=self._count,
                    should_stop=lambda: request.stop_requested,
                )
        if dropped:
            request.emit(Truncated(dropped, len(ids), budget))
        opens_reasoning = None if output.raw_prompt else getattr(loaded.chat_format, "opens_reasoning", None)
        with self.tokenizer_lock:
            opened = bool(opens_reasoning and opens_reasoning(ids))
        if opened:  # the prompt opened the thinking (GLM-Z1): the reply's text says so too (see glm_core.reasoning)
            request.emit_text(REASONING_OPEN)

        # Reuse only what is an exact prefix of the ids a full recompute would see. A format whose prompt attends
        # both ways (ChatGLM-6B) says itself how much of a kept cache is exact.
        chat_format = loaded.chat_format
        reusable = chat_format.reusable_length if isinstance(chat_format, PrefixRulesFormat) else common_prefix_length
        reused, prompt_logits, cache = 0, None, None
        if kept is not None and not request.recompute and cache_can_crop(kept.cache):
            reused, prompt_logits = _reusable(kept, reusable(kept.tokens, ids), ids)
            if len(kept.tokens) > reused:
                kept.cache.crop(-(len(kept.tokens) - reused))
            cache = kept.cache
        elif kept is None and not request.recompute and ids:
            # A new conversation starts from the longest prefix that one of its owner's kept conversations shares
            # with it (a system prompt, the template's opening, the same question): a copy; that one keeps its own.
            found = self.pool.longest_prefix(ids, request.owner, reusable)
            if found is not None and found[1] >= SHARED_PREFIX_MIN and cache_can_crop(found[0].cache):
                reused, prompt_logits = _reusable(found[0], found[1], ids)
                cache = copy_prefix(found[0].cache, reused, loaded.model.config)
        if cache is None:
            cache = DynamicCache(config=loaded.model.config)
        stats.prompt_tokens, stats.reused_tokens, stats.prefill_tokens = len(ids), reused, len(ids) - reused

        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=loaded.device).manual_seed(params.seed)
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.tensor(ids, dtype=torch.long, device=loaded.device)
        return Sequence(
            request=request,
            ids=ids,
            cache=cache,
            fed=reused,
            prompt_length=len(ids),
            limit=min(params.max_new_tokens, max_length - len(ids)),
            started=started,
            stats=stats,
            dropped=dropped,
            decoder=reply_decoder(loaded, keep_roles=_reads_role_tokens(loaded, output)),
            generator=generator,
            seen=seen,
            text_started=opened,
            grammar=request.grammar,
            prompt_logits=prompt_logits,
            first_from_kept=prompt_logits is not None,
        )

    def _count(self, text: str) -> int:
        """Tokens of one message's text (an estimate of its share of the context: fitting narrows with it)."""
        return len(self.loaded.tokenizer(text, add_special_tokens=False)["input_ids"])

    # ---- prefill -----------------------------------------------------------------------------------------

    def _prefill_together(self, chunks: list[Chunk]) -> dict[int, torch.Tensor]:
        """Several sequences' chunks in one forward (`prefill_together`): their logits by id(sequence), their
        caches replaced. The chunks whose padding would cost more than half again their own tokens go alone
        (the longest first), as does everything when the forward fails (each then fails or not on its own)."""
        chunks = sorted(chunks, key=lambda chunk: chunk.tokens)
        while len(chunks) >= 2 and _padded(chunks) > 1.5 * sum(chunk.tokens + chunk.sequence.fed for chunk in chunks):
            chunks.pop()
        if len(chunks) < 2:
            return {}
        rows = [(c.sequence.ids[c.sequence.fed : c.sequence.fed + c.tokens], c.sequence.cache) for c in chunks]
        try:
            results = prefill_together(self.loaded.model, rows, self.loaded.device)
        except Exception as exc:
            log.warning("prefilling %d sequences together failed (%s); each is prefilled alone", len(rows), exc)
            return {}
        for chunk, (_, cache) in zip(chunks, results):
            chunk.sequence.cache = cache
        return {id(chunk.sequence): logits for chunk, (logits, _) in zip(chunks, results)}

    def _prefill_chunk(self, chunk: Chunk, ended: list, logits: torch.Tensor | None = None) -> None:
        """Feed a chunk (unless `logits` says it was fed together with others), then, once the prompt is all
        fed, sample the first token and join the batch."""
        sequence, request = chunk.sequence, chunk.sequence.request
        if chunk.tokens or sequence.first_from_kept:
            if sequence.first_from_kept:  # nothing to feed: the kept prompt's logits give the first token
                sequence.first_from_kept = False
                logits = sequence.prompt_logits
            else:
                try:
                    if logits is None:
                        logits = prefill(
                            self.loaded.model,
                            sequence.ids[sequence.fed : sequence.fed + chunk.tokens],
                            sequence.cache,
                            self.loaded.device,
                            chunk_size=chunk.tokens,
                        )
                except Exception as exc:
                    self.prefilling.remove(sequence)
                    ended.append((request, self._failure(request, exc, sequence)))
                    return
                sequence.fed += chunk.tokens
                if not sequence.prefilled:
                    return
                # prefill returns None only when its should_stop says so, and none is given here. Its logits are a
                # view of the forward's output: the cache keeps a copy of this row only.
                assert logits is not None
                sequence.prompt_logits = logits.clone()
            assert logits is not None  # kept with the prompt
            try:
                self._accept(sequence, logits[None], ended)
            except GrammarFailed as exc:
                self.prefilling.remove(sequence)
                ended.append((request, self._failure(request, exc, sequence)))
                return
            if sequence.next_token is None:  # ended at its first token
                self.prefilling.remove(sequence)
                return
        if self._join(sequence):
            self.prefilling.remove(sequence)

    def _join(self, sequence: Sequence) -> bool:
        """Move a prefilled sequence into the decode batch, if the batch's KV memory allows it."""
        if not self.batched:
            self.decoding.append(sequence)
            return True
        cache = sequence.cache
        if self.slots is None or self.slots.occupied == 0:
            keys, values = cache.layers[0].keys, cache.layers[0].values
            self.slots = SlotCache(
                len(cache.layers),
                keys.shape[1],
                keys.shape[3],
                keys.dtype,
                keys.device,
                self.max_batch,
                value_heads=values.shape[1],
                value_dim=values.shape[3],
            )
        longest = max([length for length in self.slots.lengths] + [cache.get_seq_length()]) + sequence.limit
        if self.decoding and self.slots.bytes_if(len(self.decoding) + 1, longest) > self.batch_kv_bytes:
            return False  # waits, prefilled, until a running row leaves
        self.slots.add(cache)
        sequence.cache = None
        self.decoding.append(sequence)
        return True

    # ---- decode ------------------------------------------------------------------------------------------

    @property
    def _slots(self) -> SlotCache:
        """The running batch's slot cache: there is one whenever a batched model has rows decoding."""
        assert self.slots is not None, "no slot cache: the model decodes one row at a time or nothing runs"
        return self.slots

    @torch.inference_mode()
    def _forward_batch(self, tokens: list[int]) -> torch.Tensor:
        slots = self._slots
        if self.fast is not None:  # the compiled step, when its graph is ready (else None: decode eagerly)
            logits = self.fast.try_decode(tokens, slots)
            if logits is not None:
                slots.advance()
                return logits
        model, device = self.loaded.model, self.loaded.device
        positions, mask = slots.prepare_decode()
        mask = model_mask(model, mask)
        input_ids = torch.tensor(tokens, dtype=torch.long, device=device)[:, None]
        out = model(
            input_ids=input_ids, position_ids=positions, attention_mask=mask, past_key_values=slots, use_cache=True
        )
        slots.advance()
        return out.logits[:, -1]

    @torch.inference_mode()
    def _forward_each(self, tokens: list[int]) -> torch.Tensor:
        model, device = self.loaded.model, self.loaded.device
        rows = []
        for sequence, token in zip(self.decoding, tokens):
            ids = torch.tensor([[token]], dtype=torch.long, device=device)
            rows.append(model(input_ids=ids, past_key_values=sequence.cache, use_cache=True).logits[0, -1])
        return torch.stack(rows)

    def _decode(self, ended: list) -> None:
        started = time.perf_counter()
        # Rows asked to stop leave before the forward.
        for index in reversed(range(len(self.decoding))):
            sequence = self.decoding[index]
            if sequence.request.stop_requested:
                ended.append((sequence.request, self._retire(index, "stopped")))
        if not self.decoding:
            return
        tokens = [s.next_token for s in self.decoding if s.next_token is not None]
        assert len(tokens) == len(self.decoding), "every decoding row has its next token sampled"
        forward_started = time.perf_counter()
        try:
            logits = self._forward_batch(tokens) if self.batched else self._forward_each(tokens)
        except Exception as exc:  # a failed batched forward leaves no row's cache trustworthy
            self._fail_all_decoding(exc, ended)
            return
        if self.timing.sync and logits.device.type == "cuda":
            torch.cuda.synchronize(logits.device)
        forward_s = time.perf_counter() - forward_started
        for sequence, token in zip(self.decoding, tokens):
            sequence.fed += 1
            sequence.ids.append(token)
            if sequence.seen is not None:
                sequence.seen = torch.cat([sequence.seen, sequence.seen.new_tensor([token])])
        self._accept_rows(logits, ended)
        timing = self.timing
        timing.steps, timing.rows = timing.steps + 1, timing.rows + len(tokens)
        timing.forward_s += forward_s
        timing.decode_s += time.perf_counter() - started

    def _accept_rows(self, logits: torch.Tensor, ended: list) -> None:
        # Greedy rows with nothing to apply first (no penalty, no grammar) are picked together: one argmax over
        # the batch and one copy of the picks to the host, instead of one of each per row.
        plain = [i for i, s in enumerate(self.decoding) if _plain_greedy(s)]
        # In float32 (exact for BF16/FP16 values, the same first maximum): PyTorch's argmax over BF16 on CPU is 4x
        # slower than its conversion and argmax together (16 rows of a 49,152 vocabulary: 1.4 against 0.4 ms).
        chosen = logits if len(plain) == len(self.decoding) else logits[plain]
        picks = dict(zip(plain, chosen.float().argmax(dim=-1).tolist())) if plain else {}
        finished, failed = [], {}
        for index, sequence in enumerate(self.decoding):
            try:
                self._accept(sequence, logits[index : index + 1], None, picks.get(index))
            except GrammarFailed as exc:  # that row's grammar: the other rows go on
                failed[index] = exc
                continue
            if sequence.next_token is None:
                finished.append(index)
        for index in sorted(finished + list(failed), reverse=True):
            sequence = self.decoding[index]
            reply = self._retire(index, sequence.finish or "error")
            if index in failed:
                reply = self._failure(sequence.request, failed[index], sequence)
            ended.append((sequence.request, reply))

    def _accept(self, sequence: Sequence, logits: torch.Tensor, ended: list | None, pick: int | None = None) -> None:
        """Sample the next token of one sequence from its logits [1, vocab], emit its text, decide if it ends.

        Sets `next_token` (to feed at the next step) or leaves it None with `finish` set. When `ended` is given
        (the first token, straight after prefill), a sequence that ends is finished here. `pick`: the token,
        already chosen for a plain greedy row (see `_accept_rows`).
        """
        params = sequence.request.params
        row = logits[0]
        if sequence.grammar is not None:
            if sequence.constraint is None:
                with self.tokenizer_lock:
                    sequence.constraint = Constraint(
                        sequence.grammar, self.loaded.tokenizer, row.shape[-1], self.loaded.chat_format.stop_token_ids
                    )
            row = sequence.constraint.mask(row)
        token = pick if pick is not None else sample_next(row, params, sequence.seen, sequence.generator)
        if sequence.constraint is not None:
            sequence.constraint.accept(token)
        now = time.perf_counter()
        sequence.last_token_at = now
        if sequence.first_token_at is None:
            sequence.first_token_at = now
        sequence.next_token = None
        if token in self.loaded.chat_format.stop_token_ids:
            sequence.finish = "eos"
        else:
            sequence.generated.append(token)
            if sequence.request.output.top_logprobs is not None:
                self._emit_logprob(sequence, row, token)
            self._emit_token(sequence, token)
            if sequence.constraint is not None and sequence.constraint.finished:
                sequence.finish = "eos"  # the call or the JSON value is complete: nothing else may follow
            elif len(sequence.generated) >= sequence.limit:
                sequence.finish = "length"
            elif sequence.request.stop_requested:
                sequence.finish = "stopped"
            else:
                sequence.next_token = token
        if sequence.next_token is None and ended is not None:
            ended.append((sequence.request, self._reply(sequence, sequence.finish)))

    def _emit_logprob(self, sequence: Sequence, row: torch.Tensor, token: int) -> None:
        """The token's log probability under the distribution it was drawn from (after a grammar's mask, before
        temperature and top-p, as OpenAI reports them) and its `top_logprobs` most likely alternatives."""
        logprobs = torch.log_softmax(row.float(), dim=-1)
        count = sequence.request.output.top_logprobs
        top = torch.topk(logprobs, count) if count else None
        with self.tokenizer_lock:
            decode = self.loaded.tokenizer.decode
            alternatives = (
                []
                if top is None
                else [(decode([int(i)]), float(v)) for v, i in zip(top.values, top.indices) if v > float("-inf")]
            )
            text = decode([token])
        if not sequence.text_started and not sequence.request.output.raw_prompt:
            text = text.lstrip()  # as the reply's text is (see _emit_token): the tokens add up to the content
        sequence.request.emit(TokenLogprob(text, max(float(logprobs[token]), -9999.0), alternatives))

    def _emit_token(self, sequence: Sequence, token: int) -> None:
        assert sequence.decoder is not None  # made with the sequence
        with self.tokenizer_lock:
            delta = sequence.decoder.push(token)
        if not sequence.text_started:
            # Replies never start with whitespace worth keeping; ChatGLM3 even opens with an empty metadata line.
            # A raw prompt's continuation does (" there" after "Once upon a time").
            if not sequence.request.output.raw_prompt:
                delta = delta.lstrip()
            sequence.text_started = bool(delta)
        if delta:
            sequence.request.emit_text(delta)

    # ---- ending a sequence -------------------------------------------------------------------------------

    def _retire(self, index: int, finish: str) -> Reply:
        """Take row `index` out of the decode batch, keep its cache, and build its reply."""
        sequence = self.decoding[index]
        if self.batched:
            sequence.cache = self._slots.take(index, self.loaded.model.config)
            last = self.decoding.pop()
            if index < len(self.decoding):
                self.decoding[index] = last  # the last row moved into the freed slot
            if not self.decoding:
                self._slots.clear()
        else:
            self.decoding.pop(index)
        return self._reply(sequence, finish)

    def _reply(self, sequence: Sequence, finish: str) -> Reply:
        request, stats = sequence.request, sequence.stats
        if sequence.decoder is not None and sequence.first_token_at is not None:
            with self.tokenizer_lock:
                tail = sequence.decoder.flush()
            if not sequence.text_started and not request.output.raw_prompt:
                tail = tail.lstrip()
            if tail:
                request.emit_text(tail)
        text = request.text_so_far
        if sequence.first_token_at is not None and sequence.cache is not None:
            conversation = request.messages + [{"role": "assistant", "content": text}]
            self.pool.put(
                request.conversation_id,
                CachedContext(
                    list(sequence.ids),
                    sequence.cache,
                    messages=conversation,
                    unfed=sequence.unfed,
                    prompt_length=sequence.prompt_length,
                    prompt_logits=sequence.prompt_logits,
                    owner=request.owner,
                ),
            )
        sequence.cache = None
        stats.completion_tokens = len(sequence.generated)
        if sequence.first_token_at is not None:
            stats.ttft_s = sequence.first_token_at - sequence.started
            last = sequence.last_token_at
            if len(sequence.generated) > 1 and last is not None and last > sequence.first_token_at:
                stats.decode_tokens_per_s = (len(sequence.generated) - 1) / (last - sequence.first_token_at)
        stats.total_s = time.perf_counter() - sequence.started
        return Reply(text=text, finish_reason=finish, stats=stats, dropped_messages=sequence.dropped)

    def _failure(self, request: Request, exc: Exception, sequence: Sequence | None = None) -> Reply:
        self.pool.drop(request.conversation_id)
        if sequence is not None:
            sequence.cache = None
        if isinstance(exc, torch.OutOfMemoryError):
            self.free_memory()
            message, kind = OUT_OF_MEMORY, UNAVAILABLE
        elif isinstance(exc, (PromptTooLong, ValueError)):
            message, kind = str(exc), TOO_LONG if isinstance(exc, PromptTooLong) else FAILED
        else:
            log.exception("generation failed")
            message, kind = f"generation failed: {type(exc).__name__}: {exc}", FAILED
        stats = sequence.stats if sequence is not None else ReplyStats()
        return Reply(
            text=request.text_so_far,
            finish_reason="error",
            error=message,
            error_kind=kind,
            stats=stats,
            dropped_messages=sequence.dropped if sequence is not None else 0,
        )

    def _fail_all_decoding(self, exc: Exception, ended: list) -> None:
        for sequence in self.decoding:
            ended.append((sequence.request, self._failure(sequence.request, exc, sequence)))
        self.decoding = []
        if self.slots is not None:
            self.slots.clear()

    def free_memory(self) -> None:
        self.pool.clear()
        gc.collect()
        if self.loaded.device.type == "cuda":
            torch.cuda.empty_cache()
