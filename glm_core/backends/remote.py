"""A backend over any OpenAI-compatible server (vLLM, SGLang, llama.cpp's server, Ollama, this project's `serve`).

The model spec is a URL: `http(s)://host:port/v1`, optionally `#model-id` (without it, the server's first model);
the API key comes from the backend's configuration or GLM_REMOTE_API_KEY, never from the spec, so it is never
shown or stored with a conversation. Each request streams one chat completion; the whole history is sent every
time (regenerate and edit just send a shorter one), and the kept KV cache is the server's business (vLLM prefix
caching, SGLang radix cache). Stop closes the HTTP stream: vLLM, SGLang and llama.cpp abort a request whose client
went away. An API client that takes its reply whole (not streamed) has it asked for whole too (`OutputSpec.whole`:
llama.cpp refuses logprobs with tools in a stream); such a request ends when the server answers.

Torch-free: the portal can front servers without a local model.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from types import SimpleNamespace
from urllib.parse import urlsplit, urlunsplit

from ..protocol import (
    REJECTED,
    UNAVAILABLE,
    UPSTREAM,
    Capabilities,
    LoadReport,
    ModelCard,
    ModelSpec,
    OutputSpec,
    Reply,
    ReplyStats,
    Request,
    Started,
    SubmitPath,
    TokenLogprob,
    ToolCallDelta,
)
from ..reasoning import CLOSE as REASONING_CLOSE
from ..reasoning import OPEN as REASONING_OPEN
from ..sampling_defaults import server_defaults

log = logging.getLogger(__name__)

REMOTE_PRECISION = "remote"  # what a reply records as its precision: the server's choice, unknown here
KEY_ENV = "GLM_REMOTE_API_KEY"
CONNECT_TIMEOUT_S = 5.0
# Between two streamed chunks (and for the first one, which waits for the server's queue and prefill).
READ_TIMEOUT_S = float(os.environ.get("GLM_REMOTE_TIMEOUT_S") or 120)
INFO_TTL_S = 30.0  # how long the server's model list and metrics are reused before asking again
LLAMA_CPP = "llamacpp"  # llama-server's `owned_by` in /v1/models
UNKNOWN_REMOTELY = (
    "precision and quantization, weights and device memory, the kept KV cache: the server's own; "
    "see its metrics or logs"
)


def is_remote(path: str) -> bool:
    return path.strip().lower().startswith(("http://", "https://"))


@dataclass(frozen=True)
class RemoteTarget:
    base_url: str  # ends with /v1 (or whatever path the server's OpenAI routes live under)
    model: str  # "" = the server's first model

    @property
    def host(self) -> str:
        return urlsplit(self.base_url).netloc

    @property
    def server_root(self) -> str:
        """The URL without its API path: where vLLM and SGLang serve /metrics and /health."""
        parts = urlsplit(self.base_url)
        path = re.sub(r"/v1/?$", "", parts.path)
        return urlunsplit((parts.scheme, parts.netloc, path, "", "")).rstrip("/")

    @property
    def spec_path(self) -> str:
        return f"{self.base_url}#{self.model}" if self.model else self.base_url


def parse_target(path: str) -> RemoteTarget:
    """`http(s)://host:port[/path][#model]`; a URL without a path gets `/v1`. Raises ValueError with a reason."""
    text = path.strip()
    if not is_remote(text):
        raise ValueError(f"a remote model is an http:// or https:// URL, got {text!r:.80}")
    parts = urlsplit(text)
    if not parts.hostname:
        raise ValueError(f"no host in {text!r:.80}")
    if parts.username or parts.password:
        raise ValueError("put the API key in the backend's key setting or GLM_REMOTE_API_KEY, not in the URL")
    if parts.query:
        raise ValueError("a remote model URL takes no query string; name the model after '#'")
    try:
        parts.port  # noqa: B018 (raises on a malformed port)
    except ValueError as exc:
        raise ValueError(f"bad port in {text!r:.80}") from exc
    api_path = parts.path.rstrip("/") or "/v1"
    base_url = urlunsplit((parts.scheme.lower(), parts.netloc, api_path, "", ""))
    return RemoteTarget(base_url, parts.fragment.strip())


def remote_spec(path: str) -> ModelSpec:
    """The ModelSpec of a remote model, normalised (precision and device are the server's)."""
    return ModelSpec(path=parse_target(path).spec_path, precision=REMOTE_PRECISION, device="remote")


# ---- Prometheus /metrics (vLLM, SGLang) -----------------------------------------------------------------------

# Metric names by server and version; the first present wins. vLLM renamed gpu_cache_usage_perc to
# kv_cache_usage_perc in V1; SGLang reports token_usage (KV pool used, 0..1).
_METRICS = {
    "kv_cache_usage": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "sglang:token_usage"),
    "running": ("vllm:num_requests_running", "sglang:num_running_reqs", "llamacpp:requests_processing"),
    "waiting": ("vllm:num_requests_waiting", "sglang:num_queue_reqs", "llamacpp:requests_deferred"),
    "prefix_cache_hit_rate": ("vllm:gpu_prefix_cache_hit_rate", "sglang:cache_hit_rate"),
}
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([^\s]+)")


def parse_prometheus(text: str, model: str | None = None) -> dict[str, float]:
    """The figures the GPU monitor shows, from a Prometheus text exposition. Samples of the same metric are
    summed over label sets (several models or engines); with `model`, only samples labelled with it (or with no
    model label) count."""
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if not match:
            continue
        name, labels, value = match.groups()
        if model and labels and "model_name=" in labels and f'model_name="{model}"' not in labels:
            continue
        try:
            number = float(value)
        except ValueError:
            continue
        sums[name] = sums.get(name, 0.0) + number
    figures = {}
    for key, names in _METRICS.items():
        for name in names:
            if name in sums:
                figures[key] = sums[name]
                figures[f"{key}_metric"] = name
                break
    return {k: v for k, v in figures.items() if not k.endswith("_metric")}


# ---- errors, each one line -------------------------------------------------------------------------------------


def describe_error(exc: BaseException, target: RemoteTarget, model: str, mid_reply: bool = False) -> str:
    """One line for the UI and the CLI: what went wrong with which server."""
    import openai

    where = target.host
    status = getattr(exc, "status_code", None)
    detail = _server_message(exc)
    if isinstance(exc, openai.APITimeoutError):
        return f"{where} did not answer within {READ_TIMEOUT_S:.0f} s" + (
            " (the reply so far is kept)" if mid_reply else ""
        )
    if isinstance(exc, openai.APIConnectionError) or (mid_reply and status is None):
        cause = _root_cause(exc)
        if mid_reply:
            return f"the connection to {where} was lost in the middle of the reply ({cause}); the reply so far is kept"
        return f"cannot reach the server at {where} ({cause})"
    if status == 401:
        return f"{where} refused the API key (401 unauthorized): set the backend's key or {KEY_ENV}"
    if status == 403:
        return f"{where} does not allow this (403 forbidden){detail}"
    if status == 404:
        return f"{where} has no model {model!r} (404){detail}"
    if status == 429:
        return f"{where} is busy (429 too many requests); try again shortly{detail}"
    if status is not None and status >= 500:
        return f"{where} failed (HTTP {status}){detail}"
    if status is not None:
        return f"{where} rejected the request (HTTP {status}){detail}"
    return f"{where}: {type(exc).__name__}{detail or ': ' + _one_line(str(exc))}"


def _server_message(exc: BaseException) -> str:
    body = getattr(exc, "body", None)
    message = None
    if isinstance(body, dict):
        inner = body.get("error", body)
        message = inner.get("message") if isinstance(inner, dict) else inner if isinstance(inner, str) else None
        message = message or body.get("message") or body.get("detail")
    elif isinstance(body, str):
        message = body
    if not message:
        message = getattr(exc, "message", None)
    return f": {_one_line(str(message))}" if message else ""


def _root_cause(exc: BaseException) -> str:
    seen = exc
    while seen.__cause__ is not None or seen.__context__ is not None:
        seen = seen.__cause__ or seen.__context__
    text = _one_line(str(seen)) or type(seen).__name__
    if "refused" in text.lower():
        return "connection refused"
    return text


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---- what is relayed ---------------------------------------------------------------------------------------------


def _message_out(message: dict) -> dict:
    """A message in OpenAI's shape: role and content, an assistant's tool_calls and a tool result's call id (an
    earlier reply's reasoning_content is this app's and vLLM's, not every server's: left out)."""
    out: dict = {"role": message["role"], "content": message["content"]}
    if message.get("tool_calls"):
        out["tool_calls"] = [
            {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for c in message["tool_calls"]
        ]
    if message["role"] == "tool":
        out["tool_call_id"] = message.get("tool_call_id") or ""
    return out


def _output_fields(output: OutputSpec) -> dict:
    """OpenAI's fields for what `output` asks beyond plain text; nothing for the default."""
    fields: dict = {}
    if output.tools:
        fields["tools"] = [{"type": "function", "function": tool} for tool in output.tools]
        choice = output.tool_choice
        named = choice not in ("auto", "none", "required")
        fields["tool_choice"] = {"type": "function", "function": {"name": choice}} if named else choice
        fields["parallel_tool_calls"] = output.parallel_tool_calls
    if output.json_schema is not None:
        if output.json_schema == {"type": "object"}:  # json_object (or a json_schema without one)
            fields["response_format"] = {"type": "json_object"}
        else:
            wrapped = {"name": "response", "schema": output.json_schema, "strict": True}
            fields["response_format"] = {"type": "json_schema", "json_schema": wrapped}
    if output.top_logprobs is not None:
        fields["logprobs"] = True
        fields["top_logprobs"] = output.top_logprobs
    return fields


def _as_chunk(answer) -> SimpleNamespace:
    """A whole chat completion read as the one chunk of a stream: each choice's message as its delta."""
    choices = [
        SimpleNamespace(delta=c.message, finish_reason=c.finish_reason, logprobs=c.logprobs) for c in answer.choices
    ]
    return SimpleNamespace(usage=answer.usage, choices=choices)


def _error_kind(exc: BaseException, mid_reply: bool) -> str:
    """What a failed relayed request means to the client: the server busy (try again), the request refused as
    asked (the server's 400, 413 or 422: the client's to change), or the server failing (anything else)."""
    status = getattr(exc, "status_code", None)
    if status in (429, 503) or "out of memory" in str(exc).lower():
        return UNAVAILABLE
    if status in (400, 413, 422) and not mid_reply:
        return REJECTED
    return UPSTREAM


# ---- the backend -----------------------------------------------------------------------------------------------


class RemoteBackend(SubmitPath):
    """Chat completions streamed from one model of an OpenAI-compatible server, behind the Backend protocol."""

    closed_reason = "this remote backend was removed just now"

    capabilities = Capabilities()  # nothing local: no memory figures, no kept cache here, no tokenizer

    def __init__(
        self, spec: ModelSpec | str, api_key: str | None = None, name: str | None = None, timeout_s: float | None = None
    ):
        import openai

        path = spec.path if isinstance(spec, ModelSpec) else spec
        self.target = parse_target(path)
        self.spec = remote_spec(path)
        self.name = name or self.target.model or self.target.host
        # Only the key given with this URL (configuration decides which: backends/config.py); never one from the
        # environment for a URL someone typed. "EMPTY" is vLLM's convention for "no key".
        self._key = api_key or "EMPTY"
        self._timeout = timeout_s or READ_TIMEOUT_S
        # No retries: a stream must not be resent behind the user's back; a failed request is shown and can be sent
        # again. A new connection per request means a server that comes back is used again without a restart.
        self._client = openai.OpenAI(
            base_url=self.target.base_url,
            api_key=self._key,
            max_retries=0,
            timeout=openai.Timeout(self._timeout, connect=CONNECT_TIMEOUT_S),
        )
        self._lock = threading.Lock()
        self._door = self._lock  # SubmitPath's
        self._active: dict[str, Request] = {}
        self._closed = False
        self._models: list[dict] | None = None  # the server's /v1/models answer, cached
        self._models_at = 0.0
        self._models_error: str | None = None
        self._kind_asked = False
        self._metrics: dict | None = None
        self._metrics_at = 0.0

    # ---- the Backend surface -------------------------------------------------------------------------------

    # submit: SubmitPath's. `recompute` cannot be honoured remotely (the server's cache is its own) and `owner` is
    # the server's business (its own limits answer 429).

    def _accept(self, request: Request) -> None:
        """`output`'s tools, tool_choice, parallel_tool_calls, JSON schema and logprobs are relayed as OpenAI's
        fields: the server decodes under its own grammar and reads its own calls, which come back as ToolCallDelta
        events and the reply's tool_calls. A raw prompt (the legacy completions route) is not relayed: refused."""
        if request.output.raw_prompt:
            raise ValueError("/v1/completions is not relayed to a remote backend: use /v1/chat/completions")

    def _enqueue(self, request: Request, owner: str | None) -> None:
        """Nothing waits here: the server queues (or refuses) it itself."""

    def _started(self, request: Request) -> None:
        threading.Thread(target=self._run, args=(request,), name=f"glm-remote-{request.id}", daemon=True).start()

    def forget(self, conversation_id: str) -> None:
        """Nothing is kept here; the server evicts its own prefix cache."""

    def card(self) -> ModelCard:
        """Which server and model, and what cannot be known from here. Never blocks on the network: the server's
        model list is fetched in the background and shown once known."""
        self._refresh_models_in_background()
        info = self._model_info()
        context = info.get("max_model_len") or (info.get("meta") or {}).get("n_ctx")  # vLLM; llama.cpp's slot
        return ModelCard(
            name=self.model_id or "(the server's first model)",
            family=info.get("owned_by") and f"remote ({info['owned_by']})" or "remote",
            precision=REMOTE_PRECISION,
            device=self.target.host,
            source=self.target.base_url,
            backend="remote",
            max_context=int(context) if context else None,
            sampling_defaults=server_defaults(self.target.host, info.get("defaults")),
            server=self.target.host,
            unknown_remotely=UNKNOWN_REMOTELY,
            status=self._models_error or ("reachable" if self._models is not None else None),
        )

    def memory_report(self) -> None:
        """None: the server's memory is measured on the server (its /metrics, where it has one)."""
        return None

    def load_report(self) -> LoadReport:
        """This portal's requests in flight; the server's own running and waiting counts when its /metrics says
        (vLLM, SGLang), else None. There is no batch limit known here."""
        with self._lock:
            here = len(self._active)
        metrics = self.metrics(wait=False) or {}
        return LoadReport(
            running=int(metrics["running"]) if "running" in metrics else here,
            waiting=int(metrics["waiting"]) if "waiting" in metrics else 0,
            max_batch=None,
            in_flight_here=here,
        )

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pending = list(self._active.values())
        for request in pending:
            request.stop()
        for request in pending:
            request.wait(timeout=10)
        self._client.close()

    # ---- what the server says about itself ------------------------------------------------------------------

    @property
    def model_id(self) -> str:
        if self.target.model:
            return self.target.model
        models = self._models or []
        return str(models[0].get("id", "")) if models else ""

    def list_models(self, timeout_s: float = 3.0) -> list[dict]:
        """The server's /v1/models entries (raises the client's error when the server cannot be asked)."""
        page = self._client.with_options(timeout=timeout_s).models.list()
        models = [m.model_dump() if hasattr(m, "model_dump") else dict(m) for m in page.data]
        with self._lock:
            self._models, self._models_at, self._models_error = models, time.monotonic(), None
        return models

    def _server_kind(self) -> str:
        """Who serves the model, from its /v1/models `owned_by` ("llamacpp", "vllm", "sglang", ...); "" when not
        known. Asked once, on the first request, when the card has not asked yet (the card's refresh keeps it
        current); while a server does not answer /v1/models it is treated as plain OpenAI."""
        if self._models is None and not self._kind_asked:
            self._kind_asked = True
            try:
                self.list_models(timeout_s=CONNECT_TIMEOUT_S)
            except Exception:  # noqa: BLE001 (the chat request itself reports what is wrong with the server)
                return ""
        info = self._model_info() or next(iter(self._models or []), {})  # one server, one engine
        return str(info.get("owned_by") or "")

    def _model_info(self) -> dict:
        models = self._models or []
        wanted = self.model_id
        return next((m for m in models if m.get("id") == wanted), {})

    def _refresh_models_in_background(self) -> None:
        if time.monotonic() - self._models_at < INFO_TTL_S:
            return
        self._models_at = time.monotonic()  # one refresh at a time
        threading.Thread(target=self._refresh_models, daemon=True, name="glm-remote-models").start()

    def _refresh_models(self) -> None:
        import openai

        try:
            if not self._closed:
                self.list_models()
        except openai.OpenAIError as exc:
            self._models_error = describe_error(exc, self.target, self.model_id)
        except Exception as exc:  # noqa: BLE001 (closed meanwhile, or an answer that is no model list)
            self._models_error = f"{self.target.host}: {_one_line(str(exc)) or type(exc).__name__}"

    def metrics(self, max_age_s: float = 2.0, wait: bool = True) -> dict | None:
        """The server's Prometheus figures (KV-cache usage 0..1, running, waiting) when it serves /metrics;
        None when it does not or cannot be reached. Cached for `max_age_s`; with `wait=False`, the cached figures
        at once and a refresh in the background (a page redraw never waits on a slow server)."""
        now = time.monotonic()
        if now - self._metrics_at < max_age_s:
            return self._metrics
        self._metrics_at = now
        if not wait:
            threading.Thread(target=self._fetch_metrics, daemon=True, name="glm-remote-metrics").start()
            return self._metrics
        return self._fetch_metrics()

    def _fetch_metrics(self) -> dict | None:
        request = urllib.request.Request(
            f"{self.target.server_root}/metrics", headers={"Authorization": f"Bearer {self._key}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                text = response.read(8 * 2**20).decode("utf-8", "replace")
        except (urllib.error.URLError, OSError, ValueError):
            self._metrics = None
            return None
        figures = parse_prometheus(text, self.model_id or None)
        self._metrics = figures or None
        return self._metrics

    # ---- one request, on its own thread ---------------------------------------------------------------------

    def _body(self, request: Request, model: str) -> dict:
        """The request as the server takes it: only the controls the person or the client set (the server applies
        its own defaults to the others, as a client talking to it directly would get)."""
        p = request.params
        sent = {
            control: getattr(p, control)
            for control in ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty")
            if p.is_explicit(control)
        }
        messages = [_message_out(m) for m in request.messages]
        body = dict(model=model, messages=messages, stream=True, stream_options={"include_usage": True})
        body.update(_output_fields(request.output))
        if "max_new_tokens" in sent:
            body["max_tokens"] = sent.pop("max_new_tokens")
        for name in ("temperature", "top_p"):
            if name in sent:
                body[name] = sent.pop(name)
        if "repetition_penalty" in sent and self._server_kind() == LLAMA_CPP:
            sent["repeat_penalty"] = sent.pop("repetition_penalty")  # llama.cpp ignores `repetition_penalty`
        if p.seed is not None:
            body["seed"] = p.seed
        if p.thinking is not None:  # the conversation's thinking switch, as vLLM and SGLang take it
            sent["chat_template_kwargs"] = {"enable_thinking": p.thinking}
        if sent:  # top_k and repetition_penalty: vLLM, SGLang and llama.cpp accept them outside the OpenAI schema
            body["extra_body"] = sent
        return body

    def _run(self, request: Request) -> None:
        import openai

        started = time.perf_counter()
        stats = ReplyStats(queue_s=0.0)
        finish_reason, error, error_kind, stream = "", None, None, None
        first_at = last_at = None
        chunks = 0
        calls: dict[int, dict] = {}  # the server's tool calls by index, as their deltas arrive
        thinking = False  # inside a reasoning server's thinking
        watcher_done = threading.Event()
        holder: dict = {}

        def close_on_stop() -> None:
            # Stop must work while the server is silent too (queued, prefilling): closing the response from here
            # makes the reading thread's next read fail, and the server sees its client go away.
            while not watcher_done.wait(0.05):
                if request.stop_requested and holder.get("stream") is not None:
                    holder["stream"].close()
                    return

        watcher = threading.Thread(target=close_on_stop, daemon=True, name=f"glm-remote-stop-{request.id}")
        watcher.start()
        model = self.target.model
        try:
            if not model:
                model = self.model_id or (self.list_models(timeout_s=CONNECT_TIMEOUT_S) and self.model_id)
                if not model:
                    raise RuntimeError(f"{self.target.host} lists no model")
            if request.stop_requested:
                finish_reason = "stopped"
            else:
                body = self._body(request, model)
                if request.output.whole:  # the client takes it whole: so does this request (one chunk)
                    del body["stream"], body["stream_options"]
                    chunks_read = [_as_chunk(self._client.chat.completions.create(**body))]
                else:
                    stream = self._client.chat.completions.create(**body)
                    holder["stream"] = stream
                    chunks_read = stream
                request.emit(Started())
                for chunk in chunks_read:
                    if request.stop_requested:
                        finish_reason = "stopped"
                        break
                    if chunk.usage is not None:
                        stats.prompt_tokens = chunk.usage.prompt_tokens or 0
                        stats.completion_tokens = chunk.usage.completion_tokens or 0
                        cached = getattr(chunk.usage, "prompt_tokens_details", None)
                        stats.reused_tokens = (getattr(cached, "cached_tokens", None) or 0) if cached else 0
                    for choice in chunk.choices or []:
                        delta = choice.delta
                        self._relay_logprobs(request, choice.logprobs)
                        if delta is not None and delta.tool_calls:
                            self._relay_calls(request, delta.tool_calls, calls)
                            first_at = first_at or time.perf_counter()
                            last_at = time.perf_counter()
                            chunks += 1
                        content = delta.content if delta is not None else None
                        # A reasoning server's thinking (vLLM: reasoning_content; newer ones: reasoning) goes into
                        # the reply's text inside <think>...</think>, the form the store and the page read.
                        thought = getattr(delta, "reasoning_content", None) or getattr(delta, "reasoning", None)
                        text = ""
                        if isinstance(thought, str) and thought:
                            text, thinking = ("" if thinking else REASONING_OPEN) + thought, True
                        if content:
                            if thinking:
                                text, thinking = text + REASONING_CLOSE + "\n", False
                            text += content
                        if text:
                            now = time.perf_counter()
                            first_at = first_at or now
                            last_at = now
                            chunks += 1
                            request.emit_text(text)
                        if choice.finish_reason:
                            finish_reason = {"stop": "eos", "length": "length"}.get(
                                choice.finish_reason, choice.finish_reason
                            )
                if not finish_reason:
                    if not request.stop_requested:
                        # Every OpenAI-compatible server ends a finished choice with its finish_reason; a stream that
                        # ends without one was cut (the server died, a proxy timed out).
                        raise ConnectionError("the stream ended before the reply was finished")
                    finish_reason = "stopped"
        except Exception as exc:  # noqa: BLE001 (every failure becomes the reply's one-line error)
            if request.stop_requested:
                finish_reason = "stopped"  # closing the stream on stop makes the read fail: that is the stop
            else:
                finish_reason = "error"
                # a server that is busy or out of memory says so by its status; try again later
                error_kind = _error_kind(exc, mid_reply=chunks > 0)
                if isinstance(exc, openai.OpenAIError):
                    error = describe_error(exc, self.target, model or self.model_id, mid_reply=chunks > 0)
                else:
                    where = self.target.host
                    error = (
                        f"the connection to {where} was lost in the middle of the reply "
                        f"({_root_cause(exc)}); the reply so far is kept"
                        if chunks
                        else f"{where}: {_one_line(str(exc)) or type(exc).__name__}"
                    )
                error = error.replace(self._key, "***") if self._key != "EMPTY" else error
                log.warning("remote request %s to %s failed: %s", request.id, self.target.host, error)
        finally:
            watcher_done.set()
            if stream is not None:
                stream.close()  # on stop: the server sees the client go away and aborts the request
            end = time.perf_counter()
            stats.total_s = end - started
            if first_at is not None:
                stats.ttft_s = first_at - started
                counted = stats.completion_tokens or chunks
                if last_at > first_at and counted > 1:
                    stats.decode_tokens_per_s = (counted - 1) / (last_at - first_at)
            if not stats.completion_tokens:
                stats.completion_tokens = chunks  # a server without usage: chunks are about tokens
            stats.prefill_tokens = max(stats.prompt_tokens - stats.reused_tokens, 0)
            with self._lock:
                self._active.pop(request.conversation_id, None)
            request.finish(
                Reply(
                    text=request.text_so_far,
                    finish_reason=finish_reason,
                    stats=stats,
                    error=error,
                    error_kind=error_kind,
                    tool_calls=[calls[index] for index in sorted(calls)] if finish_reason != "error" else [],
                )
            )

    @staticmethod
    def _relay_logprobs(request: Request, logprobs) -> None:
        """A chunk's per-token logprobs (OpenAI's choice.logprobs.content), as the server computed them."""
        for token in getattr(logprobs, "content", None) or []:
            top = [(alternative.token, alternative.logprob) for alternative in token.top_logprobs or []]
            request.emit(TokenLogprob(token.token, token.logprob, top))

    @staticmethod
    def _relay_calls(request: Request, deltas, calls: dict[int, dict]) -> None:
        """The server's tool-call deltas, passed on as they come and gathered into whole calls by index."""
        for delta in deltas:
            index = getattr(delta, "index", None)  # a whole reply's calls have none: their order is their index
            index = index if index is not None else len(calls)
            function = delta.function
            name = function.name if function is not None else None
            arguments = (function.arguments if function is not None else None) or ""
            call = calls.setdefault(index, {"id": "", "name": "", "arguments": ""})
            call["id"] = delta.id or call["id"]
            call["name"] = name or call["name"]  # sent once (OpenAI, vLLM, llama.cpp); a repeat is the whole name
            call["arguments"] += arguments
            request.emit(ToolCallDelta(index, delta.id, name, arguments))
