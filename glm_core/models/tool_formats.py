"""Tool calling in each family's trained format: how tools, an assistant's calls and a tool's results are written
into the prompt, how the model's reply is read back into calls, and the grammar a forced call is decoded under.

- ChatGLM3-6B (THUDM/ChatGLM3 PROMPT.md, tool_using/README.md): a system message "Answer the following questions
  as best as you can. You have access to the following tools:" followed by the tools as JSON (indent 4); a call is
  `<|assistant|>{name}` then "```python\\ntool_call(key=value, ...)\\n```", ending at <|observation|>; a result is
  `<|observation|>` + "\\n" + its text. The original read a call with eval(); here ast reads its literals.
- GLM-4 (glm-4-9b-chat's chat template): tools on the first message (`tools`), rendered by the template under
  "# 可用工具"; a call is `<|assistant|>{name}` + "\\n" + the arguments as JSON; a result is `<|observation|>`.
- Any other chat template: the template's own `tools` (Qwen2.5, Llama 3.1, Hermes ...) and Hermes-style
  `<tool_call>{"name": ..., "arguments": ...}</tool_call>` replies, which most such templates teach; a template
  that ignores `tools` gets them described in the system message in that same format.

Calls are {"name", "arguments"} with arguments as JSON text, as OpenAI's API carries them.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Sequence

CHATGLM3_TOOL_PROMPT = "Answer the following questions as best as you can. You have access to the following tools:"
# JSON inside a grammar: compact, one space after separators (what the models were shown), and schema keywords the
# compiler does not implement are ignored rather than refused (a client's schema is not ours to reject for that).
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": True}
HERMES_SYSTEM = (
    "You may call one or more functions to assist with the user query. The functions are described within "
    "<tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\nFor each function call, return a json object with "
    "the function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


def _lark_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def json_grammar_rule(schema: dict | None) -> str:
    """`%json {...}` for a Lark grammar (llguidance): JSON text matching `schema` (any object when None)."""
    schema = dict(schema) if isinstance(schema, dict) and schema else {"type": "object"}
    schema["x-guidance"] = {**JSON_STYLE, **(schema.get("x-guidance") or {})}
    return "%json " + json.dumps(schema, ensure_ascii=False)


def json_schema_grammar(schema: dict | None) -> str:
    """The Lark grammar of a reply that is JSON matching `schema` (response_format)."""
    return "start: value\nvalue: " + json_grammar_rule(schema) + "\n"


def parameters_of(tool: dict) -> dict:
    """A tool's parameter schema for a forced call: the declared parameters only (additionalProperties false
    unless the schema says otherwise), so a call never rambles on in made-up keys."""
    parameters = tool.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        return {"type": "object", "properties": {}, "additionalProperties": False}
    return {"additionalProperties": False, **parameters}


def new_call(name: str, arguments) -> dict:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"name": name, "arguments": text}


class ToolSyntax:
    """One family's way of writing and reading tool calls."""

    name = "tools"
    # What comes between two calls of one reply, as Lark (a quoted string, or a special token by name: <|...|>).
    separator = _lark_string("\n")

    def call_grammar(self, tools: Sequence[dict], choice: str, parallel: bool = False) -> str:
        """The Lark grammar of a reply that is calls of `tools` (`choice`: "required", any of them, or a tool's
        name, that one only): one or more calls in the family's format with `parallel` (OpenAI's
        parallel_tool_calls, its default), else exactly one. After each call the model may end its turn or write
        the next; the grammar ends the reply once it ends its turn (the engine stops at its stop tokens)."""
        chosen = [t for t in tools if choice == "required" or t["name"] == choice]
        alternatives = " | ".join(f"call_{i}" for i in range(len(chosen)))
        rules = [f"call_{i}: {self.call_rule(tool)}" for i, tool in enumerate(chosen)]
        start = f"start: call ({self.separator} call)*" if parallel else "start: call"
        return "\n".join([start, f"call: {alternatives}", *rules]) + "\n"

    def call_rule(self, tool: dict) -> str:
        raise NotImplementedError

    def parse(self, text: str, tools: Sequence[dict]) -> tuple[str, list[dict]]:
        """(content, calls) from a reply's text; calls empty when the reply is plain text."""
        raise NotImplementedError

    def streamable(self, text: str, tools: Sequence[dict]) -> int:
        """How many leading characters of `text` (the reply so far) are certainly text, not part of a call: a
        stream sends those and holds back the rest until the reply ends."""
        raise NotImplementedError


ROLE_MARK = "<|assistant|>"


class NameLineSyntax(ToolSyntax):
    """ChatGLM3 and GLM-4 write a call as the function's name on the header line, then its arguments. The engine
    strips the reply's leading whitespace, so a reply starting "{name}\\n" with a known name is a call. A reply may
    also say something first and then open a new assistant turn for the call (`<|assistant|>{name}`, as THUDM's
    PROMPT.md shows): with tools the engine writes that role token by name (`role_marked`), and the reply is read
    segment by segment."""

    role_marked = True
    separator = "<|assistant|>"  # each further call opens a new assistant turn, written by the special token

    def streamable(self, text: str, tools: Sequence[dict]) -> int:
        maybe_call = any(f"{t['name']}\n".startswith(text) or text.startswith(f"{t['name']}\n") for t in tools)
        if maybe_call:
            return 0
        marked = text.find(ROLE_MARK)
        if marked >= 0:
            return marked
        return len(text) - max((k for k in range(1, len(ROLE_MARK)) if text.endswith(ROLE_MARK[:k])), default=0)

    def parse(self, text: str, tools: Sequence[dict]) -> tuple[str, list[dict]]:
        said, calls = [], []
        for number, segment in enumerate(text.split(ROLE_MARK)):
            split = self._split(segment, tools)
            arguments = None if split is None else self._arguments(split[1])
            if split is not None and arguments is not None:
                calls.append(new_call(split[0], arguments))
            elif number and segment.startswith("\n"):  # a later turn's empty metadata line
                said.append(segment[1:])
            else:
                said.append(segment)
        if not calls:
            return (text.replace(ROLE_MARK, "\n").strip() if ROLE_MARK in text else text), []
        return "\n".join(s.strip() for s in said if s.strip()), calls

    def _arguments(self, body: str) -> dict | None:
        raise NotImplementedError

    def _split(self, text: str, tools: Sequence[dict]) -> tuple[str, str] | None:
        head, newline, body = text.partition("\n")
        names = {t["name"] for t in tools}
        if newline and head.strip() in names:
            return head.strip(), body
        return None


class ChatGLM3ToolSyntax(NameLineSyntax):
    name = "ChatGLM3"

    @staticmethod
    def system_message(tools: Sequence[dict], content: str = "") -> str:
        """The system prompt ChatGLM3 was trained on: the tool prompt, then the tools as JSON with indent 4 (as its
        tokenizer's build_chat_input joined them: content + "\\n" + json.dumps(tools, indent=4, ensure_ascii=False))."""
        prompt = content or CHATGLM3_TOOL_PROMPT
        return prompt + "\n" + json.dumps(list(tools), indent=4, ensure_ascii=False)

    @staticmethod
    def call_text(call: dict) -> tuple[str, str]:
        """(metadata, content) of an assistant message that makes `call`."""
        arguments = json.loads(call["arguments"] or "{}")
        if not isinstance(arguments, dict):
            raise ValueError(f"the arguments of {call['name']!r} must be a JSON object")
        keywords = ", ".join(f"{key}={_python_literal(value)}" for key, value in arguments.items())
        return call["name"], f"```python\ntool_call({keywords})\n```"

    def call_rule(self, tool: dict) -> str:
        keywords = _keyword_rule(parameters_of(tool))
        opening = _lark_string(f"{tool['name']}\n```python\ntool_call(")
        return f'{opening} {keywords} ")\\n```"'

    def _arguments(self, body: str) -> dict | None:
        code = "\n".join(body.strip().split("\n")[1:-1]) if body.strip().startswith("```") else body.strip()
        return _tool_call_arguments(code)


class GLM4ToolSyntax(NameLineSyntax):
    name = "GLM-4"

    def call_rule(self, tool: dict) -> str:
        return f"{_lark_string(tool['name'] + chr(10))} {json_grammar_rule(parameters_of(tool))}"

    def _arguments(self, body: str) -> dict | None:
        try:
            arguments = json.loads(body.strip())
        except ValueError:
            return None
        return arguments if isinstance(arguments, dict) else None


class HermesToolSyntax(ToolSyntax):
    """`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one block per call."""

    name = "Hermes"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"
    _BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)

    def call_rule(self, tool: dict) -> str:
        opening = _lark_string(f'{self.OPEN}\n{{"name": {json.dumps(tool["name"], ensure_ascii=False)}, "arguments": ')
        return f"{opening} {json_grammar_rule(parameters_of(tool))} {_lark_string('}' + chr(10) + self.CLOSE)}"

    def parse(self, text: str, tools: Sequence[dict]) -> tuple[str, list[dict]]:
        names = {t["name"] for t in tools}
        calls = []
        for block in self._BLOCK.findall(text):
            try:
                call = json.loads(block)
            except ValueError:
                continue
            if isinstance(call, dict) and call.get("name") in names and isinstance(call.get("arguments", {}), dict):
                calls.append(new_call(call["name"], call.get("arguments", {})))
        if not calls:
            return text, []
        content = self._BLOCK.sub("", text)
        return content.split(self.OPEN)[0].strip(), calls  # an unfinished call at the end is dropped

    def streamable(self, text: str, tools: Sequence[dict]) -> int:
        """Text up to the first <tool_call>, less an ending that may be the start of one."""
        opening = text.find(self.OPEN)
        if opening >= 0:
            return opening
        partial = max((k for k in range(1, len(self.OPEN)) if text.endswith(self.OPEN[:k])), default=0)
        return len(text) - partial


def template_tool_syntax(chat_template: str) -> ToolSyntax:
    """GLM-4's syntax for glm-4-9b-chat's template family ([gMASK]<sop> prompts that predate GLM-4.5's
    <tool_call> blocks), else Hermes'."""
    glm4 = ("[gMASK]" in chat_template or "<|observation|>" in chat_template) and "<tool_call>" not in chat_template
    return GLM4ToolSyntax() if glm4 else HermesToolSyntax()


# ---- ChatGLM3's tool_call(...) keywords --------------------------------------------------------------------


def _python_literal(value) -> str:
    """A JSON value as the Python literal ChatGLM3 writes (True/False/None; strings and numbers as JSON has them,
    which Python reads the same)."""
    if value is True or value is False or value is None:
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_python_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))}: {_python_literal(v)}" for k, v in value.items()) + "}"
    return json.dumps(value, ensure_ascii=False)


def _keyword_rule(parameters: dict) -> str:
    """Lark for `key=value, ...` of an object schema: its properties in order, the required ones always, the others
    optionally; each value JSON of the property's schema (read back as Python: true/false/null are accepted)."""
    properties = parameters.get("properties") or {}
    required = set(parameters.get("required") or [])
    items = [(key, schema) for key, schema in properties.items() if str(key).isidentifier()]
    missing = required - {key for key, _ in items}
    if missing:
        raise ValueError(f"required parameters that are not Python names cannot be called this way: {sorted(missing)}")
    if not items:
        return '""'
    values = [f"{_lark_string(key + '=')} {json_grammar_rule(schema)}" for key, schema in items]

    def after(i: int) -> str:  # keywords i.. once one was written (each opens with ", ")
        if i == len(items):
            return '""'
        rest = f'", " {values[i]} ({after(i + 1)})'
        return rest if items[i][0] in required else f"({rest} | {after(i + 1)})"

    def first(i: int) -> str:  # keywords i.. when none was written yet
        if i == len(items):
            return '""'
        written = f"{values[i]} ({after(i + 1)})"
        return written if items[i][0] in required else f"({written} | {first(i + 1)})"

    return f"({first(0)})"


_JSON_NAMES = {"true": True, "false": False, "null": None}


def _tool_call_arguments(code: str) -> dict | None:
    """The keywords of `tool_call(k=v, ...)` as a dict, read with ast (literals only, never run)."""
    try:
        tree = ast.parse(code.strip(), mode="eval")
    except SyntaxError:
        return None
    call = tree.body
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "tool_call"):
        return None
    if call.args:
        return None
    arguments = {}
    for keyword in call.keywords:
        if keyword.arg is None:
            return None
        try:
            arguments[keyword.arg] = _literal(keyword.value)
        except ValueError:
            return None
    return arguments


def _literal(node: ast.AST):
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    if isinstance(node, ast.List):
        return [_literal(n) for n in node.elts]
    if isinstance(node, ast.Dict):
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values)}
    return ast.literal_eval(node)
