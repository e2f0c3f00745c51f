"""Tool calls as every layer shares them, free of torch: a list of tools (OpenAI function definitions) checked as
typed on the chat page or read from a file, an assistant's calls read back from its reply in the model's own format
(the family's `ToolSyntax`, which the backend exposes as `tool_syntax`), and a reply's text streamed without the
part that may still turn out to be a call. The API's routes and the chat page's turns both use these.

A tool here is {"name", "description", "parameters"}; a call {"id", "name", "arguments"} with the arguments as the
JSON text the model wrote (as OpenAI's API carries them).
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

TOOL_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")  # as the API's FunctionDefinition
MAX_TOOLS = 128  # as the API's tools list
MAX_TOOLS_CHARS = 64_000  # the JSON of a conversation's tools
MAX_RESULT_CHARS = 32_000  # one tool result typed on the page (as a prompt: MAX_PROMPT_CHARS)
TOOL_CHOICES = ("auto", "none", "required")

# A small set to try tools with (the weather example of THUDM's ChatGLM3 tool_using README, and a clock).
EXAMPLE_TOOLS: dict[str, list[dict]] = {
    "Weather and time": [
        {
            "type": "function",
            "function": {
                "name": "get_current_weather",
                "description": "Get the current weather in a given location",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
                        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                    },
                    "required": ["location"],
                },
            },
        },
        {
            "type": "function",
            "function": {
                "name": "get_time",
                "description": "The current date and time in a time zone",
                "parameters": {
                    "type": "object",
                    "properties": {"timezone": {"type": "string", "description": "An IANA zone, e.g. Europe/Paris"}},
                    "required": ["timezone"],
                },
            },
        },
    ],
}


class CallSyntax(Protocol):
    """What models.tool_formats.ToolSyntax offers (named here so this module needs no models import)."""

    name: str

    def parse(self, text: str, tools: Sequence[dict]) -> tuple[str, list[dict]]: ...

    def streamable(self, text: str, tools: Sequence[dict]) -> int: ...


def check_tools(value: Any, where: str = "tools") -> list[dict]:
    """OpenAI-style tools (`[{"type": "function", "function": {name, description, parameters}}, ...]`; a bare
    `{name, description, parameters}` is taken too) as plain tools, or ValueError naming the field that is wrong."""
    if not isinstance(value, list):
        raise ValueError(f"{where}: expected a list of function definitions, got {_kind(value)}")
    if len(value) > MAX_TOOLS:
        raise ValueError(f"{where}: {len(value)} tools; at most {MAX_TOOLS}")
    tools, names = [], set()
    for index, item in enumerate(value):
        here = f"{where}[{index}]"
        if not isinstance(item, dict):
            raise ValueError(f"{here}: expected a function definition object, got {_kind(item)}")
        if "function" in item or "type" in item:
            if item.get("type") != "function":
                raise ValueError(f'{here}.type: expected "function", got {str(item.get("type"))[:40]!r}')
            function, here = item.get("function"), f"{here}.function"
            if not isinstance(function, dict):
                raise ValueError(f"{here}: expected an object with name, description and parameters")
        else:
            function = item
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME_RE.fullmatch(name):
            raise ValueError(f"{here}.name: expected 1 to 64 letters, digits, _ . or -, got {str(name)[:70]!r}")
        if name in names:
            raise ValueError(f"{here}.name: {name!r} is given twice; tool names must be unique")
        names.add(name)
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise ValueError(f"{here}.description: expected text, got {_kind(description)}")
        tool: dict[str, Any] = {"name": name, "description": description or ""}
        parameters = function.get("parameters")
        if parameters is not None:
            if not isinstance(parameters, dict):
                raise ValueError(f"{here}.parameters: expected a JSON schema object, got {_kind(parameters)}")
            if parameters.get("type", "object") != "object":
                raise ValueError(f"{here}.parameters.type: a function's parameters are an object schema")
            properties = parameters.get("properties", {})
            if not isinstance(properties, dict):
                raise ValueError(f"{here}.parameters.properties: expected an object, got {_kind(properties)}")
            tool["parameters"] = parameters
        tools.append(tool)
    if len(json.dumps(tools, ensure_ascii=False)) > MAX_TOOLS_CHARS:
        raise ValueError(f"{where}: the tools take over {MAX_TOOLS_CHARS:,} characters")
    return tools


def parse_tools(text: str) -> list[dict]:
    """Tools as typed (a JSON list of function definitions; empty text: none), or ValueError saying what is
    wrong and where."""
    if not text.strip():
        return []
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"the tools are not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    return check_tools(value)


def openai_tools(tools: Iterable[dict]) -> list[dict]:
    """Plain tools in OpenAI's shape, as files and the tools box show them."""
    return [{"type": "function", "function": dict(tool)} for tool in tools]


def tools_text(tools: Iterable[dict]) -> str:
    tools = list(tools)
    return json.dumps(openai_tools(tools), ensure_ascii=False, indent=2) if tools else ""


def check_calls(value: Any, where: str = "tool_calls") -> list[dict]:
    """An assistant's calls, OpenAI-style (`{"id", "type": "function", "function": {"name", "arguments"}}`) or flat
    (`{"id", "name", "arguments"}`), as flat calls; ValueError naming the field that is wrong. Arguments must be
    JSON text of an object, as a model's call is read back."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: expected a non-empty list of calls, got {_kind(value)}")
    calls = []
    for index, item in enumerate(value):
        here = f"{where}[{index}]"
        if not isinstance(item, dict):
            raise ValueError(f"{here}: expected a call object, got {_kind(item)}")
        function, inner = (item.get("function"), f"{here}.function") if "function" in item else (item, here)
        if not isinstance(function, dict):
            raise ValueError(f"{inner}: expected an object with name and arguments, got {_kind(function)}")
        name, arguments, call_id = function.get("name"), function.get("arguments", "{}"), item.get("id", "")
        if not isinstance(name, str) or not TOOL_NAME_RE.fullmatch(name):
            raise ValueError(f"{inner}.name: expected 1 to 64 letters, digits, _ . or -, got {str(name)[:70]!r}")
        if not isinstance(arguments, str):
            raise ValueError(f"{inner}.arguments: expected the arguments as JSON text, got {_kind(arguments)}")
        try:
            parsed = json.loads(arguments or "{}")
        except json.JSONDecodeError as exc:
            raise ValueError(f"{inner}.arguments: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(parsed, dict):
            raise ValueError(f"{inner}.arguments: expected a JSON object, got {_kind(parsed)}")
        if call_id is None:
            call_id = ""
        if not isinstance(call_id, str) or len(call_id) > 200:
            raise ValueError(f"{here}.id: expected text of at most 200 characters")
        calls.append({"id": call_id, "name": name, "arguments": arguments or "{}"})
    return calls


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def read_calls(
    syntax: CallSyntax | None, text: str, tools: Sequence[dict], parallel: bool = True
) -> tuple[str, list[dict]]:
    """(content, calls) of a finished reply: its text less the calls, and the calls with new ids; ([text], [])
    when it made none (or the model was given no tools)."""
    if syntax is None or not tools:
        return text, []
    content, calls = syntax.parse(text, tools)
    if not parallel:
        calls = calls[:1]
    if not calls:
        return text, []
    return content, [{"id": new_call_id(), **call} for call in calls]


def held_back(deltas: Iterable[str], syntax: CallSyntax | None, tools: Sequence[dict]) -> Iterator[str]:
    """A reply's text deltas less what may still be a tool call: text goes out once the syntax says it is certainly
    text; at the end, the rest goes out unless the reply is a call (which is then shown as one, not as text)."""
    if syntax is None or not tools:
        yield from deltas
        return
    text, sent = "", 0
    for delta in deltas:
        text += delta
        ready = syntax.streamable(text, tools)
        if ready > sent:
            yield text[sent:ready]
            sent = ready
    if sent < len(text) and not syntax.parse(text, tools)[1]:
        yield text[sent:]


def arguments_text(arguments: str) -> str:
    """A call's arguments for reading: indented JSON (as written when it is not JSON)."""
    try:
        return json.dumps(json.loads(arguments), ensure_ascii=False, indent=2)
    except ValueError:
        return arguments


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {dict: "an object", list: "a list", str: "text", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__
    )
