"""The conversation store: workspaces isolated in every query, turns, search, restart, interrupted replies."""

import subprocess
import sys
import time

import pytest
from conftest import ROOT

from glm_core.conversations.conversation import STALE_PARTIAL_S, ChatMessage, Conversation
from glm_core.conversations.store import NotFound, Store
from glm_core.conversations.workspace import (
    check_cli_workspace_id,
    is_url_workspace_id,
    new_workspace_id,
    password_matches,
    user_identity,
)

STATS = {
    "prompt_tokens": 7,
    "reused_tokens": 0,
    "prefill_tokens": 7,
    "completion_tokens": 3,
    "queue_s": 0.0,
    "ttft_s": 0.05,
    "decode_tokens_per_s": 30.0,
    "total_s": 0.2,
}


def add_turn(store, workspace, conversation, prompt, reply, keep=None, finish="eos"):
    keep = len(conversation.messages) if keep is None else keep
    _, reply_id, _ = store.begin_turn(
        workspace,
        conversation,
        keep,
        ChatMessage("user", prompt),
        ChatMessage("assistant", "", model="tiny", precision="FP32", params={"temperature": 0.0, "system_prompt": ""}),
    )
    store.finish_reply(workspace, reply_id, reply, STATS, finish, None)
    return store.get_conversation(workspace, conversation.id)


@pytest.fixture
def store(data_dir):
    return Store(data_dir)


def test_turns_are_stored_with_their_figures(store):
    ws = store.create_workspace()
    conversation = add_turn(store, ws, Conversation(), "What is 2 + 2?\nAnswer briefly.", "4")
    assert conversation.title == "What is 2 + 2?"  # first line of the first prompt
    user, reply = conversation.messages
    assert (user.role, user.content, reply.role, reply.content) == (
        "user",
        "What is 2 + 2?\nAnswer briefly.",
        "assistant",
        "4",
    )
    assert reply.stats == STATS and reply.model == "tiny" and reply.precision == "FP32"
    assert reply.params == {"temperature": 0.0, "system_prompt": ""}
    assert reply.finish_reason == "eos" and reply.status == "complete" and not reply.stopped
    assert user.created_at <= reply.created_at <= conversation.updated_at


def test_regenerate_adds_versions_and_edit_starts_a_branch(store):
    ws = store.create_workspace()
    c = add_turn(store, ws, Conversation(), "one", "1")
    c = add_turn(store, ws, c, "two", "2")
    # Regenerate: another reply to the last prompt; the chosen path goes through the new version.
    _, reply_id, created = store.begin_turn(ws, c, 3, None, ChatMessage("assistant", ""))
    assert not created
    store.finish_reply(ws, reply_id, "2 again", STATS, "eos", None)
    c = store.get_conversation(ws, c.id)
    assert [m.content for m in c.messages] == ["one", "1", "two", "2 again"]
    assert [m.content for m in c.versions(c.messages[3])] == ["2", "2 again"] and len(c.tree) == 5
    first_version = c.versions(c.messages[3])[0].id
    assert c.version_switch(c.messages[3]) == (2, 2, first_version, None)
    assert c.version_switch(c.messages[2]) == (1, 1, None, None)
    # Edit the last prompt and resend it: a branch from the first reply.
    c = add_turn(store, ws, c, "three", "3", keep=2)
    assert [m.content for m in c.messages] == ["one", "1", "three", "3"]
    assert [m.content for m in c.versions(c.messages[2])] == ["two", "three"]
    # Flip back to the first branch: it comes back as it was left (its newest reply, chosen last).
    store.choose_version(ws, c.id, c.versions(c.messages[2])[0].id)
    c = store.get_conversation(ws, c.id)
    assert [m.content for m in c.messages] == ["one", "1", "two", "2 again"]
    store.choose_version(ws, c.id, c.versions(c.messages[3])[0].id)
    c = store.get_conversation(ws, c.id)
    assert [m.content for m in c.messages] == ["one", "1", "two", "2"]
    # A turn taken back (nothing came out) leaves the path where it was before.
    prompt_id, reply_id, _ = store.begin_turn(ws, c, 2, ChatMessage("user", "too long"), ChatMessage("assistant", ""))
    store.delete_messages(ws, [reply_id, prompt_id], chosen_before=c.messages[-1].id)
    c = store.get_conversation(ws, c.id)
    assert [m.content for m in c.messages] == ["one", "1", "two", "2"] and len(c.tree) == 7
    prompt_id, reply_id, _ = store.begin_turn(ws, c, 2, ChatMessage("user", "too long"), ChatMessage("assistant", ""))
    store.delete_messages(ws, [reply_id, prompt_id])  # without it: the branch chosen last
    c = store.get_conversation(ws, c.id)
    assert [m.content for m in c.messages] == ["one", "1", "two", "2"] and len(c.tree) == 7
    # Flipping to the other branch and back keeps the version chosen inside each.
    store.choose_version(ws, c.id, c.versions(c.messages[2])[1].id)
    store.choose_version(ws, c.id, c.versions(c.messages[2])[0].id)
    assert [m.content for m in store.get_conversation(ws, c.id).messages] == ["one", "1", "two", "2"]
    # Editing the first prompt makes a second first message.
    c = add_turn(store, ws, c, "zero", "0", keep=0)
    assert [m.content for m in c.messages] == ["zero", "0"]
    assert [m.content for m in c.versions(c.messages[0])] == ["one", "zero"]


def test_a_version_1_database_is_migrated(data_dir):
    import sqlite3

    from glm_core.conversations.store import DB_NAME, MIGRATIONS

    data_dir.mkdir(parents=True)
    db = sqlite3.connect(data_dir / DB_NAME)
    db.executescript(MIGRATIONS[1])
    db.execute("INSERT INTO workspaces VALUES ('w', NULL, 1.0)")
    db.execute("INSERT INTO conversations VALUES ('c1', 'w', 'Old', 1.0, 2.0)")
    for position, (role, text) in enumerate([("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2")]):
        db.execute(
            "INSERT INTO messages (conversation_id, position, role, content, created_at, updated_at, status, "
            "completion_tokens) VALUES ('c1', ?, ?, ?, 1.0, 1.0, 'complete', 3)",
            (position, role, text),
        )
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    store = Store(data_dir)
    c = store.get_conversation("w", "c1")
    assert [m.content for m in c.messages] == ["q1", "a1", "q2", "a2"] and c.messages[3].stats["completion_tokens"] == 3
    assert [m.parent_id for m in c.messages] == [None] + [m.id for m in c.messages[:3]]
    c = add_turn(store, "w", c, "q2 edited", "a2'", keep=2)  # versions work on migrated conversations
    assert [m.content for m in c.versions(c.messages[2])] == ["q2", "q2 edited"]
    assert Store(data_dir).get_conversation("w", "c1").messages == c.messages  # opening it again changes nothing


def test_pin_archive_share_presets_and_settings(store):
    ws, other = store.create_workspace(), store.create_workspace()
    a = add_turn(store, ws, Conversation(), "apples", "red")
    b = add_turn(store, ws, Conversation(), "bananas", "yellow")
    store.set_pinned(ws, a.id, True)
    assert [s.id for s in store.list_conversations(ws)] == [a.id, b.id]  # pinned first
    store.set_archived(ws, b.id, True)
    assert [s.id for s in store.list_conversations(ws, archived=False)] == [a.id]
    assert [s.id for s in store.list_conversations(ws, archived=True)] == [b.id]
    assert len(store.list_conversations(ws)) == 2

    token = store.share(ws, a.id)
    assert store.share(ws, a.id) == token and store.share_token(ws, a.id) == token and len(token) == 32
    assert [m.content for m in store.shared_conversation(token).messages] == ["apples", "red"]
    assert store.list_conversations(ws)[0].shared
    for forged in (None, "", token[:-1], token + "x", "' OR 1=1 --", 42):
        assert store.shared_conversation(forged) is None
    store.revoke_share(ws, a.id)
    assert store.shared_conversation(token) is None and store.share(ws, a.id) != token

    # Another workspace reaches none of it.
    for action in (
        lambda: store.set_pinned(other, a.id, False),
        lambda: store.set_archived(other, a.id, False),
        lambda: store.share(other, a.id),
        lambda: store.choose_version(other, a.id, a.messages[0].id),
    ):
        with pytest.raises(NotFound):
            action()
    store.revoke_share(other, a.id)
    assert store.share_token(ws, a.id) is not None and store.share_token(other, a.id) is None

    assert store.save_preset(ws, "  Terse\n pirate ", "Answer like a pirate, briefly.") == "Terse pirate"
    store.save_preset(ws, "Formal", "Be formal.")
    assert store.list_presets(ws) == {"Formal": "Be formal.", "Terse pirate": "Answer like a pirate, briefly."}
    assert store.list_presets(other) == {}
    with pytest.raises(ValueError):
        store.save_preset(ws, "", "x")
    store.delete_preset(ws, "Formal")
    assert list(store.list_presets(ws)) == ["Terse pirate"]

    store.set_setting(ws, "sampling", {"temperature": 0.3})
    assert store.get_setting(ws, "sampling") == {"temperature": 0.3} and store.get_setting(other, "sampling", {}) == {}


def test_workspaces_are_isolated_in_every_query(store):
    a, b = store.create_workspace(), store.create_workspace()
    c = add_turn(store, a, Conversation(), "secret of A", "only A may read this")
    reply_id = c.messages[1].id
    assert store.get_conversation(b, c.id) is None
    assert store.get_conversations(b) == [] and store.get_conversations(b, [c.id]) == []
    assert store.list_conversations(b) == [] and store.list_conversations(b, "secret") == []
    with pytest.raises(NotFound):
        store.rename_conversation(b, c.id, "taken")
    assert store.delete_conversation(b, c.id) is False
    with pytest.raises(NotFound):
        store.finish_reply(b, reply_id, "overwritten", STATS, "eos", None)
    with pytest.raises(NotFound):
        store.delete_messages(b, [reply_id])
    store.write_partial(b, reply_id, "overwritten")
    with pytest.raises(NotFound):  # B cannot append to A's conversation either
        store.begin_turn(b, c, 2, ChatMessage("user", "hi"), ChatMessage("assistant", ""))
    assert store.get_conversation(a, c.id) == c  # untouched


def test_search_matches_titles_and_text_newest_first(store):
    ws = store.create_workspace()
    old = add_turn(store, ws, Conversation(), "Tell me about apples", "Apples are red or green.")
    new = add_turn(store, ws, Conversation(), "Bananas?", "Yellow, 100% of the time.")
    assert [s.id for s in store.list_conversations(ws)] == [new.id, old.id]
    assert [s.id for s in store.list_conversations(ws, "APPLES")] == [old.id]  # title, any case
    assert [s.id for s in store.list_conversations(ws, "yellow")] == [new.id]  # message text
    assert [s.id for s in store.list_conversations(ws, "100%")] == [new.id]
    assert [s.id for s in store.list_conversations(ws, "%")] == [new.id]
    assert store.list_conversations(ws, "_pples") == []  # LIKE wildcards are taken literally
    store.rename_conversation(ws, old.id, "  Fruit\n notes  ")
    summary = store.list_conversations(ws, "fruit")[0]
    assert summary.title == "Fruit notes" and summary.message_count == 2 and summary.models == ["tiny"]
    assert store.delete_conversation(ws, old.id) and store.get_conversation(ws, old.id) is None


def test_store_survives_a_process_restart(data_dir):
    writer = (
        "import sys; from glm_core.conversations.store import Store; from glm_core.conversations.conversation import ChatMessage, Conversation\n"
        "s = Store(sys.argv[1]); ws = s.create_workspace('restart-test'); c = Conversation()\n"
        "_, r, _ = s.begin_turn(ws, c, 0, ChatMessage('user', 'kept? 😀'), ChatMessage('assistant', ''))\n"
        "s.finish_reply(ws, r, 'kept.', {}, 'eos', None); print(c.id)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", writer, str(data_dir)], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert done.returncode == 0, done.stderr
    conversation = Store(data_dir).get_conversation("restart-test", done.stdout.strip())
    assert [m.content for m in conversation.messages] == ["kept? 😀", "kept."]


def test_partial_reply_is_kept_and_marked_interrupted_after_a_restart(store, data_dir):
    ws = store.create_workspace()
    c = Conversation()
    _, reply_id, _ = store.begin_turn(ws, c, 0, ChatMessage("user", "long answer please"), ChatMessage("assistant", ""))
    store.write_partial(ws, reply_id, "The first half of")
    live = store.get_conversation(ws, c.id).messages[1]
    assert live.status == "partial" and live.content == "The first half of" and not live.is_interrupted()
    assert live.is_interrupted(now=time.time() + STALE_PARTIAL_S + 1)  # its writer stopped writing long ago
    assert Store(data_dir).recover_interrupted() == 1  # what a starting portal does
    after = Store(data_dir).get_conversation(ws, c.id).messages[1]
    assert after.status == "interrupted" and after.content == "The first half of" and after.is_interrupted()
    assert "interrupted" in after.stats_line()


def test_workspace_ids_and_identities():
    ids = {new_workspace_id() for _ in range(100)}
    assert len(ids) == 100 and all(is_url_workspace_id(i) for i in ids)
    for bad in (None, "", "short", "a" * 21, "a" * 23, "../../../etc/passwd!!", "' OR 1=1 --xxxxxxxxxxxx", 42):
        assert not is_url_workspace_id(bad)
    assert check_cli_workspace_id("team-bench_1") == "team-bench_1"
    with pytest.raises(ValueError):
        check_cli_workspace_id("no spaces")
    assert user_identity({"email": "a@x.org"}) is None  # auth not configured
    assert user_identity({"is_logged_in": False}) is None
    assert user_identity({"is_logged_in": True, "sub": "42", "iss": "https://idp"}) == "https://idp|42"
    assert user_identity({"is_logged_in": True, "email": "A@X.org "}) == "email|a@x.org"
    assert password_matches("pässword", "pässword") and not password_matches("password", "pässword")


def test_owner_workspace_is_random_and_stable(store):
    first = store.workspace_for_owner("https://idp|alice")
    assert store.workspace_for_owner("https://idp|alice") == first
    assert store.workspace_for_owner("https://idp|bob") != first
    assert is_url_workspace_id(first) and store.workspace_owner(first) == "https://idp|alice"


def test_a_version_1_file_is_migrated_and_conversations_remember_their_backend(tmp_path):
    """Databases written before conversations had a backend open as before: the column is added, NULL = default."""
    import sqlite3

    from glm_core.conversations import store as store_module

    db = sqlite3.connect(tmp_path / store_module.DB_NAME)
    db.executescript(store_module.MIGRATIONS[1])
    db.execute("PRAGMA user_version=1")
    db.execute("INSERT INTO workspaces (id, owner, created_at) VALUES ('ws1', NULL, 1)")
    db.execute(
        "INSERT INTO conversations (id, workspace, title, created_at, updated_at) VALUES ('c1', 'ws1', 'Old', 1, 1)"
    )
    db.commit()
    db.close()

    store = Store(tmp_path)
    store2 = Store(tmp_path)  # a second open finds it migrated
    with sqlite3.connect(store.path) as check:
        assert check.execute("PRAGMA user_version").fetchone()[0] == store_module.SCHEMA_VERSION
    old = store2.get_conversation("ws1", "c1")
    assert old.title == "Old" and old.backend is None
    store.set_backend("ws1", "c1", "glm4")
    assert store.get_conversation("ws1", "c1").backend == "glm4"
    assert store.list_conversations("ws1")[0].backend == "glm4"
    with pytest.raises(NotFound):
        store.set_backend("other-ws", "c1", "glm4")

    # A new conversation stores the backend it was started with.
    conversation = Conversation(backend="vllm")
    store.begin_turn("ws1", conversation, 0, ChatMessage("user", "hi"), ChatMessage("assistant", ""))
    assert store.get_conversation("ws1", conversation.id).backend == "vllm"
