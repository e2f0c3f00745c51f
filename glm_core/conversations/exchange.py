"""Export and import of conversations.

Export formats: `json` (this project's format, full fidelity: every version of every message, with its parent,
and the chosen path; what import reads back), `md`, `csv` (one row per message), `html` (a standalone page; every
piece of text is escaped, and the page may run no script) and `jsonl` (ChatGLM fine-tuning data: one line per
finished reply, `{"prompt", "response", "history": [[q, a], ...]}`). All but `json` hold the chosen path only.
Tool calls and results show as such in each: `json` carries them as OpenAI's API does (an assistant's
`tool_calls`, a `tool` message's `tool_call_id` and `name`, the conversation's `tools`), `md` and `html` draw a
call as the function's name with its arguments as JSON and a result under the call it answers, `csv` has columns
for them; `jsonl` (question and answer pairs) leaves tool turns out.

Import reads JSON: this project's format (version 1, one line per conversation, or 2, with versions); an OpenAI-style `{"messages": [...]}` (or a list of such objects, or
a bare list of messages; with `tool_calls`, `tool` messages and `tools`); ChatGLM history pairs `[[q, a], ...]` (or one `{"prompt", "response", "history"}`
sample). The whole file is checked before anything is stored, against the limits below; any problem rejects the
file with a message that says where and what, and the store is not touched.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from ..backends.config import check_name
from ..protocol import SamplingParams
from ..reasoning import join_reasoning
from ..tool_calls import MAX_RESULT_CHARS, arguments_text, check_calls, check_tools, openai_tools
from .conversation import STATS_FIELDS, STATUSES, TITLE_MAX_CHARS, ChatMessage, Conversation, title_from_prompt
from .store import Store

FORMAT_NAME = "glm-chat-dashboard/conversations"
# 2: messages carry "id" and "parent" (reply versions and branches), conversations "chosen"; 3: tool calls and
# results (an assistant's "tool_calls", "tool" messages with "tool_call_id" and "name"), conversations "tools"
FORMAT_VERSION = 3
MAX_IMPORT_BYTES = 20 * 2**20  # 20 MiB: a few thousand long conversations; a bigger file is refused unread
MAX_IMPORT_CONVERSATIONS = 5_000
MAX_IMPORT_MESSAGES = 10_000  # per conversation
ROLES = ("system", "user", "assistant", "tool")
# Times an import may carry: what every page, pandas and SQLite can show and sort (a year 1 or 9999 with an offset
# crashes datetime.fromtimestamp in some time zones).
EARLIEST_TIME = datetime(1970, 1, 1, tzinfo=UTC)
LATEST_TIME = datetime(2100, 1, 1, tzinfo=UTC)
# Numbers an import may carry (figures, sampling parameters): exact in a float and in SQLite's 64-bit integers.
MAX_IMPORT_NUMBER = 2**53
MAX_NUMBER_DIGITS = 20
PARAM_FIELDS = (*SamplingParams.__dataclass_fields__, "system_prompt")


@dataclass(frozen=True)
class ExportFormat:
    extension: str
    mime: str
    label: str
    description: str


EXPORT_FORMATS = {
    "json": ExportFormat("json", "application/json", "JSON", "full fidelity; import reads it back"),
    "md": ExportFormat("md", "text/markdown", "Markdown", "readable text, one section per conversation"),
    "csv": ExportFormat("csv", "text/csv", "CSV", "one row per message, with its figures and sampling parameters"),
    "html": ExportFormat("html", "text/html", "HTML", "a standalone page to open in any browser"),
    "jsonl": ExportFormat(
        "jsonl",
        "application/jsonl",
        "JSONL (ChatGLM)",
        'fine-tuning data: {"prompt", "response", "history"} per finished reply',
    ),
}


class ImportRejected(ValueError):
    """The file is not something we import; the message says what is wrong."""


# ---- export ----------------------------------------------------------------------------------------------------


def iso_time(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat()


def export_conversations(conversations: list[Conversation], fmt: str) -> bytes:
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    return {"json": to_json, "md": to_markdown, "csv": to_csv, "html": to_html, "jsonl": to_chatglm_jsonl}[fmt](
        conversations
    ).encode("utf-8")


def to_json(conversations: list[Conversation]) -> str:
    document = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "exported_at": iso_time(time.time()),
        "conversations": [_conversation_json(c) for c in conversations],
    }
    return json.dumps(document, ensure_ascii=False, indent=1)


def _conversation_json(c: Conversation) -> dict:
    """Every message, parents first, numbered from 1 in the file; "chosen" is the number of the last message of
    the chosen path."""
    every = c.every_message()
    number = {id(m): n for n, m in enumerate(every, start=1)}
    by_store_id = {m.id: n for n, m in enumerate(every, start=1) if m.id is not None}

    def parent(n: int, m: ChatMessage):
        if not c.tree:  # one line
            return n - 1 or None
        return by_store_id.get(m.parent_id)

    return {
        "id": c.id,
        "title": c.title,
        "created_at": iso_time(c.created_at),
        "updated_at": iso_time(c.updated_at or c.created_at),
        "pinned": c.pinned,
        "archived": c.archived,
        "backend": c.backend,
        "tools": openai_tools(c.tools),
        "chosen": number[id(c.messages[-1])] if c.messages else None,
        "messages": [
            {
                "id": n,
                "parent": parent(n, m),
                "role": m.role,
                "content": m.answer,
                # A reasoning model's thinking, apart from its answer (vLLM's name for it); null when none.
                "reasoning_content": m.reasoning or None,
                **_tool_fields(m),
                "created_at": iso_time(m.created_at),
                "status": m.status,
                "finish_reason": m.finish_reason,
                "error": m.error,
                "model": m.model,
                "precision": m.precision,
                "params": m.params,
                "stats": m.stats,
            }
            for n, m in enumerate(every, start=1)
        ],
    }


def _tool_fields(m: ChatMessage) -> dict:
    """A message's tool fields as OpenAI's API writes them: an assistant's calls, a result's call and function."""
    if m.role == "tool":
        return {"tool_call_id": m.tool_call_id or "", "name": m.tool_name or ""}
    if m.tool_calls:
        return {
            "tool_calls": [
                {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                for c in m.tool_calls
            ]
        }
    return {}


def _speaker(m: ChatMessage) -> str:
    if m.role == "tool":
        return f"Tool result ({m.tool_name})" if m.tool_name else "Tool result"
    if m.role != "assistant":
        return m.role.capitalize()
    return f"Assistant ({m.model}, {m.precision})" if m.model else "Assistant"


def _close_fences(text: str) -> str:
    """Close a code fence the message left open, so it cannot swallow the rest of the document."""
    fences = sum(1 for line in text.splitlines() if line.lstrip().startswith("```"))
    return text + "\n```" if fences % 2 else text


def _fenced(text: str, language: str = "") -> str:
    """`text` as a code block whose fence is longer than any run of backticks in it (CommonMark), so nothing in it
    can close the block early."""
    fence = "`" * max(3, max((len(run) + 1 for run in re.findall(r"`+", text)), default=0))
    return f"{fence}{language}\n{text}\n{fence}"


def _markdown_calls(m: ChatMessage) -> str:
    return "".join(
        f"\n**Tool call** `{c['name']}` ({c['id']})\n\n{_fenced(arguments_text(c['arguments']), 'json')}\n"
        for c in m.tool_calls or []
    )


def to_markdown(conversations: list[Conversation]) -> str:
    out = []
    for c in conversations:
        out.append(f"# {c.title}\n\n_{len(c.messages)} messages · started {iso_time(c.created_at)}_\n")
        if c.tools:
            names = ", ".join(f"`{t['name']}`" for t in c.tools)
            out.append(
                f"**Tools:** {names}\n\n{_fenced(json.dumps(openai_tools(c.tools), ensure_ascii=False, indent=2), 'json')}\n"
            )
        for m in c.messages:
            if m.role == "tool":  # a result, as the tool gave it
                call = f" for call {m.tool_call_id}" if m.tool_call_id else ""
                out.append(f"### {_speaker(m)}{call}\n\n{_fenced(m.content)}\n")
            elif m.reasoning:  # the thinking as a quote above the answer
                thinking = "\n".join(f"> {line}" if line else ">" for line in m.reasoning.splitlines())
                out.append(
                    f"### {_speaker(m)}\n\n> **Thinking**\n>\n{thinking}\n\n{_close_fences(m.answer)}\n"
                    + _markdown_calls(m)
                )
            else:
                out.append(f"### {_speaker(m)}\n\n{_close_fences(m.content)}\n" + _markdown_calls(m))
            line = m.stats_line()
            if line:
                out.append(f"> {line}\n")
            if m.error:
                out.append(f"> error: {m.error}\n")
        out.append("---\n")
    return "\n".join(out)


CSV_COLUMNS = (
    "conversation_id",
    "conversation_title",
    "position",
    "role",
    "content",
    "reasoning_content",
    "tool_calls",
    "tool_call_id",
    "tool_name",
    "created_at",
    "status",
    "finish_reason",
    "stopped",
    "error",
    "model",
    "precision",
    *PARAM_FIELDS,
    *STATS_FIELDS,
)


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value):
    """A text cell a spreadsheet would run as a formula (=, +, -, @ first) gets a leading apostrophe, which
    spreadsheets show as text (OWASP's advice against CSV injection); other values pass unchanged."""
    return "'" + value if isinstance(value, str) and value.startswith(_FORMULA_START) else value


def to_csv(conversations: list[Conversation]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for c in conversations:
        for position, m in enumerate(c.messages):
            row = {
                "conversation_id": c.id,
                "conversation_title": c.title,
                "position": position,
                "role": m.role,
                "content": m.answer,
                "reasoning_content": m.reasoning,
                "tool_calls": json.dumps(_tool_fields(m)["tool_calls"], ensure_ascii=False) if m.tool_calls else "",
                "tool_call_id": m.tool_call_id or "",
                "tool_name": m.tool_name or "",
                "created_at": iso_time(m.created_at),
                "status": m.status,
                "finish_reason": m.finish_reason or "",
                "stopped": m.stopped if m.role == "assistant" else "",
                "error": m.error or "",
                "model": m.model or "",
                "precision": m.precision or "",
            }
            row.update({name: (m.params or {}).get(name, "") for name in PARAM_FIELDS})
            row.update({name: (m.stats or {}).get(name, "") for name in STATS_FIELDS})
            writer.writerow({k: "" if v is None else spreadsheet_safe(v) for k, v in row.items()})
    return buffer.getvalue()


_HTML_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 52rem; margin: 2rem auto; padding: 0 1rem; color: #1f2328; }
.message { border: 1px solid #d0d7de; border-radius: 8px; padding: .75rem 1rem; margin: .75rem 0; }
.user { background: #f6f8fa; } .assistant { background: #fff; } .system { background: #fff8c5; }
.tool { background: #eef6ff; } .call { border-left: 3px solid #0969da; padding-left: .6rem; margin-top: .4rem; }
.call-name, .tool-name { font-family: ui-monospace, monospace; font-weight: 600; }
.speaker { font-weight: 600; margin-bottom: .4rem; }
details.thinking { color: #59636e; margin-bottom: .4rem; }
.content { white-space: pre-wrap; overflow-wrap: anywhere; font-family: ui-monospace, monospace; font-size: .9rem; }
.stats, .meta { color: #59636e; font-size: .8rem; margin-top: .4rem; } .error { color: #b42318; }
"""


def to_html(conversations: list[Conversation]) -> str:
    """A standalone page. Every piece of text goes through html.escape, and the Content-Security-Policy forbids
    scripts anyway (defence in depth: the page may be opened from disk, where no server sets a policy)."""
    e = html.escape
    body = []
    for c in conversations:
        body.append(
            f'<section class="conversation"><h1>{e(c.title)}</h1>'
            f'<p class="meta">{len(c.messages)} messages · started {e(iso_time(c.created_at))}</p>'
        )
        if c.tools:
            body.append(
                '<details class="tools"><summary>Tools: '
                + ", ".join(f'<span class="tool-name">{e(t["name"])}</span>' for t in c.tools)
                + f'</summary><div class="content">{e(json.dumps(openai_tools(c.tools), ensure_ascii=False, indent=2))}'
                "</div></details>"
            )
        for m in c.messages:
            body.append(
                f'<div class="message {e(m.role)}"><div class="speaker">{e(_speaker(m))}'
                + (f' <span class="meta">for call {e(m.tool_call_id)}</span>' if m.tool_call_id else "")
                + "</div>"
                + (
                    f'<details class="thinking"><summary>Thinking</summary><div class="content">{e(m.reasoning)}'
                    "</div></details>"
                    if m.reasoning
                    else ""
                )
                + (f'<div class="content">{e(m.answer)}</div>' if m.answer or not m.tool_calls else "")
                + "".join(
                    f'<div class="call"><div>Tool call <span class="call-name">{e(call["name"])}</span> '
                    f'<span class="meta">{e(call["id"])}</span></div>'
                    f'<div class="content">{e(arguments_text(call["arguments"]))}</div></div>'
                    for call in m.tool_calls or []
                )
            )
            if m.stats_line():
                body.append(f'<div class="stats">{e(m.stats_line())}</div>')
            if m.error:
                body.append(f'<div class="stats error">error: {e(m.error)}</div>')
            body.append("</div>")
        body.append("</section>")
    title = e(conversations[0].title) if len(conversations) == 1 else f"{len(conversations)} conversations"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{title}</title>'
        f"<style>{_HTML_STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def _usable_for_training(m: ChatMessage) -> bool:
    """A reply that ended by itself; stopped, failed, unfinished or interrupted ones would teach truncation."""
    return m.status == "complete" and m.finish_reason not in ("stopped", "error") and not m.error


def to_chatglm_jsonl(conversations: list[Conversation]) -> str:
    """ChatGLM's multi-turn fine-tuning format: one sample per finished reply, with the exchanges before it as
    history. System messages have no place in it and are left out, and so are tool turns (a reply that calls a
    tool, the results, and the reply that reads them: question and answer pairs cannot hold them)."""
    lines = []
    for c in conversations:
        history: list[list[str]] = []
        pending: str | None = None
        for m in c.messages:
            if m.role == "user":
                pending = m.content
            elif m.role == "tool" or m.tool_calls:
                pending = None
            elif m.role == "assistant" and pending is not None:
                if _usable_for_training(m):
                    lines.append(
                        json.dumps(
                            {"prompt": pending, "response": m.answer, "history": [list(pair) for pair in history]},
                            ensure_ascii=False,
                        )
                    )
                history.append([pending, m.answer])
                pending = None
    return "".join(line + "\n" for line in lines)


def export_file_name(conversations: Sequence, fmt: str) -> str:
    """A file name for an export: the title of a single conversation (or summary), else a dated name."""
    if len(conversations) == 1:
        stem = "".join(ch if ch.isalnum() else "-" for ch in conversations[0].title.lower()).strip("-")
        stem = "-".join(part for part in stem.split("-") if part)[:60] or "conversation"
    else:
        stem = f"conversations-{datetime.now().strftime('%Y%m%d-%H%M')}"
    return f"{stem}.{EXPORT_FORMATS[fmt].extension}"


# ---- import ----------------------------------------------------------------------------------------------------


def check_import_size(size: int) -> None:
    """Call with the file's size before reading it, so an oversized file is refused unread."""
    if size > MAX_IMPORT_BYTES:
        raise ImportRejected(
            f"the file is {size / 2**20:.1f} MiB; at most {MAX_IMPORT_BYTES // 2**20} MiB can be imported"
        )


def import_file(store: Store, workspace: str, data: bytes) -> list[str]:
    """Check the whole file, then store its conversations in one transaction; returns their new ids."""
    return store.import_conversations(workspace, parse_import(data))


def parse_import(data: bytes) -> list[Conversation]:
    """Conversations from an import file, or ImportRejected saying what is wrong."""
    check_import_size(len(data))
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ImportRejected(f"the file is not UTF-8 text (byte {exc.start} is not valid UTF-8)") from None
    if not text.strip():
        raise ImportRejected("the file is empty")

    def no_constants(name: str):
        raise ImportRejected(f"the file is not valid JSON: {name} is not a JSON number")

    def whole_number(digits: str) -> int:  # before Python converts it: a 100,000-digit number costs seconds
        if len(digits.lstrip("-")) > MAX_NUMBER_DIGITS:
            raise ImportRejected(
                f"the file holds a number with {len(digits):,} digits; numbers are at most "
                f"{MAX_NUMBER_DIGITS} digits long"
            )
        return int(digits)

    def finite_number(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):  # 1e999 reads as infinity, which our own export could not write back
            raise ImportRejected(f"the file holds the number {text[:40]}, too large for a float")
        return value

    try:
        document = json.loads(text, parse_constant=no_constants, parse_int=whole_number, parse_float=finite_number)
    except json.JSONDecodeError as exc:
        raise ImportRejected(
            f"the file is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from None
    except RecursionError:
        raise ImportRejected("the file is not a conversation export: it is nested too deeply") from None
    conversations = _read_document(document)
    if not conversations:
        raise ImportRejected("the file holds no conversations")
    if len(conversations) > MAX_IMPORT_CONVERSATIONS:
        raise ImportRejected(
            f"the file holds {len(conversations):,} conversations; at most {MAX_IMPORT_CONVERSATIONS:,} per import"
        )
    return conversations


def _read_document(doc) -> list[Conversation]:
    if isinstance(doc, dict) and "format" in doc:
        return _read_own_format(doc)
    if isinstance(doc, dict) and "messages" in doc:
        return [_read_openai(doc, "messages")]
    if isinstance(doc, dict) and {"prompt", "response"} <= doc.keys():
        return [_read_chatglm_sample(doc)]
    if isinstance(doc, list) and doc:
        if all(isinstance(item, dict) and "messages" in item for item in doc):
            return [_read_openai(item, f"[{i}].messages") for i, item in enumerate(doc)]
        if all(isinstance(item, dict) and "role" in item for item in doc):
            return [_read_openai({"messages": doc}, "")]
        if all(isinstance(item, list) for item in doc):
            return [_conversation_from_pairs(doc, [], "")]
    raise ImportRejected(
        'the file is not a format we import: expected this app\'s JSON export (with "format": '
        f'"{FORMAT_NAME}"), an OpenAI-style {{"messages": [...]}}, or ChatGLM history pairs [[question, answer], ...]'
    )


def _fail(where: str, problem: str):
    raise ImportRejected(f"{where}: {problem}" if where else problem)


def _expect(value, kinds, where: str, what: str):
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        _fail(where, f"expected {what}, got a boolean")
    if not isinstance(value, kinds):
        _fail(where, f"expected {what}, got {type(value).__name__ if value is not None else 'null'}")
    return value


def _read_time(value, where: str) -> float:
    _expect(value, str, where, "an ISO 8601 time")
    try:
        moment = datetime.fromisoformat(value)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        in_range = EARLIEST_TIME <= moment < LATEST_TIME
    except (ValueError, OverflowError):  # malformed, or an offset that moves it out of datetime's years
        _fail(where, f"not an ISO 8601 time: {value[:40]!r}")
    if not in_range:
        _fail(where, f"{value[:40]!r} is outside the years {EARLIEST_TIME.year} to {LATEST_TIME.year - 1}")
    return moment.timestamp()


def _read_title(value, where: str) -> str:
    _expect(value, str, where, "a title (text)")
    if len(value) > TITLE_MAX_CHARS:
        _fail(where, f"the title has {len(value)} characters; at most {TITLE_MAX_CHARS}")
    return value


def _check_count(messages: list, where: str) -> None:
    if len(messages) > MAX_IMPORT_MESSAGES:
        _fail(where, f"{len(messages):,} messages; at most {MAX_IMPORT_MESSAGES:,} per conversation")


def _read_own_format(doc: dict) -> list[Conversation]:
    if doc.get("format") != FORMAT_NAME:
        _fail("format", f"expected {FORMAT_NAME!r}, got {str(doc.get('format'))[:60]!r}")
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FORMAT_VERSION:
        _fail("version", f"this app reads versions 1 to {FORMAT_VERSION}, the file says {str(version)[:20]!r}")
    items = _expect(doc.get("conversations"), list, "conversations", "a list of conversations")
    conversations = []
    for i, item in enumerate(items):
        where = f"conversations[{i}]"
        _expect(item, dict, where, "a conversation object")
        messages = _expect(item.get("messages"), list, f"{where}.messages", "a list of messages")
        _check_count(messages, f"{where}.messages")
        read = [_read_own_message(m, f"{where}.messages[{j}]") for j, m in enumerate(messages)]
        head = dict(
            title=_read_title(item.get("title", ""), f"{where}.title"),
            created_at=_read_time(item.get("created_at"), f"{where}.created_at"),
            pinned=item.get("pinned") is True,
            archived=item.get("archived") is True,
            backend=_read_backend(item.get("backend"), f"{where}.backend"),
            tools=_read_tools(item.get("tools"), f"{where}.tools"),
        )
        if any(m.id is not None for m in read):
            tree, chosen = _read_tree(read, messages, item.get("chosen"), where)
            by_id = {m.id: m for m in tree}
            _check_tool_results(tree, {id(m): by_id.get(m.parent_id) for m in tree}, f"{where}.messages")
            conversation = Conversation.from_tree(tree, chosen, **head)
        else:  # version 1, or a hand-written file: one line
            _check_line(read, f"{where}.messages")
            conversation = Conversation(messages=read, **head)
        if item.get("updated_at") is not None:
            conversation.updated_at = _read_time(item["updated_at"], f"{where}.updated_at")
        conversations.append(conversation)
    return conversations


def _read_tools(value, where: str) -> list[dict]:
    if value is None:
        return []
    try:
        return check_tools(value, where)
    except ValueError as exc:
        raise ImportRejected(str(exc)) from None


def _read_calls(value, where: str) -> list[dict] | None:
    if value is None or value == []:
        return None
    try:
        return check_calls(value, where)
    except ValueError as exc:
        raise ImportRejected(str(exc)) from None


def _check_line(messages: list[ChatMessage], where: str) -> None:
    _check_tool_results(messages, {id(m): previous for previous, m in zip([None, *messages], messages)}, where)


def _check_tool_results(messages: list[ChatMessage], parents: dict[int, ChatMessage | None], where: str) -> None:
    """A tool result follows the reply whose call it answers (directly, or after that reply's other results), and
    its tool_call_id, when it has one, is one of that reply's calls."""
    for j, m in enumerate(messages):
        if m.role != "tool":
            continue
        caller = parents[id(m)]
        while caller is not None and caller.role == "tool":
            caller = parents[id(caller)]
        if caller is None or not caller.tool_calls:
            _fail(f"{where}[{j}].role", "a tool result must follow an assistant message with tool_calls")
        if m.tool_call_id and m.tool_call_id not in {c["id"] for c in caller.tool_calls}:
            _fail(f"{where}[{j}].tool_call_id", f"{m.tool_call_id[:60]!r} is not one of the calls it follows")


def _read_backend(value, where: str) -> str | None:
    """The backend the conversation talked to, by name (None: the portal's default). A name this portal does not
    have is kept: the conversation then talks to the default and the page says so."""
    if value is None:
        return None
    name = _expect(value, str, where, "a backend name")
    try:
        return check_name(name)
    except ValueError as exc:
        _fail(where, str(exc))


def _read_tree(read: list[ChatMessage], raw: list[dict], chosen, where: str) -> tuple[list[ChatMessage], int]:
    """Check the numbering: every message has a distinct whole-number "id" and its "parent" is null or a message
    before it; "chosen" is one of the ids (default: the last message)."""
    seen: set[int] = set()
    for j, (m, item) in enumerate(zip(read, raw)):
        here = f"{where}.messages[{j}]"
        if isinstance(m.id, bool) or not isinstance(m.id, int) or m.id in seen:
            _fail(f"{here}.id", "expected a whole number, distinct from the other messages' ids")
        parent = item.get("parent")
        if parent is not None and (isinstance(parent, bool) or parent not in seen):
            _fail(f"{here}.parent", "expected null or the id of a message before this one")
        m.parent_id = parent
        seen.add(m.id)
    if chosen is None:
        chosen = read[-1].id if read else None
    elif isinstance(chosen, bool) or chosen not in seen:
        _fail(f"{where}.chosen", "expected the id of one of the conversation's messages")
    return read, chosen


def _optional_text(m: dict, key: str, where: str) -> str | None:
    value = m.get(key)
    return None if value is None else _expect(value, str, f"{where}.{key}", "text or null")


def _read_own_message(m, where: str) -> ChatMessage:
    _expect(m, dict, where, "a message object")
    role = m.get("role")
    if role not in ROLES:
        _fail(f"{where}.role", f"expected one of {', '.join(ROLES)}, got {str(role)[:40]!r}")
    status = m.get("status", "complete")
    if status not in STATUSES:
        _fail(f"{where}.status", f"expected one of {', '.join(STATUSES)}, got {str(status)[:40]!r}")
    params = m.get("params")
    if params is not None:
        _expect(params, dict, f"{where}.params", "an object or null")
        for key, value in params.items():
            if key not in PARAM_FIELDS:
                _fail(f"{where}.params", f"unknown parameter {key[:40]!r}")
            if value is not None and not isinstance(value, (int, float, str)):
                _fail(f"{where}.params.{key}", "expected a number or text")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) > MAX_IMPORT_NUMBER:
                _fail(f"{where}.params.{key}", f"{value:.3g} is too large")
    stats = m.get("stats")
    if stats is not None:
        _expect(stats, dict, f"{where}.stats", "an object or null")
        for key, value in stats.items():
            if key not in STATS_FIELDS:
                _fail(f"{where}.stats", f"unknown figure {key[:40]!r}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                _fail(f"{where}.stats.{key}", "expected a non-negative number")
            if value > MAX_IMPORT_NUMBER:
                _fail(f"{where}.stats.{key}", f"{value:.3g} is too large")
        stats = {name: stats.get(name, 0) for name in STATS_FIELDS}
    message_id = m.get("id")
    if message_id is not None:
        _expect(message_id, int, f"{where}.id", "a whole number")
    return ChatMessage(
        id=message_id,
        **_read_tool_fields(m, role, where),
        role=role,
        content=join_reasoning(
            _optional_text(m, "reasoning_content", where) or "",
            _expect(m.get("content"), str, f"{where}.content", "text"),
        ),
        created_at=_read_time(m.get("created_at"), f"{where}.created_at"),
        status=status,
        finish_reason=_optional_text(m, "finish_reason", where),
        error=_optional_text(m, "error", where),
        model=_optional_text(m, "model", where),
        precision=_optional_text(m, "precision", where),
        params=params,
        stats=stats,
    )


def _read_tool_fields(m: dict, role: str, where: str) -> dict:
    """An assistant's tool_calls, or a tool result's tool_call_id and name, checked (either form OpenAI writes)."""
    if role == "tool":
        name = _optional_text(m, "name", where)
        if name is not None and len(name) > 64:
            _fail(f"{where}.name", "expected a function name of at most 64 characters")
        call_id = _optional_text(m, "tool_call_id", where)
        if call_id is not None and len(call_id) > 200:
            _fail(f"{where}.tool_call_id", "expected text of at most 200 characters")
        if len(m.get("content") or "") > MAX_RESULT_CHARS:
            _fail(f"{where}.content", f"a tool result holds at most {MAX_RESULT_CHARS:,} characters")
        return {"tool_call_id": call_id or "", "tool_name": name or ""}
    calls = m.get("tool_calls")
    if calls is not None and role != "assistant":
        _fail(f"{where}.tool_calls", "only an assistant message may carry tool_calls")
    return {"tool_calls": _read_calls(calls, f"{where}.tool_calls")}


def _message_text(content, where: str) -> str:
    """OpenAI content: a string, or a list of parts of which only text parts are supported."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for k, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                _fail(f"{where}[{k}]", f"only text parts can be imported, got {str(kind)[:40]!r}")
            texts.append(part["text"])
        return "".join(texts)
    _fail(where, f"expected text, got {type(content).__name__ if content is not None else 'null'}")


def _read_openai(doc: dict, where: str) -> Conversation:
    messages = _expect(doc.get("messages"), list, where or "messages", "a list of messages")
    _check_count(messages, where or "messages")
    out = []
    now = time.time()
    for j, m in enumerate(messages):
        here = f"{where}[{j}]" if where else f"[{j}]"
        _expect(m, dict, here, "a message object with role and content")
        role = m.get("role")
        if role == "developer":  # OpenAI's newer name for the system message
            role = "system"
        if role not in ROLES:
            _fail(f"{here}.role", f"expected one of {', '.join(ROLES)}, got {str(role)[:40]!r}")
        tool_fields = _read_tool_fields(m, role, here)
        content = m.get("content")
        # an assistant that only calls tools has content null, as OpenAI's API writes it
        text = "" if content is None and tool_fields.get("tool_calls") else _message_text(content, f"{here}.content")
        if role == "assistant":  # vLLM's reasoning_content: kept with the answer, as the app stores replies
            text = join_reasoning(_optional_text(m, "reasoning_content", here) or "", text)
        out.append(ChatMessage(role, text, created_at=now, **tool_fields))
    if not out:
        _fail(where or "messages", "the conversation has no messages")
    _check_line(out, where)
    title = doc.get("title")
    return Conversation(
        title=_read_title(title, "title") if title is not None else _default_title(out),
        messages=out,
        created_at=now,
        tools=_read_tools(doc.get("tools"), f"{where}.tools" if where else "tools"),
    )


def _conversation_from_pairs(pairs: list, tail: list[str], where: str) -> Conversation:
    _check_count(pairs, where or "history")
    now = time.time()
    messages = []
    for j, pair in enumerate(pairs + ([tail] if tail else [])):
        here = f"{where}[{j}]" if where else f"[{j}]"
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            _fail(here, "expected a [question, answer] pair of texts")
        messages += [ChatMessage("user", pair[0], created_at=now), ChatMessage("assistant", pair[1], created_at=now)]
    if not messages:
        _fail(where or "history", "the conversation has no messages")
    return Conversation(title=_default_title(messages), messages=messages, created_at=now)


def _read_chatglm_sample(doc: dict) -> Conversation:
    history = doc.get("history") or []
    _expect(history, list, "history", "a list of [question, answer] pairs")
    prompt = _expect(doc.get("prompt"), str, "prompt", "text")
    response = _expect(doc.get("response"), str, "response", "text")
    return _conversation_from_pairs(history, [prompt, response], "history")


def _default_title(messages: list[ChatMessage]) -> str:
    first = next((m.content for m in messages if m.role == "user"), "")
    return title_from_prompt(first)
