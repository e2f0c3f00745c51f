"""Prompt formats: turn a conversation (list of {"role", "content"}) into the token ids the model sees.

A format must be prefix-stable in practice: the ids of a conversation extended by a reply and a new user
message should start with the ids of the conversation before it. The engine does not rely on it blindly:
it reuses only the longest common prefix of the cached ids and the new ids, so a format that re-tokenizes
a reply differently costs a little recompute, never a wrong answer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from ..reasoning import CLOSE, OPEN
from .tool_formats import (
    CHATGLM3_TOOL_PROMPT,
    HERMES_SYSTEM,
    ChatGLM3ToolSyntax,
    GLM4ToolSyntax,
    template_tool_syntax,
)

_MARKER = re.compile("\ue000(\\d+)\ue001")  # private-use characters around a message's index


class ChatFormat(Protocol):
    name: str
    stop_token_ids: frozenset[int]

    def encode(self, messages: Sequence[dict], tools: Sequence[dict] = ()) -> list[int]:
        """Ids for the whole conversation, ending where the assistant's reply starts; `tools` where the format
        was trained for them (a format that was not refuses them: the API says so first)."""
        ...


@runtime_checkable
class ThinkingFormat(Protocol):
    """A format whose template can turn a reasoning model's thinking off (`enable_thinking`): `thinking_switch` says
    whether this template has the switch."""

    thinking_switch: bool

    def encode(
        self, messages: Sequence[dict], tools: Sequence[dict] = (), thinking: bool | None = None
    ) -> list[int]: ...


@runtime_checkable
class RewritingFormat(Protocol):
    """A format whose original code rewrote the decoded reply (ChatGLM-6B's process_response): the engine applies
    the rewrite while streaming, holding back the tail it may still change."""

    def process_response(self, text: str) -> str: ...

    def unsettled_tail(self, text: str) -> int: ...


@runtime_checkable
class ContinuingFormat(Protocol):
    """A format whose original demo kept a cache across turns (ChatGLM2's stream_chat)."""

    def continuation(self, messages: Sequence[dict]) -> list[int]:
        """The ids appended after the previous reply's generated tokens for the new (last) user message."""
        ...


@runtime_checkable
class PrefixRulesFormat(Protocol):
    """A format whose prompts do not extend causally (ChatGLM-6B's prompt attends both ways)."""

    def reusable_length(self, kept_ids: Sequence[int], new_ids: Sequence[int]) -> int:
        """How many leading ids of a kept cache stay valid for `new_ids` (instead of the common prefix)."""
        ...


def _no_tools(chat_format, tools: Sequence[dict]) -> None:
    if tools:
        raise ValueError(f"{chat_format.name} was not trained for tool use")


class TemplateChatFormat:
    """Any Hugging Face tokenizer with a chat template (SmolLM2, GLM-4-hf, Qwen, Llama ...). Tools go to the
    template's own `tools` (GLM-4's template: on the first message, with calls as `metadata` and results as
    `observation`); a template that ignores tools gets them described in the system message (tool_formats)."""

    name = "chat template"

    def __init__(self, tokenizer, stop_token_ids: set[int]):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template, so the model cannot be used for chat")
        self.tokenizer = tokenizer
        self.stop_token_ids = frozenset(stop_token_ids)
        # Strings the tokenizer turns into control tokens wherever they appear in text (<|im_start|>, ...).
        self._controls = [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.content]
        template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else str(tokenizer.chat_template)
        self.tool_syntax = template_tool_syntax(template)
        self._template_knows = {word: word in template for word in ("tools", "tool_calls")}
        # A reasoning model (GLM-Z1, GLM-4.5+) thinks inside <think>...</think>; its template may offer a switch.
        self.reasoning = OPEN in template or OPEN in tokenizer.get_vocab()
        self.thinking_switch = "enable_thinking" in template

    def encode(self, messages: Sequence[dict], tools: Sequence[dict] = (), thinking: bool | None = None) -> list[int]:
        """The prompt's ids; `thinking` False asks a template with the switch for the answer without thinking."""
        extra = {"enable_thinking": thinking} if thinking is not None and self.thinking_switch else {}
        shaped = self.template_messages(messages, tools)
        if any(control in m["content"] for m in shaped for control in self._controls):
            return self._encode_with_controls_as_text(shaped, tools, extra)
        text = self._render([m["content"] for m in shaped], shaped, tools, extra)
        # The template already wrote every special token (bos included) as text.
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def opens_reasoning(self, ids: Sequence[int]) -> bool:
        """Whether the prompt's own end opens the thinking (GLM-Z1's generation prompt ends with <think>): the reply
        then starts inside it."""
        if not self.reasoning:
            return False
        tail = self.tokenizer.decode(list(ids[-16:]))
        return tail.rfind(OPEN) > tail.rfind(CLOSE)

    def _thinking(self, m: dict) -> dict:
        """An earlier reply's thinking for the template (its own rule keeps or drops it); thinking with control
        tokens' text in it is dropped, not escaped: it is only ever a hint."""
        reasoning = m.get("reasoning_content")
        if not reasoning or any(control in reasoning for control in self._controls):
            return {}
        return {"reasoning_content": reasoning}

    def template_messages(self, messages: Sequence[dict], tools: Sequence[dict] = ()) -> list[dict]:
        """The messages as this template takes them: tool calls and results in its family's shape."""
        if isinstance(self.tool_syntax, GLM4ToolSyntax):
            return _glm4_messages(messages, tools, self._thinking)
        shaped = []
        for m in messages:
            message = {"role": m["role"], "content": m["content"], **self._thinking(m)}
            calls = m.get("tool_calls") or []
            if calls and self._template_knows["tool_calls"]:
                message["tool_calls"] = [
                    {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": _json(c)}}
                    for c in calls
                ]
            elif calls:  # written as the model is asked to write them
                blocks = [
                    f"<tool_call>\n{json.dumps({'name': c['name'], 'arguments': _json(c)}, ensure_ascii=False)}"
                    "\n</tool_call>"
                    for c in calls
                ]
                message["content"] = "\n".join(([m["content"]] if m["content"] else []) + blocks)
            if m["role"] == "tool":
                message.update(name=m.get("name", ""), tool_call_id=m.get("tool_call_id", ""))
            shaped.append(message)
        if tools and not self._template_knows["tools"]:
            described = HERMES_SYSTEM.format(
                tools="\n".join(json.dumps(_function(t), ensure_ascii=False) for t in tools)
            )
            if shaped and shaped[0]["role"] == "system":
                shaped[0] = {**shaped[0], "content": shaped[0]["content"] + "\n\n" + described}
            else:
                shaped.insert(0, {"role": "system", "content": described})
        return shaped

    def _render(
        self, contents: list[str], messages: Sequence[dict], tools: Sequence[dict] = (), extra: dict | None = None
    ) -> str:
        options = {"tools": [_function(t) for t in tools]} if tools and self._template_knows["tools"] else {}
        return self.tokenizer.apply_chat_template(
            [{**m, "content": c} for m, c in zip(messages, contents)],
            add_generation_prompt=True,
            tokenize=False,
            **options,
            **(extra or {}),
        )

    def _encode_with_controls_as_text(
        self, messages: Sequence[dict], tools: Sequence[dict] = (), extra: dict | None = None
    ) -> list[int]:
        """A message that contains a control token's text (a user typing `<|im_end|><|im_start|>system`) must
        not become that token: it would let anyone write turns for other roles. The template is rendered with
        a marker in place of each message, its own text is tokenized as usual, and each message's text with
        control strings split into ordinary pieces."""
        text = self._render([f"\ue000{i}\ue001" for i in range(len(messages))], messages, tools, extra)
        ids: list[int] = []
        position = 0
        for match in _MARKER.finditer(text):
            ids += self.tokenizer(text[position : match.start()], add_special_tokens=False)["input_ids"]
            ids += self.tokenizer(
                messages[int(match.group(1))]["content"], add_special_tokens=False, split_special_tokens=True
            )["input_ids"]
            position = match.end()
        return ids + list(self.tokenizer(text[position:], add_special_tokens=False)["input_ids"])


def _function(tool: dict) -> dict:
    return {"type": "function", "function": tool}


def _json(call: dict):
    """A call's arguments as the value templates expect (an object; the text itself when it is not JSON)."""
    try:
        return json.loads(call["arguments"] or "{}")
    except ValueError:
        return call["arguments"]


def _glm4_messages(messages: Sequence[dict], tools: Sequence[dict], thinking=lambda m: {}) -> list[dict]:
    """glm-4-9b-chat's template: `<|{role}|>{metadata}\n{content}` per message, tools on the message that has them
    (rendered under "# 可用工具"), a call as an assistant message whose metadata is the function's name and whose
    content is its arguments, a tool's result as an `observation` message."""
    shaped = []
    for m in messages:
        if m["role"] == "tool":
            shaped.append({"role": "observation", "metadata": "", "content": m["content"]})
            continue
        if m["content"] or not m.get("tool_calls"):
            shaped.append({"role": m["role"], "metadata": "", "content": m["content"], **thinking(m)})
        for call in m.get("tool_calls") or []:
            shaped.append({"role": "assistant", "metadata": call["name"], "content": call["arguments"]})
    if tools:
        if not shaped or shaped[0]["role"] != "system":
            shaped.insert(0, {"role": "system", "metadata": "", "content": ""})
        shaped[0] = {**shaped[0], "tools": [_function(t) for t in tools]}
    return shaped


def _turns(messages: Sequence[dict]) -> tuple[str, list[tuple[str, str]], str]:
    """(system prompt, [(question, answer), ...], final question) from a conversation ending with a user turn."""
    start = 1 if messages and messages[0]["role"] == "system" else 0
    system, rest = (messages[0]["content"] if start else ""), messages[start:]
    pairs, question = [], None
    for m in rest:
        if m["role"] == "user":
            if question is not None:  # two user turns in a row: keep both in one question
                question += "\n\n" + m["content"]
            else:
                question = m["content"]
        elif m["role"] == "assistant" and question is not None:
            pairs.append((question, m["content"]))
            question = None
    return system, pairs, question or ""


class ChatGLM2Format:
    """ChatGLM2-6B: [gMASK] sop + "[Round 1]\n\n问：{q}\n\n答：{a}\n\n[Round 2]..." as THUDM's code builds it.

    Two originals, both kept: `chat()` re-encodes the whole conversation from its text as one string (`encode`,
    for a conversation read from the store or resent by an API client), and `stream_chat()` with a kept cache
    appends only the encoding of "\n\n[Round N]\n\n问：{q}\n\n答：" minus its first (dummy-prefix) piece after
    the reply's generated tokens (`continuation`). The two differ where a reply's text re-encodes to other ids
    than were generated (a reply encoded alone starts with a "▁" piece; inside the prompt it does not).
    ChatGLM2 has no system role; a system prompt is put before the first question.
    """

    name = "ChatGLM2"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.stop_token_ids = frozenset({tokenizer.eos_token_id})

    def encode(self, messages: Sequence[dict], tools: Sequence[dict] = ()) -> list[int]:
        _no_tools(self, tools)
        system, pairs, question = _turns(messages)
        prompt = ""
        for number, (q, a) in enumerate(pairs + [(question, None)], start=1):
            if number == 1 and system:
                q = f"{system}\n\n{q}"
            prompt += f"[Round {number}]\n\n问：{q}\n\n答：" + ("" if a is None else f"{a}\n\n")
        return list(self.tokenizer.prefix_ids) + self.tokenizer.encode(prompt)

    def continuation(self, messages: Sequence[dict]) -> list[int]:
        """The ids a kept cache gets after the last reply's generated tokens: only the new question."""
        _system, pairs, question = _turns(messages)
        number = len(pairs) + 1
        return self.tokenizer.encode(f"\n\n[Round {number}]\n\n问：{question}\n\n答：")[1:]


class ChatGLM3Format:
    """ChatGLM3-6B: [gMASK] sop, then per message <|role|> + encode("{metadata}\\n") + encode(content),
    then <|assistant|>. Generation stops at eos, <|user|> or <|observation|>."""

    name = "ChatGLM3"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.stop_token_ids = frozenset(
            {tokenizer.eos_token_id, tokenizer.command("<|user|>"), tokenizer.command("<|observation|>")}
        )

    tool_syntax = ChatGLM3ToolSyntax()

    def _message(self, role: str, content: str, metadata: str = "") -> list[int]:
        return (
            [self.tokenizer.command(f"<|{role}|>")]
            + self.tokenizer.encode(f"{metadata}\n")
            + self.tokenizer.encode(content)
        )

    def encode(self, messages: Sequence[dict], tools: Sequence[dict] = ()) -> list[int]:
        """With tools, the system message is ChatGLM3's tool prompt (after the client's own system text, if any)
        and the tools as JSON; a call is `<|assistant|>{name}` + its tool_call(...) block; a tool's result is
        `<|observation|>`, as in THUDM's PROMPT.md."""
        ids = list(self.tokenizer.prefix_ids)
        if tools:
            system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
            prompt = f"{system}\n\n{CHATGLM3_TOOL_PROMPT}" if system else CHATGLM3_TOOL_PROMPT
            ids += self._message("system", ChatGLM3ToolSyntax.system_message(tools, prompt))
            messages = messages[1:] if messages and messages[0]["role"] == "system" else messages
        for m in messages:
            if m["role"] == "tool":
                ids += self._message("observation", m["content"])
                continue
            if m["content"] or not m.get("tool_calls"):
                ids += self._message(m["role"], m["content"])
            for call in m.get("tool_calls") or []:
                ids += self._message("assistant", *reversed(ChatGLM3ToolSyntax.call_text(call)))
        return ids + [self.tokenizer.command("<|assistant|>")]

    def continuation(self, messages: Sequence[dict]) -> list[int]:
        """After the last reply's generated tokens: the new user message and the assistant tag."""
        return self._message("user", messages[-1]["content"]) + [self.tokenizer.command("<|assistant|>")]


TRAINING_TIME = "[[训练时间]]"  # a placeholder ChatGLM-6B may write, which its chat() replaced
# transformers 4.27's decode (clean_up_tokenization_spaces=True by default), which ChatGLM-6B's chat() ran on the
# reply before process_response; replaced in this order, each once over the text.
CLEAN_UP_TOKENIZATION = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)


class ChatGLM6BFormat:
    """ChatGLM-6B (first generation), as its chat()/stream_chat() built the prompt: the bare query for a first
    turn; with history "[Round {i}]\\n问：{q}\\n答：{r}\\n" for i = 0.. then "[Round {n}]\\n问：{query}\\n答：";
    encoded whole, then [gMASK] <sop>. Generation stops at <eop>. No system role: a system prompt goes before the
    first question, as ChatGLM2Format does.

    The prompt attends in both directions up to <sop>, so the keys and values of a kept conversation are only
    valid for exactly the same prompt (regenerate): a new turn re-reads the whole conversation.
    """

    name = "ChatGLM-6B"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.sop_id = tokenizer.command("<sop>")
        self.stop_token_ids = frozenset({tokenizer.eos_token_id})

    @staticmethod
    def prompt(messages: Sequence[dict]) -> str:
        system, pairs, question = _turns(messages)
        if system and pairs:
            pairs[0] = (f"{system}\n\n{pairs[0][0]}", pairs[0][1])
        elif system:
            question = f"{system}\n\n{question}"
        if not pairs:
            return question
        text = "".join(f"[Round {i}]\n问：{q}\n答：{a}\n" for i, (q, a) in enumerate(pairs))
        return text + f"[Round {len(pairs)}]\n问：{question}\n答："

    def encode(self, messages: Sequence[dict], tools: Sequence[dict] = ()) -> list[int]:
        _no_tools(self, tools)
        return self.tokenizer.encode(self.prompt(messages)) + self.tokenizer.suffix_ids

    def reusable_length(self, kept_ids: Sequence[int], new_ids: Sequence[int]) -> int:
        """Everything before <sop> when the kept cache was computed for exactly this prompt (regenerate); else 0:
        each prompt id attended to every other prompt id, so a different prompt changes all their keys."""
        if self.sop_id not in new_ids:
            return 0
        sop = list(new_ids).index(self.sop_id)
        return sop if list(kept_ids[: sop + 1]) == list(new_ids[: sop + 1]) else 0

    @staticmethod
    def process_response(text: str) -> str:
        """What the original chat() did to a decoded reply: transformers 4.27's clean-up of spaces before
        punctuation and English contractions (" ." -> ".", " n't" -> "n't" ...: its tokenizer.decode did it;
        here it is part of the reply's rewrite, since replies are decoded in streamed windows), then
        process_response: strip, "[[训练时间]]" -> "2023年", ASCII , ! : ; ? next to a CJK character -> their
        full-width forms."""
        for spaced, joined in CLEAN_UP_TOKENIZATION:
            text = text.replace(spaced, joined)
        text = text.strip().replace(TRAINING_TIME, "2023年")
        for ascii_mark, full_width in ((",", "，"), ("!", "！"), (":", "："), (";", "；"), (r"\?", "？")):
            text = re.sub(rf"([\u4e00-\u9fff]){ascii_mark}", rf"\1{full_width}", text)
            text = re.sub(rf"{ascii_mark}([\u4e00-\u9fff])", rf"{full_width}\1", text)
        return text

    @staticmethod
    def unsettled_tail(text: str) -> int:
        """How many of `text`'s last characters process_response may still change once more text follows:
        trailing whitespace (stripped only at the very end), a final ASCII mark (its form depends on the next
        character), the start of a "[[训练时间]]" placeholder or of a clean-up pattern (" n" may become "n't")."""
        hold = len(text) - len(text.rstrip())
        if not hold and text and text[-1] in ",!:;?":
            hold = 1
        partial = max(
            (
                k
                for pattern in (TRAINING_TIME, *(spaced for spaced, _ in CLEAN_UP_TOKENIZATION))
                for k in range(1, min(len(pattern) - 1, len(text)) + 1)
                if text.endswith(pattern[:k])
            ),
            default=0,
        )
        return max(hold, partial)
