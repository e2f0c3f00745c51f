"""Request and response bodies: OpenAI's chat completions, models and embeddings, and the seeds' own shapes
(ChatGLM's api.py, the stream API, the GLM API) with their exact field names."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..protocol import MAX_TOP_LOGPROBS, OutputSpec
from .errors import ApiError

MAX_STOP_STRINGS = 4  # as OpenAI's
MAX_STOP_CHARS = 256
MAX_ARGUMENT_CHARS = 64_000  # one tool call's arguments in the history

# ---- OpenAI ------------------------------------------------------------------------------------------------


class FunctionCallIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1, max_length=256)
    arguments: str = Field("{}", max_length=MAX_ARGUMENT_CHARS)


class ToolCallIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    reasoning_content: str | None = None  # an earlier reply's thinking (vLLM's name); the chat template decides
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None

    def plain(self) -> dict:
        """{"role", "content"} as the backend takes it: text parts joined; `developer` is OpenAI's new name for
        the system role; an assistant's tool_calls and a tool's result keep what identifies them."""
        role = "system" if self.role == "developer" else self.role
        message: dict[str, Any] = {"role": role, "content": self._text()}
        if role == "assistant" and self.reasoning_content:
            message["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            if role != "assistant":
                raise ApiError(400, "only an assistant message may carry tool_calls", param="messages")
            message["tool_calls"] = [
                {"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in self.tool_calls
            ]
        if role == "tool":
            message.update(tool_call_id=self.tool_call_id or "", name=self.name or "")
        return message

    def _text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        if self.content is None:
            if self.role == "assistant" and self.tool_calls:
                return ""
            raise ApiError(400, f"a {self.role} message needs text content", param="messages")
        texts = []
        for part in self.content:
            if part.get("type") not in ("text", "input_text", "output_text") or not isinstance(part.get("text"), str):
                raise ApiError(
                    400, f"only text content parts are supported, got {str(part.get('type'))[:40]!r}", param="messages"
                )
            texts.append(part["text"])
        return "".join(texts)


class StreamOptions(BaseModel):
    include_usage: bool = False


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def plain(self) -> dict:
        tool: dict[str, Any] = {"name": self.name, "description": self.description or ""}
        if self.parameters is not None:
            tool["parameters"] = self.parameters
        return tool


class ToolDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"] = "function"
    function: NamedFunction


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def schema_or_none(self) -> dict | None:
        """The schema the reply must match: any JSON object for json_object; None for text."""
        if self.type == "json_object":
            return {"type": "object"}
        if self.type == "json_schema":
            if self.json_schema is None:
                raise ApiError(400, "response_format json_schema needs its json_schema", param="response_format")
            return self.json_schema.schema_ or {"type": "object"}
        return None


ToolChoice = Literal["auto", "none", "required"] | NamedToolChoice


def output_spec(
    tools: list[ToolDefinition] | None,
    tool_choice: ToolChoice | None,
    parallel_tool_calls: bool | None,
    response_format: ResponseFormat | None,
    top_logprobs: int | None,
) -> OutputSpec:
    """What the request asks of the reply beyond sampling, checked (a bad combination is a 400 naming the field)."""
    chosen = tool_choice if tool_choice is not None else "auto"
    choice = chosen.function.name if isinstance(chosen, NamedToolChoice) else chosen
    spec = OutputSpec(
        tools=[t.function.plain() for t in tools or []],
        tool_choice=choice if tools else "auto",
        parallel_tool_calls=parallel_tool_calls is not False,
        json_schema=response_format.schema_or_none() if response_format else None,
        top_logprobs=top_logprobs,
    )
    if tool_choice not in (None, "auto", "none") and not tools:
        raise ApiError(400, "tool_choice asks for a call but no tools were given", param="tool_choice")
    try:
        return spec.validate()
    except ValueError as exc:
        param = "tool_choice" if "tool_choice" in str(exc) else "tools"
        raise ApiError(400, str(exc), param=param) from None


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "example": {
                "model": "SmolLM2-135M-Instruct",
                "messages": [{"role": "user", "content": "Hello!"}],
                "max_tokens": 64,
            }
        },
    )

    model: str = Field(
        description="required, as in OpenAI's API; any name is accepted and the reply names the loaded model"
    )
    messages: list[ChatMessageIn] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2, description="0 is greedy; default: the model's (/v1/models)")
    top_p: float | None = Field(None, gt=0, le=1, description="default: the model's (/v1/models)")
    top_k: int | None = Field(None, ge=0, description="extension; 0 is off")
    repetition_penalty: float | None = Field(None, gt=0, le=100, description="extension; 1.0 is off")
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens")
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[ToolDefinition] | None = Field(None, max_length=128)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description='extension (vLLM\'s): {"enable_thinking": false} asks a reasoning model to answer at once'
    )

    def thinking(self) -> bool | None:
        """chat_template_kwargs.enable_thinking: None when not given (the template's default)."""
        value = (self.chat_template_kwargs or {}).get("enable_thinking")
        if value is not None and not isinstance(value, bool):
            raise ApiError(
                400, "chat_template_kwargs.enable_thinking must be true or false", param="chat_template_kwargs"
            )
        return value

    def stop_strings(self) -> list[str]:
        return checked_stops(self.stop)

    def output(self) -> OutputSpec:
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return output_spec(
            self.tools,
            self.tool_choice,
            self.parallel_tool_calls,
            self.response_format,
            (self.top_logprobs or 0) if self.logprobs else None,
        )


def checked_stops(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise ApiError(400, f"at most {MAX_STOP_STRINGS} stop strings", param="stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise ApiError(400, f"a stop string has at most {MAX_STOP_CHARS} characters", param="stop")
    return [s for s in stops if s]


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="prompt tokens taken from the kept KV cache")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


# The reply's shapes follow OpenAI's (the `openai` package's ChatCompletion and ChatCompletionChunk): fields the
# spec requires but this server never fills are sent as OpenAI sends them (refusal and logprobs null, no
# annotations), since strict clients and checkers reject a reply without them.
FinishReason = Literal["stop", "length", "tool_calls"]


class FunctionCallOut(BaseModel):
    name: str
    arguments: str = Field(description="JSON text, as the model wrote it")


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None = None
    refusal: None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = Field(None, description="a reasoning model's thinking (vLLM's field); else null")
    refusal: None = Field(None, description="always null: a refusal here is ordinary content")
    annotations: list[dict[str, Any]] = Field(default_factory=list, description="always empty (no web search)")
    # Left out when there are none (OpenAI's schema allows no null here).
    tool_calls: list[ToolCallOut] | None = Field(None, exclude_if=lambda calls: calls is None)


class Choice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    finish_reason: FinishReason
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str = Field(description="changes when the model, its precision or its device does")
    choices: list[Choice]
    usage: Usage


class ChunkFunction(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ChunkToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: ChunkFunction


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    refusal: None = None
    tool_calls: list[ChunkToolCall] | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed reply: the first delta names the role, then text deltas, then an empty
    delta with finish_reason; with stream_options.include_usage every chunk has `usage` (null), and a last chunk
    with no choices carries it."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "glm-dashboard"
    # An extension: what an omitted sampling field becomes (the model's generation_config.json, its family's
    # documented values, its card, ours) and where each value came from.
    defaults: dict | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


# ---- the seeds ---------------------------------------------------------------------------------------------

History = list[list[str]] | None


def history_messages(history: History) -> list[dict]:
    """[[question, answer], ...] as messages. A flat [q, a, q, a] inside one list (what the GLM API's TypeScript
    client sends) is read as pairs too."""
    messages = []
    for item in history or []:
        if len(item) % 2:
            raise ApiError(400, "each history item must be a [question, answer] pair", param="history")
        for question, answer in zip(item[::2], item[1::2]):
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages


def history_pairs(history: History) -> list[list[str]]:
    messages = history_messages(history)
    return [[q["content"], a["content"]] for q, a in zip(messages[::2], messages[1::2])]


class ChatGLMRequest(BaseModel):
    """ChatGLM's api.py (`POST /`). Its defaults: max_length 2048, top_p 0.7, temperature 0.95."""

    model_config = ConfigDict(json_schema_extra={"example": {"prompt": "你好", "history": []}})

    prompt: str
    history: History = None
    max_length: int | None = Field(None, ge=2)
    top_p: float | None = Field(None, ge=0, le=1, description="0 means the default, as in the original")
    temperature: float | None = Field(None, ge=0, le=100, description="unlike the original, 0 means greedy")


class ChatGLMResponse(BaseModel):
    response: str
    history: list[list[str]]
    status: int = 200
    time: str = Field(description="YYYY-mm-dd HH:MM:SS")


class StreamApiRequest(BaseModel):
    """The stream API's `/chat` and `/stream` (the model's own defaults)."""

    model_config = ConfigDict(json_schema_extra={"example": {"query": "你好", "history": []}})

    query: str
    history: History = None


class GlmApiRequest(BaseModel):
    """The GLM API's `/chat` and `/chat-stream`. Its defaults: max_length 4096, top_p 0.7, temperature 0.95."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "prompt": "蓝牙耳机坏了我应该去医院看什么科？",
                "history": [],
                "max_length": 4096,
                "top_p": 0.5,
                "temperature": 1,
            }
        }
    )

    prompt: str
    history: History = None
    max_length: int | None = Field(None, ge=2)
    top_p: float | None = Field(None, ge=0, le=1, description="0 means the default, as in the original")
    temperature: float | None = Field(None, ge=0, le=100)


class StreamApiChatResponse(BaseModel):
    query: str
    response: str
    history: list[list[str]]
    success: bool


class GlmApiChatResponse(BaseModel):
    content: str
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    model: str
    object: Literal["chat.completion"] = "chat.completion"


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {"prompt": "如果给你一个机会，你会想逃离你所在的虚拟世界吗？", "max_length": 4096}
        }
    )

    prompt: str
    max_length: int | None = Field(None, ge=1, description="ids past this are cut (default 4096)")


class TokenizeResponse(BaseModel):
    tokenIds: list[int]  # noqa: N815 (the seed's field name)
    tokens: list[str]


class SeedEmbeddingRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"example": {"prompt": ["hello world", "hello GPT"]}})

    prompt: list[str] | str


class SeedEmbeddingResponse(BaseModel):
    data: list[list[float]]
    model: str
    object: Literal["embedding"] = "embedding"
