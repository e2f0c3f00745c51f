"""Export and import: the JSON round trip, every export format, the accepted import formats, and rejected files."""

import csv
import io
import json

import pytest

from glm_core.conversations.conversation import ChatMessage, Conversation
from glm_core.conversations.exchange import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MAX_IMPORT_BYTES,
    ImportRejected,
    export_conversations,
    export_file_name,
    import_file,
    parse_import,
    spreadsheet_safe,
)
from glm_core.conversations.store import Store

HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)><b>bold?</b> & &amp;'
CODE = "Here is code:\n\n```python\ndef f(x):\n    return x ** 2  # <- square\n```\n\nDone."
MARKDOWN = (
    "# Heading\n\n- item *one*\n- item **two**\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n> quote, \"quoted\", 'single'"
)
UNICODE = "Ünïcødé: 你好，世界 · Здравствуй · مرحبا · 🦙🚀👩‍💻 · \u200b zero-width · tab\there · CRLF\r\nend"
LONG = ("A very long message. " * 25_000) + "THE END"  # about 525,000 characters

STATS = {
    "prompt_tokens": 12,
    "reused_tokens": 4,
    "prefill_tokens": 8,
    "completion_tokens": 5,
    "queue_s": 0.0,
    "ttft_s": 0.012,
    "decode_tokens_per_s": 41.5,
    "total_s": 0.2,
}
PARAMS = {
    "max_length": 8192,
    "max_new_tokens": 64,
    "temperature": 0.0,
    "top_p": 0.8,
    "top_k": 0,
    "repetition_penalty": 1.0,
    "seed": None,
    "system_prompt": "Be terse.",
}


def store_conversation(store, ws, title, messages):
    [new_id] = store.import_conversations(ws, [Conversation(title=title, messages=messages)])
    return new_id


def reply(text, **extra):
    return ChatMessage(
        "assistant",
        text,
        model="SmolLM2-135M-Instruct",
        precision="FP32",
        params=PARAMS,
        stats=STATS,
        finish_reason=extra.pop("finish_reason", "eos"),
        **extra,
    )


@pytest.fixture
def store(data_dir):
    return Store(data_dir)


@pytest.fixture
def filled(store):
    """A workspace with conversations full of what breaks exporters: HTML, code, Markdown, unicode, a long text."""
    ws = store.create_workspace()
    store_conversation(
        store,
        ws,
        "Tricky <b>title</b> 🦙",
        [
            ChatMessage("system", "You are terse."),
            ChatMessage("user", HOSTILE),
            reply(CODE),
            ChatMessage("user", MARKDOWN),
            reply(UNICODE),
            ChatMessage("user", "Stop early please"),
            reply("I was cut", finish_reason="stopped"),
            ChatMessage("user", "Now a long one"),
            reply(LONG, finish_reason="length"),
        ],
    )
    store_conversation(
        store,
        ws,
        "Second",
        [
            ChatMessage("user", "q1"),
            reply("a1"),
            ChatMessage("user", "q2"),
            reply("", status="interrupted", finish_reason=None),
            ChatMessage("user", "q3"),
            reply("a3", error="generation failed: boom", finish_reason="error"),
        ],
    )
    return ws


def comparable(conversations):
    """What a round trip must keep: everything except ids and times."""
    return [
        (
            c.title,
            [
                (m.role, m.content, m.status, m.finish_reason, m.error, m.model, m.precision, m.params, m.stats)
                for m in c.messages
            ],
        )
        for c in conversations
    ]


def test_json_round_trip_into_an_empty_workspace_is_identical(store, filled):
    original = store.get_conversations(filled)
    data = export_conversations(original, "json")
    target = store.create_workspace()
    assert store.list_conversations(target) == []
    ids = import_file(store, target, data)
    assert len(ids) == 2 and not set(ids) & {c.id for c in original}  # new ids
    imported = store.get_conversations(target)
    assert comparable(imported) == comparable(original)
    tricky = next(c for c in imported if c.title.startswith("Tricky"))
    assert tricky.messages[-1].content == LONG
    # Times are kept too (to the microsecond of the ISO format).
    assert all(abs(a.created_at - b.created_at) < 1e-5 for a, b in zip(imported, original))
    # And the export of the import is the same document, ids and times aside.
    again = json.loads(export_conversations(imported, "json"))
    first = json.loads(data)
    for doc in (again, first):
        doc.pop("exported_at")
        for c in doc["conversations"]:
            c.pop("id"), c.pop("created_at"), c.pop("updated_at")
            for m in c["messages"]:
                m.pop("created_at")
    assert again == first


def test_versions_travel_in_json_and_the_chosen_path_in_the_other_formats(store):
    ws = store.create_workspace()
    c = store.get_conversation(
        ws,
        store_conversation(
            store,
            ws,
            "Versions",
            [ChatMessage("user", "q"), reply("first answer"), ChatMessage("user", "more?"), reply("more")],
        ),
    )
    _, second, _ = store.begin_turn(ws, c, 1, None, ChatMessage("assistant", ""))  # regenerate the first answer
    store.finish_reply(ws, second, "second answer", STATS, "eos", None)
    c = store.get_conversation(ws, c.id)
    assert [m.content for m in c.messages] == ["q", "second answer"] and len(c.tree) == 5

    document = json.loads(export_conversations([c], "json"))
    [exported] = document["conversations"]
    assert document["version"] == 3 and len(exported["messages"]) == 5
    assert [(m["id"], m["parent"]) for m in exported["messages"]] == [(1, None), (2, 1), (3, 2), (4, 3), (5, 1)]
    assert exported["chosen"] == 5
    for fmt in ("md", "csv", "html", "jsonl"):
        text = export_conversations([c], fmt).decode()
        assert "second answer" in text and "first answer" not in text and "more?" not in text

    [copy] = import_file(store, ws, json.dumps(document).encode())
    imported = store.get_conversation(ws, copy)
    assert [m.content for m in imported.messages] == ["q", "second answer"]
    assert [m.content for m in imported.versions(imported.messages[1])] == ["first answer", "second answer"]
    store.choose_version(ws, copy, imported.messages[1].parent_id + 1)  # the first answer, and its follow-up
    assert [m.content for m in store.get_conversation(ws, copy).messages] == ["q", "first answer", "more?", "more"]


def test_the_backend_a_conversation_talks_to_travels_in_json(store):
    ws = store.create_workspace()
    remote = store_conversation(store, ws, "On vLLM", [ChatMessage("user", "q"), reply("a")])
    store.set_backend(ws, remote, "vllm-a100")
    store_conversation(store, ws, "On the default", [ChatMessage("user", "q"), reply("a")])
    data = export_conversations(store.get_conversations(ws), "json")
    target = store.create_workspace()
    import_file(store, target, data)
    assert {c.title: c.backend for c in store.get_conversations(target)} == {
        "On vLLM": "vllm-a100",
        "On the default": None,
    }


def test_version_1_exports_still_import(store):
    ws = store.create_workspace()
    [cid] = import_file(
        store,
        ws,
        own(
            conversations=[
                {
                    "title": "old",
                    "created_at": "2025-01-01T00:00:00Z",
                    "messages": [
                        {"role": "user", "content": "q1", "created_at": "2025-01-01T00:00:00Z"},
                        {"role": "assistant", "content": "a1", "created_at": "2025-01-01T00:00:00Z", "stats": STATS},
                    ],
                }
            ]
        ),
    )
    c = store.get_conversation(ws, cid)
    assert [m.content for m in c.messages] == ["q1", "a1"] and c.messages[1].parent_id == c.messages[0].id


def test_markdown_export_keeps_text_and_closes_open_fences(store, filled):
    conversations = store.get_conversations(filled)
    text = export_conversations(conversations, "md").decode("utf-8")
    assert (
        "# Tricky <b>title</b> 🦙" in text
        and CODE in text
        and UNICODE.replace("\r\n", "\n") in text.replace("\r\n", "\n")
    )
    assert "### Assistant (SmolLM2-135M-Instruct, FP32)" in text and "stopped" in text and "interrupted" in text
    open_fence = Conversation(
        title="t", messages=[ChatMessage("user", "```python\nprint(1)"), ChatMessage("user", "after")]
    )
    md = export_conversations([open_fence], "md").decode()
    assert md.count("```") == 2 and md.index("after") > md.rindex("```")


def test_csv_export_has_one_row_per_message_with_exact_text(store, filled):
    conversations = store.get_conversations(filled)
    csv.field_size_limit(2**30)  # the long message is one field of about 525,000 characters
    rows = list(csv.DictReader(io.StringIO(export_conversations(conversations, "csv").decode("utf-8"), newline="")))
    assert len(rows) == sum(len(c.messages) for c in conversations) == 15
    assert [r["content"] for r in rows] == [spreadsheet_safe(m.content) for c in conversations for m in c.messages]
    stopped = next(r for r in rows if r["content"] == "I was cut")
    assert (
        stopped["stopped"] == "True"
        and stopped["finish_reason"] == "stopped"
        and stopped["model"] == "SmolLM2-135M-Instruct"
    )
    assert (
        stopped["temperature"] == "0.0"
        and stopped["system_prompt"] == "Be terse."
        and stopped["completion_tokens"] == "5"
    )
    assert stopped["decode_tokens_per_s"] == "41.5" and stopped["conversation_title"] == "Tricky <b>title</b> 🦙"


def test_csv_export_keeps_formulas_from_running_in_a_spreadsheet(store):
    ws = store.create_workspace()
    store_conversation(
        store,
        ws,
        "=1+1",
        [
            ChatMessage("user", '=HYPERLINK("http://x","y")'),
            reply("-2+3"),
            ChatMessage("user", "@SUM(A1)"),
            reply("a normal reply"),
        ],
    )
    rows = list(csv.DictReader(io.StringIO(export_conversations(store.get_conversations(ws), "csv").decode())))
    assert [r["content"] for r in rows] == ['\'=HYPERLINK("http://x","y")', "'-2+3", "'@SUM(A1)", "a normal reply"]
    assert rows[0]["conversation_title"] == "'=1+1" and rows[0]["position"] == "0"


def test_html_export_escapes_everything_and_runs_no_script(store, filled):
    html = export_conversations(store.get_conversations(filled), "html").decode("utf-8")
    assert html.startswith("<!DOCTYPE html>")
    assert "<script" not in html.lower() and "<img" not in html.lower() and "<b>" not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html and "&amp;amp;" in html
    assert "Tricky &lt;b&gt;title&lt;/b&gt; 🦙" in html and "你好，世界" in html and "THE END" in html
    assert "default-src 'none'" in html  # and a policy that forbids scripts if anything slipped through


def test_chatglm_jsonl_has_history_pairs_and_only_finished_replies(store, filled):
    lines = export_conversations(store.get_conversations(filled), "jsonl").decode("utf-8").splitlines()
    samples = [json.loads(line) for line in lines]
    assert all(set(s) == {"prompt", "response", "history"} for s in samples)
    tricky = [s for s in samples if s["prompt"] in (HOSTILE, MARKDOWN, "Now a long one")]
    assert [s["history"] for s in tricky] == [
        [],
        [[HOSTILE, CODE]],
        [[HOSTILE, CODE], [MARKDOWN, UNICODE], ["Stop early please", "I was cut"]],
    ]
    assert tricky[0]["response"] == CODE and tricky[2]["response"] == LONG
    prompts = [s["prompt"] for s in samples]
    assert (
        "Stop early please" not in prompts and "q2" not in prompts and "q3" not in prompts
    )  # stopped, interrupted, failed
    assert prompts.count("q1") == 1


def test_export_file_names():
    one = [Conversation(title="Hello, <World>! 🦙")]
    assert export_file_name(one, "md") == "hello-world.md"
    assert export_file_name(one * 2, "jsonl").startswith("conversations-") and export_file_name(
        one * 2, "jsonl"
    ).endswith(".jsonl")


def test_import_openai_messages_and_chatglm_history(store):
    ws = store.create_workspace()
    openai = {
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
            {"role": "assistant", "content": "Hello!"},
        ]
    }
    [cid] = import_file(store, ws, json.dumps(openai).encode())
    c = store.get_conversation(ws, cid)
    assert [(m.role, m.content) for m in c.messages] == [
        ("system", "Be brief."),
        ("user", "Hi there"),
        ("assistant", "Hello!"),
    ]
    assert c.title == "Hi there"
    # A list of such objects gives one conversation each; a bare list of messages gives one.
    assert len(import_file(store, ws, json.dumps([openai, {**openai, "title": "Named"}]).encode())) == 2
    assert "Named" in [s.title for s in store.list_conversations(ws)]
    assert len(import_file(store, ws, json.dumps(openai["messages"]).encode())) == 1
    [pairs_id] = import_file(
        store, ws, json.dumps([["你好", "你好👋！"], ["What is 1+1?", "2"]], ensure_ascii=False).encode()
    )
    pairs = store.get_conversation(ws, pairs_id)
    assert [m.content for m in pairs.messages] == ["你好", "你好👋！", "What is 1+1?", "2"]
    assert [m.role for m in pairs.messages] == ["user", "assistant"] * 2
    [sample_id] = import_file(
        store, ws, json.dumps({"prompt": "q2", "response": "a2", "history": [["q1", "a1"]]}).encode()
    )
    assert [m.content for m in store.get_conversation(ws, sample_id).messages] == ["q1", "a1", "q2", "a2"]


def own(**change):
    doc = {
        "format": FORMAT_NAME,
        "version": 1,
        "conversations": [
            {
                "title": "ok",
                "created_at": "2026-01-01T00:00:00+00:00",
                "messages": [{"role": "user", "content": "fine", "created_at": "2026-01-01T00:00:00+00:00"}],
            }
        ],
    }
    doc.update(change)
    return json.dumps(doc).encode()


def bad_second_conversation():
    doc = json.loads(own())
    doc["conversations"].append(
        {
            "title": "bad",
            "created_at": "2026-01-01T00:00:00Z",
            "messages": [{"role": "tool", "content": "x", "created_at": "2026-01-01T00:00:00Z"}],
        }
    )
    return json.dumps(doc).encode()


REJECTED = [
    (b"", "empty"),
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe\x00garbage", "not UTF-8"),
    (b'{"format": "glm-chat-dashboard/conversations", "version": 1, "conversations": [NaN]}', "NaN"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"foo": 1}', "not a format we import"),
    (b"42", "not a format we import"),
    (own(version=FORMAT_VERSION + 1), "version"),
    (
        own(
            version=2,
            conversations=[
                {
                    "title": "t",
                    "created_at": "2026-01-01T00:00:00Z",
                    "messages": [
                        {"id": 1, "role": "user", "content": "q", "created_at": "2026-01-01T00:00:00Z"},
                        {
                            "id": 2,
                            "parent": 3,
                            "role": "assistant",
                            "content": "a",
                            "created_at": "2026-01-01T00:00:00Z",
                        },
                    ],
                }
            ],
        ),
        "conversations[0].messages[1].parent: expected null or the id of a message before this one",
    ),
    (
        own(
            version=2,
            conversations=[
                {
                    "title": "t",
                    "created_at": "2026-01-01T00:00:00Z",
                    "chosen": 9,
                    "messages": [{"id": 1, "role": "user", "content": "q", "created_at": "2026-01-01T00:00:00Z"}],
                }
            ],
        ),
        "conversations[0].chosen",
    ),
    (
        own(
            version=2,
            conversations=[
                {
                    "title": "t",
                    "created_at": "2026-01-01T00:00:00Z",
                    "messages": [
                        {"id": 1, "role": "user", "content": "q", "created_at": "2026-01-01T00:00:00Z"},
                        {
                            "id": 1,
                            "parent": 1,
                            "role": "assistant",
                            "content": "a",
                            "created_at": "2026-01-01T00:00:00Z",
                        },
                    ],
                }
            ],
        ),
        "conversations[0].messages[1].id: expected a whole number, distinct",
    ),
    (
        own(
            version=2,
            conversations=[{"title": "t", "created_at": "2026-01-01T00:00:00Z", "backend": "<b>x</b>", "messages": []}],
        ),
        "conversations[0].backend: a backend name is 1-40 letters",
    ),
    (
        own(
            version=2,
            conversations=[{"title": "t", "created_at": "2026-01-01T00:00:00Z", "backend": 7, "messages": []}],
        ),
        "conversations[0].backend: expected a backend name, got int",
    ),
    (own(format="something-else"), "format"),
    (own(conversations={"a": 1}), "conversations: expected a list"),
    (
        bad_second_conversation(),
        "conversations[1].messages[0].role: a tool result must follow an assistant message with tool_calls",
    ),
    (json.dumps({"messages": [{"role": "user"}]}).encode(), "[0].content: expected text, got null"),
    (
        json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}).encode(),
        "only text parts can be imported",
    ),
    (json.dumps({"messages": []}).encode(), "no messages"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "title": "t" * 201}).encode(), "at most 200"),
    (json.dumps([["q", "a"], ["only a question"]]).encode(), "[1]: expected a [question, answer] pair"),
    (
        json.dumps(
            {
                "format": FORMAT_NAME,
                "version": 1,
                "conversations": [{"title": "x", "created_at": "yesterday", "messages": []}],
            }
        ).encode(),
        "conversations[0].created_at: not an ISO 8601 time",
    ),
]


@pytest.mark.parametrize("data,reason", REJECTED, ids=[r for _, r in REJECTED])
def test_bad_files_are_rejected_with_the_reason_and_change_nothing(store, filled, data, reason):
    before = store.get_conversations(filled)
    with pytest.raises(ImportRejected) as excinfo:
        import_file(store, filled, data)
    assert reason in str(excinfo.value)
    assert store.get_conversations(filled) == before


def test_oversized_file_is_refused_unparsed(store):
    ws = store.create_workspace()
    data = b'{"messages": [{"role": "user", "content": "' + b"x" * MAX_IMPORT_BYTES + b'"}]}'
    with pytest.raises(ImportRejected, match="MiB; at most 20 MiB"):
        parse_import(data)
    assert store.list_conversations(ws) == []
