"""Tool calls on the chat page and in the conversation store (issue 25, item 5): an assistant's calls and the tools'
results are kept as such (schema 4, older files migrate), exported and imported as calls and results, and the chat
page draws a forced call as a call, takes its result, and the model goes on with the observation in its history
(ChatGLM3's `<|observation|>`), its kept cache reused across the tool turn."""

from __future__ import annotations

import json
import sqlite3

import jsonschema
import pytest

from glm_core.conversations import store as store_module
from glm_core.conversations.conversation import ChatMessage, Conversation
from glm_core.conversations.exchange import ImportRejected, export_conversations, parse_import
from glm_core.conversations.store import NotFound, Store
from glm_core.tool_calls import check_tools, parse_tools

STATS = {
    "prompt_tokens": 10,
    "reused_tokens": 0,
    "prefill_tokens": 10,
    "completion_tokens": 5,
    "ttft_s": 0.1,
    "decode_tokens_per_s": 10.0,
    "total_s": 0.5,
    "queue_s": 0.0,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
CALL = {"id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'}
HOSTILE = "<script>alert(1)</script> ``` # not a heading"


def tool_conversation(store: Store, ws: str) -> Conversation:
    """user -> assistant calling get_weather -> the tool's result -> the assistant's answer, as turns store them."""
    c = Conversation(title="weather", tools=check_tools([WEATHER]))
    _, reply, _ = store.begin_turn(ws, c, 0, ChatMessage("user", "Weather in Paris?"), ChatMessage("assistant", ""))
    store.finish_reply(ws, reply, "", {**STATS}, "eos", None, tool_calls=[CALL])
    c = store.get_conversation(ws, c.id)
    result = ChatMessage("tool", '{"temp": 21} ' + HOSTILE, tool_call_id="call_1", tool_name="get_weather")
    _, answer, _ = store.begin_turn(ws, c, 2, [result], ChatMessage("assistant", ""))
    store.finish_reply(ws, answer, "It is 21 degrees in Paris.", {**STATS}, "eos", None)
    return store.get_conversation(ws, c.id)


def test_store_keeps_calls_results_and_tools(tmp_path):
    store, ws = Store(tmp_path), "ws"
    c = tool_conversation(store, ws)
    assert [m.role for m in c.messages] == ["user", "assistant", "tool", "assistant"]
    assert c.messages[1].tool_calls == [CALL] and c.messages[1].content == ""
    assert (c.messages[2].tool_call_id, c.messages[2].tool_name) == ("call_1", "get_weather")
    assert c.tools == [WEATHER["function"]] and c.pending_calls() == []
    # what the engine is sent again: OpenAI's shape, which every family's format renders
    sent = c.model_messages()
    assert sent[1] == {"role": "assistant", "content": "", "tool_calls": [CALL]}
    assert sent[2]["role"] == "tool" and sent[2]["tool_call_id"] == "call_1" and sent[2]["name"] == "get_weather"
    assert store.get_conversation(ws, c.id).messages[0].tool_calls is None
    shorter = Conversation(messages=c.messages[:2])
    assert shorter.pending_calls() == [CALL]  # a reply whose call is unanswered waits for its result
    with pytest.raises(NotFound):  # another workspace cannot change them
        store.set_tools("another", c.id, [])
    store.set_tools(ws, c.id, [])
    assert store.get_conversation(ws, c.id).tools == []


def test_a_version_3_store_migrates_and_keeps_its_conversations(tmp_path):
    db = sqlite3.connect(tmp_path / store_module.DB_NAME, isolation_level=None)
    for version in (1, 2, 3):
        for statement in store_module.MIGRATIONS[version].split(";\n"):
            if statement.strip():
                db.execute(statement)
    db.execute("PRAGMA user_version=3")
    db.execute("INSERT INTO workspaces VALUES ('ws', NULL, 1.0)")
    db.execute(
        "INSERT INTO conversations (id, workspace, title, created_at, updated_at) VALUES ('c', 'ws', 'old', 1, 2)"
    )
    for mid, parent, role, text in [(1, None, "user", "q"), (2, 1, "assistant", "a"), (3, 1, "assistant", "a2")]:
        db.execute(
            "INSERT INTO messages (id, conversation_id, parent_id, chosen_at, role, content, created_at, updated_at, "
            "status, completion_tokens) VALUES (?, 'c', ?, ?, ?, ?, 1.0, 1.0, 'complete', 5)",
            (mid, parent, float(mid), role, text),
        )
    with pytest.raises(sqlite3.IntegrityError):  # version 3 refuses the tool role
        db.execute(
            "INSERT INTO messages (conversation_id, parent_id, role, content, created_at, updated_at, status) "
            "VALUES ('c', 3, 'tool', 'r', 1, 1, 'complete')"
        )
    db.close()

    store = Store(tmp_path)
    kept = store.get_conversation("ws", "c")
    assert [(m.id, m.role, m.content) for m in kept.messages] == [(1, "user", "q"), (3, "assistant", "a2")]
    assert len(kept.tree) == 3 and kept.messages[1].stats["completion_tokens"] == 5 and kept.tools == []
    with sqlite3.connect(tmp_path / store_module.DB_NAME) as check:
        assert check.execute("PRAGMA user_version").fetchone()[0] == store_module.SCHEMA_VERSION == 4
        assert check.execute("PRAGMA foreign_key_check").fetchall() == []
        indexes = {row[1] for row in check.execute("PRAGMA index_list(messages)")}
    assert {"messages_by_conversation", "messages_by_parent"} <= indexes
    result = ChatMessage("tool", "r", tool_call_id="x", tool_name="f")  # the migrated table takes results
    store.begin_turn("ws", kept, 2, [result], ChatMessage("assistant", ""))
    assert store.get_conversation("ws", "c").messages[2].tool_name == "f"
    store.delete_conversation("ws", "c")  # the rebuilt table still cascades
    with sqlite3.connect(tmp_path / store_module.DB_NAME) as check:
        assert check.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0


def test_exports_show_calls_and_results_and_json_reads_back(tmp_path):
    store, ws = Store(tmp_path), "ws"
    c = tool_conversation(store, ws)
    document = json.loads(export_conversations([c], "json"))
    [exported] = document["conversations"]
    assert exported["tools"] == [WEATHER]
    call_message, result_message = exported["messages"][1], exported["messages"][2]
    assert call_message["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    ]
    assert result_message["role"] == "tool" and result_message["tool_call_id"] == "call_1"
    assert result_message["name"] == "get_weather"

    [back] = parse_import(export_conversations([c], "json"))
    ids = store.import_conversations("other", [back])
    again = store.get_conversation("other", ids[0])
    assert [m.role for m in again.messages] == ["user", "assistant", "tool", "assistant"]
    assert again.messages[1].tool_calls == [CALL] and again.messages[2].content == c.messages[2].content
    assert again.messages[2].tool_call_id == "call_1" and again.tools == c.tools

    markdown = export_conversations([c], "md").decode()
    assert "**Tool call** `get_weather` (call_1)" in markdown
    assert '```json\n{\n  "city": "Paris"\n}\n```' in markdown
    assert "### Tool result (get_weather) for call call_1" in markdown
    assert "````\n" + '{"temp": 21} ' + HOSTILE + "\n````" in markdown  # a fence longer than the result's own

    page = export_conversations([c], "html").decode()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert 'Tool call <span class="call-name">get_weather</span>' in page
    assert '<div class="message tool">' in page and "for call call_1" in page

    rows = export_conversations([c], "csv").decode()
    assert "call_1" in rows and "get_weather" in rows
    jsonl = export_conversations([c], "jsonl").decode()
    assert jsonl == ""  # the only reply to a question is a call; tool turns are no question/answer pairs


def test_openai_style_files_with_calls_import():
    document = {
        "tools": [WEATHER],
        "messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", **_fn()}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            {"role": "assistant", "content": "Sunny."},
        ],
    }
    [c] = parse_import(json.dumps(document).encode())
    assert c.messages[1].tool_calls == [{"id": "c1", "name": "get_weather", "arguments": '{"city": "Oslo"}'}]
    assert c.messages[2].role == "tool" and c.messages[2].tool_call_id == "c1"
    assert c.tools == [WEATHER["function"]]


def _fn(arguments='{"city": "Oslo"}'):
    return {"function": {"name": "get_weather", "arguments": arguments}}


@pytest.mark.parametrize(
    "messages, tools, reason",
    [
        (
            [{"role": "assistant", "content": "", "tool_calls": [{"id": "c", **_fn("{not json")}]}],
            None,
            "[0].tool_calls[0].function.arguments: not valid JSON",
        ),
        (
            [{"role": "assistant", "content": "", "tool_calls": [{"id": "c", **_fn("[1]")}]}],
            None,
            "[0].tool_calls[0].function.arguments: expected a JSON object",
        ),
        ([{"role": "user", "content": "q", "tool_calls": [{"id": "c", **_fn()}]}], None, "[0].tool_calls: only"),
        (
            [{"role": "user", "content": "q"}, {"role": "tool", "content": "r"}],
            None,
            "[1].role: a tool result must follow an assistant message with tool_calls",
        ),
        (
            [
                {"role": "assistant", "content": "", "tool_calls": [{"id": "c", **_fn()}]},
                {"role": "tool", "content": "r", "tool_call_id": "other"},
            ],
            None,
            "[1].tool_call_id: 'other' is not one of the calls it follows",
        ),
        ([{"role": "user", "content": "q"}], [{"type": "function", "function": {"name": "no spaces"}}], "tools[0]"),
    ],
)
def test_malformed_calls_are_refused_naming_the_field(messages, tools, reason):
    document = {"messages": messages, **({"tools": tools} if tools else {})}
    with pytest.raises(ImportRejected) as excinfo:
        parse_import(json.dumps(document).encode())
    assert reason in str(excinfo.value)


@pytest.mark.parametrize(
    "text, reason",
    [
        ("[{", "the tools are not valid JSON"),
        ('{"name": "x"}', "tools: expected a list of function definitions, got an object"),
        ('[{"type": "function"}]', "tools[0].function: expected an object"),
        ('[{"type": "function", "function": {"name": "a b"}}]', "tools[0].function.name: expected 1 to 64"),
        ('[{"name": "a"}, {"name": "a"}]', "tools[1].name: 'a' is given twice"),
        ('[{"name": "a", "parameters": {"type": "string"}}]', "tools[0].parameters.type"),
    ],
)
def test_typed_tools_are_checked_with_a_clear_message(text, reason):
    with pytest.raises(ValueError) as excinfo:
        parse_tools(text)
    assert reason in str(excinfo.value)


@pytest.fixture(scope="module")
def glm4_chat(tmp_path_factory):
    """A tiny random GLM-4 (glm-4-9b-chat-hf's architecture) with glm-4-9b-chat's tool-using chat template."""
    from glm_family_fixtures import write_glm_folder
    from test_tool_formats import GLM4_TEMPLATE
    from transformers import AutoTokenizer

    folder = write_glm_folder(tmp_path_factory.mktemp("m") / "glm-4-tools-chat-hf", "glm")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = GLM4_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


def chatglm3_prompt_has(folder, ids: list[int], call: dict, result: str) -> None:
    """ChatGLM3 (THUDM's PROMPT.md): the call as `<|assistant|>{name}` + its tool_call(...) block, the result as
    `<|observation|>` + "\n" + its text."""
    from glm_core.models.chatglm.tokenizer import ChatGLMTokenizer

    tokenizer = ChatGLMTokenizer(folder / "tokenizer.model", "chatglm3")
    keywords = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in json.loads(call["arguments"]).items())
    call_block = (
        [tokenizer.command("<|assistant|>")]
        + tokenizer.encode(f"{call['name']}\n")
        + tokenizer.encode(f"```python\ntool_call({keywords})\n```")
    )
    observation = [tokenizer.command("<|observation|>")] + tokenizer.encode("\n") + tokenizer.encode(result)
    assert _contains(ids, call_block), "the call is not in the prompt as ChatGLM3 writes it"
    assert _contains(ids, observation), "the result is not in the prompt as ChatGLM3's observation"


def glm4_prompt_has(folder, ids: list[int], call: dict, result: str) -> None:
    """GLM-4 (glm-4-9b-chat's template): the call as `<|assistant|>{name}` + "\n" + its arguments, the result as
    `<|observation|>` + "\n" + its text."""
    from transformers import AutoTokenizer

    text = AutoTokenizer.from_pretrained(folder).decode(ids)
    assert f"<|assistant|>{call['name']}\n{call['arguments']}<|observation|>\n{result}<|assistant|>" in text, text


@pytest.mark.slow  # over 4 s here: left out of `make test-fast`
@pytest.mark.parametrize("family", ["ChatGLM3", "GLM-4"])
def test_chat_page_draws_a_forced_call_and_goes_on_with_its_result(family, request, env_cleanup, monkeypatch):
    """A tiny random ChatGLM3 or GLM-4: the tool choice names get_weather, so decoding is constrained to a valid
    call; the page draws it as a call, takes the result, and the next prompt has it as the family's observation."""
    from conftest import page_app, shown

    from glm_core.engine.scheduler import Engine
    from ui.resources import get_hub

    folder = request.getfixturevalue("glm3")[0] if family == "ChatGLM3" else request.getfixturevalue("glm4_chat")

    submitted = []
    real_submit = Engine.submit

    def recording_submit(self, conversation_id, messages, params=None, recompute=False, owner=None, output=None):
        submitted.append((self, list(messages), output))
        return real_submit(self, conversation_id, messages, params, recompute, owner, output)

    monkeypatch.setattr(Engine, "submit", recording_submit)
    try:
        at = page_app(timeout=300)
        at.run()
        at.text_input(key="load_path").set_value(str(folder))
        at.selectbox(key="load_precision").set_value("fp32")
        at.button(key="load_button").click().run()
        assert not at.exception and not at.error
        assert f"format ({family})" in shown(" ".join(c.value for c in at.sidebar.caption))  # its tool format
        cid = at.session_state["conversation_id"]
        at.text_area(key=f"tools_text_{cid}").set_value('[{"type": "function", "function": {"name": "a b"}}]').run()
        [error] = at.error  # named by its place; nothing is taken
        assert "tools[0].function.name: expected 1 to 64" in shown(error.value) and "previous tools" in error.value
        assert at.selectbox(key=f"tool_choice_{cid}").disabled
        at.text_area(key=f"tools_text_{cid}").set_value(json.dumps([WEATHER])).run()
        assert not at.error
        at.selectbox(key=f"tool_choice_{cid}").set_value("get_weather")
        at.slider(key="temperature").set_value(0.0)
        at.slider(key="max_new_tokens").set_value(60)
        at.chat_input[0].set_value("What is the weather in Paris?").run()
        assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])

        assert [m.name for m in at.chat_message] == ["user", "assistant", "tool"]
        drawn = at.chat_message[1]
        assert ":material/build: Calls **get\\_weather**" in [md.value for md in drawn.markdown]
        arguments = json.loads(drawn.code[0].value)
        jsonschema.validate(arguments, WEATHER["function"]["parameters"])
        assert drawn.code[0].language == "json"

        store = Store()
        [stored] = store.get_conversations(at.session_state["conversation_workspace"], [cid])
        assert stored.tools == [WEATHER["function"]]  # the draft's tools were stored with its first message
        call = stored.messages[1].tool_calls[0]
        assert call["name"] == "get_weather" and json.loads(call["arguments"]) == arguments
        first_prompt_tokens = stored.messages[1].stats["prompt_tokens"]

        assert at.selectbox(key=f"tool_choice_{cid}").value == "auto"  # a forced choice holds for one turn
        at.selectbox(key=f"tool_choice_{cid}").set_value("none")
        at.slider(key="max_new_tokens").set_value(4)
        at.text_area(key=f"tool_result_{call['id']}").set_value('{"temperature": 21}')
        [send] = [b for b in at.button if b.label == "Send the result"]
        send.click().run()
        assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])
        assert [m.name for m in at.chat_message] == ["user", "assistant", "tool", "assistant"]
        assert at.chat_message[2].code[0].value == '{"temperature": 21}'

        engine, messages, output = submitted[-1]
        assert messages[-1] == {
            "role": "tool",
            "content": '{"temperature": 21}',
            "name": "get_weather",
            "tool_call_id": call["id"],
        }
        ids = engine.encode_chat(messages, output)
        prompt_has = chatglm3_prompt_has if family == "ChatGLM3" else glm4_prompt_has
        prompt_has(folder, ids, call, '{"temperature": 21}')

        [stored] = store.get_conversations(at.session_state["conversation_workspace"], [cid])
        assert [m.role for m in stored.messages] == ["user", "assistant", "tool", "assistant"]
        # the kept cache held the first turn: at least its whole prompt was reused, not computed again
        assert stored.messages[3].stats["reused_tokens"] >= first_prompt_tokens
        markdown = export_conversations([stored], "md").decode()
        assert "**Tool call** `get_weather`" in markdown and "### Tool result (get_weather)" in markdown
    finally:
        get_hub().unload()  # the next page test loads the default again


def _contains(ids: list[int], part: list[int]) -> bool:
    return any(ids[i : i + len(part)] == part for i in range(len(ids) - len(part) + 1))


def test_tools_are_off_for_a_model_not_trained_for_them(glm2, env_cleanup):
    from conftest import page_app

    from ui.resources import get_hub

    try:
        at = page_app(timeout=300)
        at.run()
        at.text_input(key="load_path").set_value(str(glm2[0]))
        at.selectbox(key="load_precision").set_value("fp32")
        at.button(key="load_button").click().run()
        assert not at.exception
        cid = at.session_state["conversation_id"]
        assert at.text_area(key=f"tools_text_{cid}").disabled
        assert any("not trained for tool calls" in c.value for c in at.sidebar.caption)
    finally:
        get_hub().unload()


def test_a_stream_with_tools_holds_back_a_call_and_reads_it_back():
    from glm_core.models.tool_formats import GLM4ToolSyntax
    from glm_core.tool_calls import held_back, read_calls

    tools, syntax = check_tools([WEATHER]), GLM4ToolSyntax()
    call = ["get_", "weather\n", '{"city": ', '"Oslo"}']
    assert list(held_back(call, syntax, tools)) == []  # drawn as a call once it has ended, never as text
    content, calls = read_calls(syntax, "".join(call), tools)
    assert content == "" and [(c["name"], c["arguments"]) for c in calls] == [("get_weather", '{"city": "Oslo"}')]
    assert calls[0]["id"].startswith("call_")
    assert "".join(held_back(["get wet", " today"], syntax, tools)) == "get wet today"
    assert "".join(held_back(["get_", "weather is nice"], syntax, tools)) == "get_weather is nice"
    assert read_calls(None, "get_weather\n{}", tools) == ("get_weather\n{}", [])  # tool choice none: plain text
