"""Types every layer shares, free of torch: what a backend accepts (messages, sampling controls, a model spec),
what it answers (events, Reply, ReplyStats), the errors it raises, and the Backend protocol itself.

The conversation layer, the pages, the CLI and the API talk to a `Backend` only; the local engine and the remote
backends implement it.
"""

from __future__ import annotations

import itertools
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol, runtime_checkable

from .settings import DEFAULT_GROUP_SIZE, EMBEDDED, load_settings

ROLES = ("system", "user", "assistant")
# A tool's result, answering an assistant's tool_calls (the API's `tool` role; ChatGLM3's <|observation|>); stored
# conversations keep it too (the chat page's tool results).
TOOL_ROLE = "tool"
MAX_TOP_LOGPROBS = 20  # as OpenAI's

# Server-side limits on one request, whatever sent it (the chat page, the CLI, the API).
MAX_PROMPT_CHARS = 32_000  # the new user message
MAX_SYSTEM_PROMPT_CHARS = 16_000
# The whole request (history included). A 131,072-token context holds about 500,000 characters of English text;
# the conversation layer sends only the newest turns within this limit (Conversation.model_messages), so a long
# or imported conversation can still be continued, and one request cannot make the worker tokenize megabytes.
MAX_REQUEST_CHARS = 1_000_000
MAX_REQUEST_MESSAGES = 10_000
MAX_CONTEXT_TOKENS = 1_048_576  # max_length: above any model's context (the engine clamps to the model's)
MAX_TOP_K = 1_000_000


# ---- errors ------------------------------------------------------------------------------------------------


class PromptTooLong(ValueError):
    """The newest message alone does not fit the token limit."""


class ConversationBusy(RuntimeError):
    """A reply for this conversation is still being generated."""


class EngineClosed(RuntimeError):
    """The model was unloaded or replaced after the page took the backend and before it submitted."""


class QueueFull(RuntimeError):
    """The backend's waiting line (or this person's share of it) is full; try again shortly."""


class ModelLoadError(Exception):
    """A model could not be loaded; str(error) is a one-line reason meant for the user."""


# ---- what a request asks for -------------------------------------------------------------------------------


@dataclass
class SamplingParams:
    # Defaults of the ChatGLM demos: 8192 total tokens, top_p 0.8, temperature 0.8.
    max_length: int = 8192
    max_new_tokens: int = 1024
    temperature: float = 0.8
    top_p: float = 0.8
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    # Reasoning models whose chat template has the switch (GLM-4.5+: enable_thinking): False asks for the answer
    # without thinking; None leaves the template's default.
    thinking: bool | None = None
    # The controls the person or the client set (sampling_defaults.compose_params fills the rest from the model's
    # defaults); a remote backend sends only these, so the server applies its own defaults to the others. None:
    # every control was set.
    explicit: frozenset[str] | None = field(default=None, compare=False)

    def validate(self) -> SamplingParams:
        """Raise ValueError with a readable message when a control is out of range or not a plain number.

        Checked on the server for every request (the page's widgets are no guard against an API client or an
        edited request): NaN and infinities, booleans and text posing as numbers are refused, not clamped.
        """
        for name in ("max_length", "max_new_tokens", "top_k"):
            _whole_number(name, getattr(self, name))
        for name in ("temperature", "top_p", "repetition_penalty"):
            _finite_number(name, getattr(self, name))
        if not 2 <= self.max_length <= MAX_CONTEXT_TOKENS:
            raise ValueError(f"max_length must be from 2 to {MAX_CONTEXT_TOKENS:,} tokens")
        if not 1 <= self.max_new_tokens < self.max_length:
            raise ValueError(f"max new tokens must be between 1 and max_length - 1 ({self.max_length - 1})")
        if not 0 <= self.temperature <= 100:
            raise ValueError("temperature must be 0 (greedy) or more, up to 100")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if not 0 <= self.top_k <= MAX_TOP_K:
            raise ValueError(f"top_k must be 0 (off) or more, up to {MAX_TOP_K:,}")
        if not 0 < self.repetition_penalty <= 100:
            raise ValueError("repetition penalty must be positive (1.0 is off), up to 100")
        if self.thinking is not None and not isinstance(self.thinking, bool):
            raise ValueError(f"thinking must be true, false or null, got {str(self.thinking)[:40]!r}")
        if self.seed is not None:
            _whole_number("seed", self.seed)
            if not 0 <= self.seed < 2**63:
                raise ValueError("seed must be a whole number from 0 to 2**63 - 1")
        return self

    def as_dict(self) -> dict:
        values = asdict(self)
        del values["explicit"]
        return values

    def is_explicit(self, control: str) -> bool:
        return self.explicit is None or control in self.explicit


@dataclass
class OutputSpec:
    """What a request asks of the reply beyond sampling: tools the model may call (OpenAI function definitions,
    rendered in the model's own tool format), whether it must call one, a JSON schema the reply must match
    (decoding is constrained by a grammar), and per-token logprobs. The default asks for none of it."""

    tools: list[dict] = field(default_factory=list)  # [{"name", "description", "parameters"}, ...]
    tool_choice: str = "auto"  # "auto", "none", "required", or a tool's name (that call is forced)
    parallel_tool_calls: bool = True
    json_schema: dict | None = None  # a text reply is JSON that matches it ({"type": "object"}: json_object); a
    # forced call takes precedence (the reply is then the call)
    top_logprobs: int | None = None  # None: no logprobs; else the logprob of each token and this many runners-up
    raw_prompt: bool = False  # the last user message's text is the whole prompt, as is (/v1/completions)
    whole: bool = False  # the client takes the reply whole, not streamed: a relay asks its server for it whole too
    # (llama.cpp, for one, refuses logprobs with tools in a stream); the local engine streams either way

    @property
    def forced_call(self) -> bool:
        return bool(self.tools) and self.tool_choice not in ("auto", "none")

    @property
    def constrained(self) -> bool:
        return self.forced_call or self.json_schema is not None

    def validate(self) -> OutputSpec:
        names = [t.get("name") for t in self.tools]
        if not all(isinstance(n, str) and n for n in names):
            raise ValueError("each tool needs a function name")
        if len(set(names)) != len(names):
            raise ValueError("tool names must be unique")
        if self.tool_choice not in ("auto", "none", "required") and self.tool_choice not in names:
            raise ValueError(f"tool_choice names {self.tool_choice!r:.60}, which is not among the tools")
        if self.tool_choice == "required" and not self.tools:
            raise ValueError("tool_choice is required but no tools were given")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be from 0 to {MAX_TOP_LOGPROBS}")
        return self


def _whole_number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a whole number, got {str(value)[:40]!r}")


def _finite_number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {str(value)[:40]!r}")


@dataclass(frozen=True)
class ModelSpec:
    path: str = EMBEDDED
    precision: str = "auto"
    device: str = "auto"
    family: str = "auto"  # ChatGLM checkpoints: "chatglm2" or "chatglm3" overrides what the folder suggests
    group_size: int = DEFAULT_GROUP_SIZE  # INT4 quantization group (input channels sharing a scale and zero)

    @classmethod
    def from_settings(cls) -> ModelSpec:
        s = load_settings()
        return cls(path=s.model_path, precision=s.precision, device=s.device, family=s.family, group_size=s.group_size)


def validate_messages(messages: Sequence[dict]) -> list[dict]:
    """The messages of one request, checked against the server-side limits (the browser's are no guard):
    the new prompt, a system message and the whole request each have a size limit, with a message that says
    which and by how much. Raises ValueError; nothing has been queued or stored then."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError("messages must be a list of {role, content} objects")
    if len(messages) > MAX_REQUEST_MESSAGES:
        raise ValueError(f"the request has {len(messages):,} messages; at most {MAX_REQUEST_MESSAGES:,} are accepted")
    clean: list[dict] = []
    total = 0
    for m in messages:
        if not isinstance(m, dict):
            raise ValueError(f"each message needs a role among {ROLES} and text content, got {m!r:.80}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES + (TOOL_ROLE,) or not isinstance(content, str):
            raise ValueError(f"each message needs a role among {ROLES} and text content, got {m!r:.80}")
        if role == "system" and len(content) > MAX_SYSTEM_PROMPT_CHARS:
            raise ValueError(
                f"the system prompt has {len(content):,} characters; at most {MAX_SYSTEM_PROMPT_CHARS:,} are accepted"
            )
        message = {"role": role, "content": content}
        calls = m.get("tool_calls")
        if calls:
            if role != "assistant":
                raise ValueError("only an assistant message may carry tool_calls")
            message["tool_calls"] = _checked_tool_calls(calls)
            total += sum(len(c["name"]) + len(c["arguments"]) for c in message["tool_calls"])
        if role == TOOL_ROLE:
            if not clean or not (clean[-1].get("tool_calls") or clean[-1]["role"] == TOOL_ROLE):
                raise ValueError("a tool message must follow an assistant message with tool_calls")
            message["name"] = str(m.get("name") or "")
            message["tool_call_id"] = str(m.get("tool_call_id") or "")
        total += len(content)
        reasoning = m.get("reasoning_content")
        if role == "assistant" and reasoning:  # an earlier reply's thinking: the chat template keeps or drops it
            if not isinstance(reasoning, str):
                raise ValueError(f"reasoning_content must be text, got {type(reasoning).__name__}")
            total += len(reasoning)
            message["reasoning_content"] = reasoning
        clean.append(message)
    if not clean or clean[-1]["role"] not in ("user", TOOL_ROLE):
        raise ValueError("the conversation must end with a user message (or a tool's result)")
    if clean[-1]["role"] == "user" and not clean[-1]["content"].strip():
        raise ValueError("the message is empty")
    if len(clean[-1]["content"]) > MAX_PROMPT_CHARS:
        raise ValueError(
            f"the message has {len(clean[-1]['content']):,} characters; at most {MAX_PROMPT_CHARS:,} are accepted"
        )
    if total > MAX_REQUEST_CHARS:
        raise ValueError(f"the request has {total:,} characters; at most {MAX_REQUEST_CHARS:,} are accepted")
    return clean


def _checked_tool_calls(calls) -> list[dict]:
    """An assistant's tool calls as {"id", "name", "arguments"} (arguments: the JSON text the model wrote)."""
    if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
        raise ValueError("tool_calls must be a list of {id, name, arguments} objects")
    clean = []
    for call in calls:
        name, arguments = call.get("name"), call.get("arguments", "{}")
        if not isinstance(name, str) or not name or not isinstance(arguments, str):
            raise ValueError(f"a tool call needs a name and its arguments as JSON text, got {call!r:.80}")
        clean.append({"id": str(call.get("id") or ""), "name": name, "arguments": arguments})
    return clean


def newest_within_limits(messages: list[dict]) -> tuple[list[dict], int]:
    """The system message and the newest turns of `messages` that fit the request limits (MAX_REQUEST_CHARS,
    MAX_REQUEST_MESSAGES), cut at a user message as the engine cuts to fit its context; returns them and how
    many older messages were left out. The newest message is always kept (its own limit is checked later)."""
    system = [m for m in messages[:1] if m.get("role") == "system"]
    turns = messages[len(system) :]
    budget_chars = MAX_REQUEST_CHARS - sum(len(m.get("content") or "") for m in system)
    budget_count = MAX_REQUEST_MESSAGES - len(system)
    start, chars = len(turns), 0
    while start > 0:
        size = len(turns[start - 1].get("content") or "")
        if chars + size > budget_chars or len(turns) - start + 1 > budget_count:
            break
        start, chars = start - 1, chars + size
    if start == 0:
        return list(messages), 0
    start = min(start, len(turns) - 1)
    while start < len(turns) - 1 and turns[start].get("role") != "user":  # begin at a user turn
        start += 1
    return system + turns[start:], start


# ---- events a request emits, in order: Queued*, Started, Truncated?, Delta*, Finished ----------------------


@dataclass
class Queued:
    position: int  # 1 = the next to start


@dataclass
class Started:
    pass


@dataclass
class Truncated:
    dropped_messages: int
    context_tokens: int
    limit_tokens: int

    def describe(self) -> str:
        return (
            f"The conversation no longer fits {self.limit_tokens:,} tokens, so its {self.dropped_messages} oldest "
            f"message(s) were left out of the model's context (they stay in the history)."
        )


@dataclass
class Delta:
    text: str


@dataclass
class TokenLogprob:
    """One generated token's log probability and its most likely alternatives (when the request asked)."""

    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class ToolCallDelta:
    """A piece of a tool call as a backend that reads calls itself streams it (a remote server's `tool_calls`
    deltas): the call's index in the reply, its id and name where this piece carries them, and more arguments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class ReplyStats:
    prompt_tokens: int = 0  # tokens of the whole context the reply was conditioned on
    reused_tokens: int = 0  # of those, taken from the kept KV cache
    prefill_tokens: int = 0  # of those, computed in this turn
    completion_tokens: int = 0
    queue_s: float = 0.0
    ttft_s: float = 0.0  # from the start of processing to the first sampled token
    decode_tokens_per_s: float = 0.0  # after the first token
    total_s: float = 0.0


UNAVAILABLE, TOO_LONG, FAILED = "unavailable", "too_long", "failed"  # Reply.error_kind
# A server the request was relayed to (the remote backend): REJECTED, it refused the request as asked (its 4xx:
# the client's to change); UPSTREAM, it failed or could not be reached (its 5xx, a lost connection).
REJECTED, UPSTREAM = "rejected", "upstream"


@dataclass
class Reply:
    text: str = ""
    finish_reason: str = ""  # "eos", "length", "stopped" or "error"
    stats: ReplyStats = field(default_factory=ReplyStats)
    dropped_messages: int = 0
    error: str | None = None
    # What kind of error, for doors that answer by kind (the API's status codes): UNAVAILABLE (out of memory, the
    # model unloaded or the server busy: try again), TOO_LONG (the conversation does not fit), REJECTED and UPSTREAM
    # (a relayed request refused or failed by the server it went to), FAILED (anything else)
    error_kind: str | None = None
    # Calls a backend read itself (a remote server's tool_calls), as {"id", "name", "arguments"}; a local model's
    # calls are in its text and read by the API with the family's syntax.
    tool_calls: list[dict] = field(default_factory=list)

    @property
    def stopped(self) -> bool:
        return self.finish_reason == "stopped"


@dataclass
class Finished:
    reply: Reply


Event = Queued | Started | Truncated | Delta | TokenLogprob | ToolCallDelta | Finished


class Request:
    """One reply being generated: the caller reads its events (or only its text) and may stop it.

    Every backend hands these out; the backend's side emits events and finishes it exactly once.
    """

    _ids = itertools.count(1)

    def __init__(
        self,
        conversation_id: str,
        messages: list[dict],
        params: SamplingParams,
        recompute: bool = False,
        output: OutputSpec | None = None,
        prompt_ids: Sequence[int] | None = None,
    ):
        self.id = next(self._ids)
        self.conversation_id = conversation_id
        self.messages = messages
        self.params = params
        self.recompute = recompute
        self.output = output or OutputSpec()
        # The whole context's token ids as the backend's own encode_chat gave them to the door that counted them (the
        # API, for OpenAI's max_tokens): the runner feeds these rather than tokenizing the prompt a second time.
        self.prompt_ids = list(prompt_ids) if prompt_ids is not None else None
        self.grammar: str | None = None  # the compiled grammar `output` asks for (set by the engine that takes it)
        self.owner: str | None = None  # whose it is (a workspace, an API key): set by submit
        self.submitted_at = time.perf_counter()
        self.reply: Reply | None = None
        self._pieces: list[str] = []  # the reply's text so far, kept for a reply that fails half-way
        self._events: queue.Queue[Event] = queue.Queue()
        self._stop = threading.Event()
        self._done = threading.Event()

    def stop(self) -> None:
        """Ask the backend to stop after the current token; the partial reply is kept and marked stopped."""
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def text_so_far(self) -> str:
        return "".join(self._pieces)

    def wait(self, timeout: float | None = None) -> Reply | None:
        self._done.wait(timeout)
        return self.reply

    def events(self) -> Iterator[Event]:
        """Every event until (and including) Finished."""
        while True:
            event = self._events.get()
            yield event
            if isinstance(event, Finished):
                return

    def _coalesced_events(self) -> Iterator[Event]:
        """Like events(), but deltas already waiting are joined into one: a slow reader (a browser redrawing
        Markdown) then costs one redraw per read instead of one per token, and never slows the worker."""
        pending: list[str] = []
        while True:
            event = self._events.get() if not pending else self._get_nowait()
            if isinstance(event, Delta):
                pending.append(event.text)
                continue
            if pending:
                yield Delta("".join(pending))
                pending = []
            if event is None:
                continue
            yield event
            if isinstance(event, Finished):
                return

    def _get_nowait(self) -> Event | None:
        try:
            return self._events.get_nowait()
        except queue.Empty:
            return None

    def text_stream(self, on_event: Callable[[Event], None] | None = None) -> Iterator[str]:
        """Only the text deltas (for st.write_stream); other events go to `on_event`.

        Closing the generator early (the page was stopped) stops the request.
        """
        try:
            for event in self._coalesced_events():
                if isinstance(event, Delta):
                    yield event.text
                elif on_event is not None:
                    on_event(event)
        finally:
            if not self.done:
                self.stop()

    # ---- the backend's side ----

    def emit(self, event: Event) -> None:
        self._events.put(event)

    def emit_text(self, text: str) -> None:
        self._pieces.append(text)
        self._events.put(Delta(text))

    def finish(self, reply: Reply) -> None:
        self.reply = reply
        self._done.set()
        self._events.put(Finished(reply))


class SubmitPath:
    """The one way into a backend, shared by the local engine and the remote backend: the request is validated
    once (sampling controls, output spec, messages), refused before anything is queued when the backend cannot do
    what it asks (`_accept`), is closed, or the conversation already has a reply coming, then queued by the
    backend under the same lock (`_enqueue`, which may refuse it: QueueFull) and started (`_started`)."""

    closed_reason = "the backend was closed just now"
    _door: threading.Lock | threading.Condition  # guards _active, _closed and the backend's own queue
    _active: dict[str, Request]  # conversation id -> its reply being generated
    _closed: bool

    def submit(
        self,
        conversation_id: str,
        messages: Sequence[dict],
        params: SamplingParams | None = None,
        recompute: bool = False,
        owner: str | None = None,
        output: OutputSpec | None = None,
        prompt_ids: Sequence[int] | None = None,
    ) -> Request:
        params = (params or SamplingParams()).validate()
        output = (output or OutputSpec()).validate()
        request = Request(conversation_id, validate_messages(messages), params, recompute, output, prompt_ids)
        request.owner = owner
        self._accept(request)
        with self._door:
            if self._closed:
                raise EngineClosed(self.closed_reason)
            if conversation_id in self._active:
                raise ConversationBusy("a reply for this conversation is still being generated")
            self._enqueue(request, owner)
            self._active[conversation_id] = request
        self._started(request)
        return request

    def _accept(self, request: Request) -> None:
        """Refuse (ValueError) what this backend cannot do, and prepare what it needs, before any lock."""

    def _enqueue(self, request: Request, owner: str | None) -> None:
        """Queue the request (called holding `_door`); QueueFull when there is no room for it or its owner."""
        raise NotImplementedError

    def _started(self, request: Request) -> None:
        """After the request is queued and registered, outside the lock."""


# ---- the seam between the UI/API and whatever generates ----------------------------------------------------


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do, so pages and routes offer only what works."""

    local_model: bool = False  # a model in this process: memory figures, unload, precision benchmarks
    kept_cache: bool = False  # keeps each conversation's KV cache here (a remote server keeps its own)
    recompute: bool = False  # can recompute a context from scratch on request (the kept-cache baseline)


@dataclass(frozen=True)
class ModelCard:
    """What a backend says about its model (the pages' model card, the API's model name and fingerprint, the
    usage records). Every backend fills the first group; a local model the second (a remote server cannot know
    them: `unknown_remotely` says so), the engine over it the third, a remote backend the fourth."""

    name: str
    family: str
    precision: str  # a level's label (FP32, BF16, INT4 ...) or the remote backend's "as served"
    device: str  # cpu, cuda:0 ... or a remote server's host
    source: str  # the model's path, or a remote server's base URL
    backend: str = "local"  # "local" or "remote"
    max_context: int | None = None  # the most tokens (prompt and reply) the model takes, where known
    # The model's sampling defaults with their sources (sampling_defaults.model_defaults / server_defaults)
    sampling_defaults: dict | None = field(default=None, compare=False, hash=False)
    reasoning: bool = False  # thinks in <think>...</think> (GLM-Z1, GLM-4.5+)
    thinking_switch: bool = False  # its chat template can skip the thinking (enable_thinking)
    # ---- a model loaded in this process
    weights_bytes: int | None = None
    quantized_weights_bytes: int | None = None
    kv_bytes_per_token: int | None = None
    parameters: int | None = None
    active_parameters: int | None = None  # a MoE model's parameters per token (all of them for a dense model)
    load_seconds: float | None = None
    loader: str | None = None  # models.loading.STREAMED, or why from_pretrained read it
    family_source: str | None = None  # how the ChatGLM generation was decided
    checkpoint: str | None = None  # what was special about the checkpoint (pre-quantized by THUDM)
    precision_source: str | None = None  # why "auto" chose the level it did
    kernel: str | None = None  # INT4 on a CPU: whose kernel its layers use, and the timing that chose it
    # ---- the local engine over it
    max_batch: int | None = None
    batched_decode: bool | None = None
    fast_path: str | None = None  # off | compiling | ready | failed: reason
    fast_path_scope: str | None = None
    # ---- a remote OpenAI-compatible server
    server: str | None = None
    unknown_remotely: str | None = None
    status: str | None = None  # reachable, or why not; None: not asked yet

    @property
    def remote(self) -> bool:
        return self.backend == "remote"

    def to_dict(self) -> dict:
        """The card as JSON (what is not known left out), for the CLI's templates, logs and reports."""
        return {name: value for name, value in asdict(self).items() if value is not None}


@dataclass(frozen=True)
class MemoryReport:
    """What a model in this process holds, in bytes: the device's figure (the CUDA allocator, or the process's RSS
    on a CPU, shared by every local model), its kept KV caches and the running batch's cache."""

    source: str  # "CUDA allocator" or "process RSS"
    current: int
    peak: int
    kv_cache_bytes: int
    kv_cache_conversations: int
    kv_cache_budget_bytes: int
    batch_kv_bytes: int
    reserved: int | None = None  # the CUDA allocator's, its cache included

    def own_bytes(self, weights_bytes: int) -> int:
        """This model's own part of the device's figure: its weights and its caches."""
        return weights_bytes + self.kv_cache_bytes + self.batch_kv_bytes


@dataclass(frozen=True)
class LoadReport:
    """How busy a backend is: sequences running and requests waiting (a remote server's own figures where its
    /metrics says, else this portal's requests in flight), and the batch limit where one is known here."""

    running: int
    waiting: int
    max_batch: int | None
    in_flight_here: int | None = None  # a remote backend: this portal's requests in flight to the server
    # The local engine: tokens its decode steps have made since it started (two readings give its own rate, what
    # a client sees left out; scripts/bench_browsers.py reads them from /health).
    decoded_tokens: int | None = None

    def to_dict(self) -> dict:
        """The API's /health fields (in_flight_here only where the backend counts it)."""
        return {name: value for name, value in asdict(self).items() if value is not None or name == "max_batch"}


@runtime_checkable
class Backend(Protocol):
    """A model that generates replies: the local engine, or a remote OpenAI-compatible server."""

    capabilities: Capabilities
    spec: ModelSpec

    def submit(
        self,
        conversation_id: str,
        messages: Sequence[dict],
        params: SamplingParams | None = None,
        recompute: bool = False,
        owner: str | None = None,
        output: OutputSpec | None = None,
        prompt_ids: Sequence[int] | None = None,
    ) -> Request:
        """Queue a reply to `messages` (the whole conversation, ending with the new user message). `owner` (a
        workspace, an API key) bounds one person's share of the queue; QueueFull past it. `output`: tools, a
        forced call or JSON, logprobs (OutputSpec). `prompt_ids`: the context as this backend's encode_chat gave
        them (a Tokenizing backend feeds them as they are). Every backend takes it through SubmitPath.submit."""
        ...

    def forget(self, conversation_id: str) -> None:
        """Free what is kept for a conversation (new conversation, clear, delete)."""
        ...

    def card(self) -> ModelCard:
        """What the UI shows about the model (ModelCard)."""
        ...

    def memory_report(self) -> MemoryReport | None:
        """Memory figures: device memory and kept KV caches (None where the backend cannot know)."""
        ...

    def load_report(self) -> LoadReport:
        """Running sequences, waiting requests and the batch limit."""
        ...

    def close(self) -> None:
        """End queued and running requests and free what the backend holds."""
        ...


@runtime_checkable
class Tokenizing(Protocol):
    """A backend whose tokenizer is in this process (the local engine): what the API counts and shows of tokens.
    Routes ask `isinstance(backend, Tokenizing)`; a remote server counts its own."""

    def count_tokens(self, text: str) -> int: ...

    def encode_chat(
        self, messages: Sequence[dict], output: OutputSpec | None = None, thinking: bool | None = None
    ) -> list[int]:
        """The whole conversation's token ids in the model's chat format (with `output`'s tools, or its raw
        prompt, and the thinking switch), as the backend would feed them: pass them to submit as `prompt_ids`."""
        ...

    def tokenize(self, text: str) -> list[int]:
        """Plain text's token ids, no special tokens."""
        ...

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """The vocabulary's piece for each id."""
        ...

    def token_texts(self, ids: Sequence[int]) -> list[str]:
        """Each id decoded alone, as logprobs show tokens ("Ġthe" is " the")."""
        ...


@runtime_checkable
class LocalWorker(Tokenizing, Protocol):
    """A backend with the model in this process: work between its decode steps (embeddings), counted against one
    owner's share of it."""

    def run_on_worker(self, task: Callable, timeout: float | None = None):
        """Run `task(loaded_model)` on the worker thread between two iterations; its result or its exception."""
        ...

    def owner_share(self, owner: str | None):
        """A context manager: the work inside counts as one of `owner`'s running requests (QueueFull past it)."""
        ...
