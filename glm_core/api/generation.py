"""Between the routes and the backend: a chat request made ready (its token budget checked), submitted under the
conversation id that reuses its kept cache, and read from the event loop as text deltas with stop strings
applied, stopping the backend's request the moment the client goes away."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import threading
import weakref
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from anyio import to_thread
from starlette.requests import Request as HttpRequest

from ..protocol import (
    REJECTED,
    TOO_LONG,
    UNAVAILABLE,
    UPSTREAM,
    Backend,
    ConversationBusy,
    Delta,
    Event,
    Finished,
    OutputSpec,
    Reply,
    Request,
    SamplingParams,
    Tokenizing,
    TokenLogprob,
    ToolCallDelta,
    validate_messages,
)
from ..reasoning import split_reasoning
from ..sampling_defaults import card_defaults, compose_params
from ..tool_calls import new_call_id, read_calls
from .access import Caller
from .accounting import Ticket, admit, settle
from .config import ApiLimits
from .conversation_ids import StatelessConversations
from .errors import ApiError, backend_error

if TYPE_CHECKING:
    from ..models.tool_formats import ToolSyntax
    from .state import ApiState

FINISH_REASONS = {"eos": "stop", "stopped": "stop", "length": "length"}  # the engine's words -> OpenAI's
# How long a stream waits for its request's first event (queued, started, or refused) before it answers 200: a
# request the backend refuses at once (a remote server's 400) then gets its status code, not an error event.
OPENING_WAIT_S = 10.0


def model_name(backend: Backend) -> str:
    return backend.card().name or backend.spec.path


def system_fingerprint(backend: Backend) -> str:
    """OpenAI's `system_fingerprint`: names the configuration replies come from (which backend and model, its
    precision and device), so a client comparing seeded replies sees when it changed."""
    card = backend.card()
    configuration = "|".join((card.backend, card.source, card.name, card.precision, card.device))
    return "fp_" + hashlib.sha256(configuration.encode("utf-8")).hexdigest()[:10]


def model_context(backend: Backend) -> int:
    """The most tokens (prompt and reply) the model takes."""
    return backend.card().max_context or SamplingParams().max_length


async def prompt_ids(
    backend: Backend, messages: list[dict], output: OutputSpec | None = None, thinking: bool | None = None
) -> list[int] | None:
    """The whole conversation's token ids in the model's format (with its tools and thinking switch, or the raw
    prompt), as the backend will feed them: counted for max_tokens and handed to submit, so the prompt is
    tokenized once per request. None where the backend cannot tokenize here (a remote server counts its own)."""
    if not isinstance(backend, Tokenizing):
        return None
    return await to_thread.run_sync(backend.encode_chat, messages, output, thinking)


@dataclass
class Prepared:
    """A generating route's request once its prologue passed: the checked messages, the prompt's ids (None where
    the backend tokenizes remotely) and the sampling controls with the reply's budget."""

    messages: list[dict]
    ids: list[int] | None
    params: SamplingParams


async def prepare(
    backend: Backend,
    messages: list[dict],
    output: OutputSpec,
    limits: ApiLimits,
    max_tokens: int | None,
    seed: int | None = None,
    thinking: bool | None = None,
    **controls,
) -> Prepared:
    """The prologue /v1/chat/completions, /v1/completions and /v1/responses share (who calls and their quotas
    are the dependencies' and Generation.submit's): the messages checked, the prompt counted in the model's format
    (with `output`'s tools), max_tokens held to the API's limit and the context's room, and the request's controls
    (None: left out) over the model's defaults. Each problem is a 400 naming its field."""
    messages = checked_messages(messages)
    context = model_context(backend)
    ids = await prompt_ids(backend, messages, output, thinking)
    budget = reply_budget(None if ids is None else len(ids), context, max_tokens, limits)
    params = checked_params(backend, seed=seed, max_length=context, max_new_tokens=budget, **controls)
    if thinking is not None:
        params = dataclasses.replace(params, thinking=thinking)
    return Prepared(messages, ids, params)


def reply_budget(prompt_tokens: int | None, context: int, max_tokens: int | None, limits: ApiLimits) -> int:
    """max_tokens as OpenAI means it (tokens to generate): bounded by the API's limit and what the context has
    left after the prompt; too much is a clear 400, never a silently cut prompt."""
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise ApiError(
            400,
            f"max_tokens is {max_tokens}, but this server generates at most {limits.max_tokens} tokens per request",
            "max_tokens_too_large",
            "max_tokens",
        )
    room = context - (prompt_tokens or 0)
    if prompt_tokens is not None and (room < 1 or (max_tokens is not None and max_tokens > room)):
        wanted = max_tokens if max_tokens is not None else 1
        raise ApiError(
            400,
            f"this model's context is {context} tokens; the messages take {prompt_tokens} and "
            f"{wanted} more were asked for the reply. Shorten the messages or lower max_tokens.",
            "context_length_exceeded",
            "messages",
        )
    if max_tokens is not None:
        return max_tokens
    return max(1, min(limits.default_max_tokens, room - 1 if prompt_tokens is None else room))


def checked_messages(messages: list[dict]) -> list[dict]:
    try:
        return validate_messages(messages)
    except ValueError as exc:
        raise ApiError(400, str(exc), param="messages") from None


def sampling_defaults(backend: Backend) -> dict:
    """The model's sampling defaults with their sources (what an omitted field becomes)."""
    return card_defaults(backend.card())


def checked_params(backend: Backend, seed: int | None = None, **given) -> SamplingParams:
    """The request's controls (None: left out) over the model's defaults; a bad value is a 400."""
    try:
        return compose_params(sampling_defaults(backend), given, seed=seed)[0]
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None


async def start_total_length_generation(
    backend: Backend, state: ApiState, caller: Caller, messages: list[dict], max_length: int, **controls
) -> Generation:
    """The seeds' prologue: max_length counts prompt and reply together, as ChatGLM's chat() counts it; the
    prompt's ids go on with the request (tokenized once)."""
    messages = checked_messages(messages)
    max_length = min(max_length, model_context(backend))
    ids = await prompt_ids(backend, messages)
    if ids is None:
        max_new = min(state.limits.default_max_tokens, max_length - 1)
    elif len(ids) >= max_length:
        raise ApiError(
            400,
            f"the conversation takes {len(ids)} tokens, so max_length {max_length} leaves no room for a reply",
            "context_length_exceeded",
            "max_length",
        )
    else:
        max_new = min(max_length - len(ids), state.limits.max_tokens)
    params = checked_params(backend, max_length=max_length, max_new_tokens=max_new, **controls)
    return Generation.submit(
        backend, state.conversations, caller, messages, params, limits=state.limits, prompt_ids=ids
    )


class StopStrings:
    """Cuts the reply at the first stop string. Text that may be the start of one is held back until it is
    certain, so a client never sees part of a stop string. Each stop string is matched incrementally (a KMP
    automaton per string: a delta costs its own length, whatever the stop strings' lengths)."""

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = [s for s in stops if s]
        self._failure = [_failure_function(s) for s in self.stops]
        self._matched = [0] * len(self.stops)  # characters of each stop string matched at the end of the text
        self.pending = ""  # held back: it may be the start of a stop string
        self.hit = False

    def push(self, text: str) -> str:
        if self.hit:
            return ""
        if not self.stops:
            return text
        held = self.pending
        for position, char in enumerate(text):
            ended = 0  # the longest stop string that ends with this character
            for index, stop in enumerate(self.stops):
                matched, failure = self._matched[index], self._failure[index]
                while matched and stop[matched] != char:
                    matched = failure[matched - 1]
                if stop[matched] == char:
                    matched += 1
                if matched == len(stop):
                    ended, matched = max(ended, matched), failure[matched - 1]
                self._matched[index] = matched
            if ended:  # everything before the stop string goes out, nothing of it or after it
                seen = held + text[: position + 1]
                self.pending, self.hit = "", True
                return seen[: len(seen) - ended]
        seen = held + text
        keep = max(self._matched)
        self.pending = seen[len(seen) - keep :] if keep else ""
        return seen[: len(seen) - keep]

    def flush(self) -> str:
        out, self.pending = ("" if self.hit else self.pending), ""
        return out


def _failure_function(pattern: str) -> list[int]:
    """KMP: for each prefix of `pattern`, the length of its longest proper prefix that is also its suffix."""
    failure, length = [0] * len(pattern), 0
    for index in range(1, len(pattern)):
        while length and pattern[index] != pattern[length]:
            length = failure[length - 1]
        if pattern[index] == pattern[length]:
            length += 1
        failure[index] = length
    return failure


class _EventReader:
    """The request's events on the event loop. A thread of its own waits on the backend's queue (it ends with the
    request, which always finishes), so a slow or waiting request never holds a worker of the shared pool."""

    def __init__(self, request: Request):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

        def pump() -> None:
            for event in request.events():
                try:
                    loop.call_soon_threadsafe(self.queue.put_nowait, event)
                except RuntimeError:  # the event loop is gone (server shutting down)
                    request.stop()
                    return

        threading.Thread(target=pump, name=f"api-events-{request.id}", daemon=True).start()

    async def events(self, held: Event | None = None) -> AsyncIterator[Event]:
        """Every event until Finished (`held` first: one already taken off the queue); deltas already waiting go
        out as one."""
        queue = self.queue
        while True:
            event, held = (held, None) if held is not None else (await queue.get(), None)
            if isinstance(event, Delta):
                pieces = [event.text]
                while not queue.empty():
                    following = queue.get_nowait()
                    if not isinstance(following, Delta):
                        held = following
                        break
                    pieces.append(following.text)
                event = Delta("".join(pieces))
            yield event
            if isinstance(event, Finished):
                return


@dataclass
class Generation:
    """One reply for an API client. Iterate `deltas()` (or await `collect()`), then read `text`,
    `finish_reason` and the usage figures."""

    request: Request
    messages: list[dict]
    caller: Caller
    conversations: StatelessConversations
    stop: StopStrings
    output: OutputSpec = field(default_factory=OutputSpec)
    syntax: ToolSyntax | None = None  # the model's, when the reply may be a tool call
    reasoning: bool = False  # a reasoning model's reply: its <think>...</think> goes out as reasoning_content
    text: str = ""
    reply: Reply | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    content: str = ""  # the reply's text less its tool calls (set when it ends)
    tool_calls: list[dict] = field(default_factory=list)  # [{"id", "name", "arguments"}]
    call_deltas: list[ToolCallDelta] = field(default_factory=list)  # a backend's own calls, as they came
    client_gone: bool = False
    ticket: Ticket | None = None  # its place under the caller's quotas; its usage is recorded when it ends
    backend: Backend | None = field(default=None, repr=False)
    _ended: bool = field(default=False, repr=False)
    _reader: _EventReader | None = field(default=None, repr=False)
    _held: Event | None = field(default=None, repr=False)  # the first event, taken by opening()

    @classmethod
    def submit(
        cls,
        backend: Backend,
        conversations: StatelessConversations,
        caller: Caller,
        messages: list[dict],
        params: SamplingParams,
        stop: Sequence[str] = (),
        limits: ApiLimits = ApiLimits(),
        output: OutputSpec | None = None,
        prompt_ids: list[int] | None = None,
    ) -> Generation:
        """Submit under the caller's quota and a conversation id that reuses its kept cache. `prompt_ids`: the
        prologue's encoding (Prepared.ids), fed by the runner as they are."""
        output = output or OutputSpec()
        asked = output if output != OutputSpec() else None  # `whole` alone is asked too: a relay honours it
        ticket = admit(caller)  # 429 past a quota, before anything is queued
        conversation_id = conversations.claim(caller.scope, messages)
        try:
            try:
                request = backend.submit(
                    conversation_id, messages, params, owner=caller.owner, output=asked, prompt_ids=prompt_ids
                )
            except ConversationBusy:  # a reply this client left is still ending there: start afresh
                conversations.release(caller.scope, conversation_id, None)
                conversation_id = conversations.claim(caller.scope, messages, fresh=True)
                request = backend.submit(
                    conversation_id, messages, params, owner=caller.owner, output=asked, prompt_ids=prompt_ids
                )
        except Exception as exc:
            conversations.release(caller.scope, conversation_id, None)
            if ticket is not None:
                ticket.cancel()
            raise backend_error(exc, limits.retry_after_s) from None
        syntax = getattr(backend, "tool_syntax", None) if output.tools and output.tool_choice != "none" else None
        generation = cls(
            request,
            messages,
            caller,
            conversations,
            StopStrings(stop),
            output,
            syntax,
            reasoning=backend.card().reasoning,
            ticket=ticket,
            backend=backend,
        )
        if ticket is not None:  # a stream whose client left before it was read never ends: its place comes back
            weakref.finalize(generation, ticket.cancel)
        return generation

    def _events(self) -> AsyncIterator[Event]:
        if self._reader is None:
            self._reader = _EventReader(self.request)
        held, self._held = self._held, None
        return self._reader.events(held)

    async def opening(self, timeout_s: float = OPENING_WAIT_S) -> None:
        """Before a stream answers 200: wait (up to `timeout_s`) for the request's first event, and raise its
        ApiError when the backend ended it with an error straight away (a remote server that refused it), so the
        client gets the status code rather than an error inside a stream. A request queued or started goes on."""
        if self._reader is None:
            self._reader = _EventReader(self.request)
        try:
            self._held = await asyncio.wait_for(self._reader.queue.get(), timeout_s)
        except TimeoutError:
            return
        except asyncio.CancelledError:  # the client went away meanwhile: its request ends here
            self.client_gone = True
            self.request.stop()
            self._end()
            raise
        if isinstance(self._held, Finished) and self._held.reply.error is not None:
            async for _ in self.deltas():
                pass
            self.raise_for_error()

    async def deltas(self) -> AsyncIterator[str]:
        """The reply's text as it comes (an empty piece for each tool-call delta a backend streams). Leaving early
        (the client went away: the response is cancelled) stops the backend's request at its next token."""
        try:
            async for event in self._events():
                if isinstance(event, Delta):
                    piece = self.stop.push(event.text)
                    if self.stop.hit:
                        self.request.stop()  # the rest is not wanted; Finished follows within a token
                    if piece:
                        self.text += piece
                        yield piece
                elif isinstance(event, TokenLogprob):
                    self.logprobs.append(event)
                elif isinstance(event, ToolCallDelta):
                    self.call_deltas.append(event)
                    yield ""
                elif isinstance(event, Finished):
                    self.reply = event.reply
                    tail = self.stop.flush()
                    if tail:
                        self.text += tail
                        yield tail
                    self._read_calls()
        finally:
            if self.reply is None:
                self.client_gone = True
                self.request.stop()
            self._end()

    async def collect(self, http_request: HttpRequest) -> str:
        """The whole reply, for a non-streamed response; a client that disconnects meanwhile stops it."""
        watcher = asyncio.create_task(_stop_when_disconnected(http_request, self.request))
        try:
            async for _ in self.deltas():
                pass
        finally:
            watcher.cancel()
        return self.text

    def _read_calls(self) -> None:
        if self.reply is not None and self.reply.tool_calls:  # read by the backend (a remote server): as it sent them
            self.content = self.text
            self.tool_calls = [{**call, "id": call.get("id") or new_call_id()} for call in self.reply.tool_calls]
            return
        self.content, self.tool_calls = read_calls(
            self.syntax, self.text, self.output.tools, self.output.parallel_tool_calls
        )

    def streamable(self) -> int:
        """How much of the reply so far a stream may send as text: all of it, less what may still be a tool call."""
        return len(self.text) if self.syntax is None else self.syntax.streamable(self.text, self.output.tools)

    def unsent_content(self, sent: int) -> str:
        """Once the reply has ended: its text (less its calls) that a stream which sent `sent` characters still
        owes."""
        if not self.tool_calls:
            return self.text[sent:]
        already = self.text[:sent].strip()
        return self.content[len(already) :] if self.content.startswith(already) else ""

    def _end(self) -> None:
        if self._ended:
            return
        self._ended = True
        reply = self.reply
        keep = reply is not None and reply.error is None and not self.client_gone
        said: dict[str, Any] = {"role": "assistant", "content": self.parts()[1]}
        if self.tool_calls:
            said["tool_calls"] = self.tool_calls
        conversation = self.messages + [said] if keep else None
        self.conversations.release(self.caller.scope, self.request.conversation_id, conversation)
        settle(self.ticket, self.backend, reply)

    def parts(self) -> tuple[str, str]:
        """(reasoning, answer) of the reply so far (less its tool calls once it has ended); ("", text) for a model
        that does not reason."""
        text = self.content if self.tool_calls else self.text
        return split_reasoning(text) if self.reasoning else ("", text)

    # ---- how it ended ----

    def raise_for_error(self) -> None:
        """An error the backend reported while generating, as an ApiError (503 when it is about capacity)."""
        if self.reply is None or self.reply.error is None:
            return
        message, kind = self.reply.error, self.reply.error_kind
        if kind == UNAVAILABLE:
            raise ApiError(503, message, "model_unavailable")
        if kind == TOO_LONG:
            raise ApiError(400, message, "context_length_exceeded", "messages")
        if kind == REJECTED:  # the server the request was relayed to refused it: the message names that server
            raise ApiError(400, message, "upstream_rejected")
        if kind == UPSTREAM:
            raise ApiError(502, message, "upstream_failed")
        raise ApiError(500, message, "generation_failed")

    @property
    def finish_reason(self) -> str:
        if self.tool_calls:
            return "tool_calls"
        if self.stop.hit:
            return "stop"
        return FINISH_REASONS.get(self.reply.finish_reason if self.reply else "", "stop")

    @property
    def prompt_tokens(self) -> int:
        return self.reply.stats.prompt_tokens if self.reply else 0

    @property
    def completion_tokens(self) -> int:
        return self.reply.stats.completion_tokens if self.reply else 0

    @property
    def cached_tokens(self) -> int:
        return self.reply.stats.reused_tokens if self.reply else 0


async def _stop_when_disconnected(http_request: HttpRequest, request: Request) -> None:
    while True:
        message = await http_request.receive()
        if message["type"] == "http.disconnect":
            request.stop()
            return
