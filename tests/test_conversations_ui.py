"""The chat page's conversation list, regenerate and edit, the Conversations page, workspaces and access, through
Streamlit's AppTest, on the tiny random model (fast: these test the pages and the store, not the model)."""

import datetime
import json

import pytest
from conftest import HOME, open_page, page_app, shown
from streamlit.runtime.media_file_manager import MediaFileManager
from streamlit.testing.v1 import AppTest

from glm_core.conversations.conversation import ChatMessage, Conversation
from glm_core.conversations.exchange import FORMAT_NAME
from glm_core.conversations.store import Store
from ui.resources import get_hub

CONVERSATIONS = "Conversations"
HOSTILE = '<script>alert("pwned")</script><img src=x onerror=alert(1)> <b>bold?</b>'


@pytest.fixture
def tiny_env(env_cleanup, tiny_model_dir, data_dir):
    """The pages load the configured model when the process-wide hub holds none; hand it back afterwards, so
    other tests get the default model again."""
    hub = get_hub()
    if hub.engine is not None and hub.engine.spec.path != str(tiny_model_dir):
        hub.unload()
    env_cleanup.setenv("GLM_MODEL_PATH", str(tiny_model_dir))
    env_cleanup.setenv("GLM_PRECISION", "fp32")
    yield data_dir
    hub.unload()


def chat(at: AppTest, text: str) -> AppTest:
    at.chat_input[0].set_value(text).run()
    assert not at.exception, at.exception
    return at


def short_replies(at: AppTest) -> AppTest:
    at.slider(key="max_new_tokens").set_value(6).run()
    at.slider(key="temperature").set_value(0.0).run()
    return at


def listed(at: AppTest) -> list[str]:
    """Conversation ids in the sidebar, in order."""
    return [b.key.removeprefix("open_") for b in at.sidebar.button if b.key and b.key.startswith("open_")]


def workspace_of(at: AppTest) -> str:
    return at.query_params["ws"]


@pytest.fixture
def store(tiny_env):
    return Store(tiny_env)


def test_new_switch_rename_delete_and_search_in_the_sidebar(store):
    at = short_replies(open_page())
    chat(at, "Tell me about apples")
    ws = workspace_of(at)
    [apples] = store.list_conversations(ws)
    assert apples.title == "Tell me about apples" and apples.message_count == 2
    assert listed(at) == [apples.id] and at.query_params["c"] == apples.id
    assert [m.name for m in at.chat_message] == ["user", "assistant"]

    at.button(key="new_conversation").click().run()
    assert len(at.chat_message) == 0 and "c" not in at.query_params
    chat(at, "And bananas?")
    bananas = store.list_conversations(ws)[0]
    assert bananas.title == "And bananas?" and listed(at) == [bananas.id, apples.id]  # newest first

    at.button(key=f"open_{apples.id}").click().run()
    assert at.chat_message[0].markdown[0].value == "Tell me about apples" and at.query_params["c"] == apples.id

    at.text_input(key="conversation_search").set_value("banana").run()
    assert listed(at) == [bananas.id]
    at.text_input(key="conversation_search").set_value("no such thing").run()
    assert listed(at) == [] and "Nothing matches." in at.sidebar.caption.values
    at.text_input(key="conversation_search").set_value("").run()

    at.text_input(key=f"title_{apples.id}").set_value("Fruit 🍎 [notes](http://x) *").run()
    at.button(key="rename_conversation").click().run()
    assert store.get_conversation(ws, apples.id).title == "Fruit 🍎 [notes](http://x) *"
    assert at.button(key=f"open_{apples.id}").label == r"Fruit 🍎 \[notes\]\(http\://x\) \*"  # shown as typed
    at.text_input(key="conversation_search").set_value("fruit").run()
    assert listed(at) == [apples.id]
    at.text_input(key="conversation_search").set_value("").run()

    at.button(key="delete_conversation").click().run()
    assert "will be deleted" in " ".join(at.markdown.values)  # the confirmation dialog
    at.button(key="cancel_delete").click().run()
    assert store.get_conversation(ws, apples.id) is not None and not any(b.key == "confirm_delete" for b in at.button)
    at.button(key="delete_conversation").click().run()
    at.button(key="confirm_delete").click().run()
    assert store.get_conversation(ws, apples.id) is None and listed(at) == [bananas.id]
    assert len(at.chat_message) == 0  # the current conversation was deleted: a new one is started


def test_sidebar_changes_that_cannot_be_stored_say_why_and_change_nothing(store, monkeypatch):
    from glm_core.conversations.store import NotFound, StorageError

    at = short_replies(open_page())
    chat(at, "Tell me about apples")
    [apples] = store.list_conversations(workspace_of(at))

    def full(*args):
        raise StorageError("the conversation store could not be written: database or disk is full")

    monkeypatch.setattr(Store, "rename_conversation", full)
    monkeypatch.setattr(Store, "set_pinned", full)  # bound into the Pin button's callback when the page draws
    at.text_input(key=f"title_{apples.id}").set_value("New title").run()
    at.button(key="rename_conversation").click().run()
    assert not at.exception and "disk is full" in at.sidebar.error[0].value
    at.button(key="pin_conversation").click().run()
    assert not at.exception and "Nothing was changed" in at.sidebar.error[0].value

    def gone(*args):
        raise NotFound("no such conversation in this workspace")

    monkeypatch.setattr(Store, "delete_conversation", gone)
    at.button(key="delete_conversation").click().run()
    at.button(key="confirm_delete").click().run()
    assert not at.exception and "no such conversation" in at.error[0].value
    monkeypatch.undo()
    assert store.get_conversation(workspace_of(at), apples.id).title == "Tell me about apples"
    assert not store.get_conversation(workspace_of(at), apples.id).pinned
    assert at.query_params["c"] == apples.id and len(at.chat_message) == 2  # still open, nothing lost


def test_switching_back_resumes_the_kept_cache(store):
    at = short_replies(open_page())
    chat(at, "First conversation")
    first = at.query_params["c"]
    at.button(key="new_conversation").click().run()
    chat(at, "Second conversation")
    at.button(key=f"open_{first}").click().run()
    chat(at, "Back to the first")
    reply = store.get_conversation(workspace_of(at), first).messages[-1]
    assert reply.stats["reused_tokens"] > 0  # the engine kept this conversation's cache under its stored id
    assert at.chat_message[-1].caption[0].value.startswith("prompt")
    assert "(0 from cache)" not in shown(at.chat_message[-1].caption[0].value)


def test_regenerate_adds_a_version_and_edit_starts_a_branch(store):
    at = short_replies(open_page())
    chat(at, "Say something")
    chat(at, "Say more")
    ws, cid = workspace_of(at), at.query_params["c"]
    before = store.get_conversation(ws, cid).messages
    at.button(key=f"regenerate_{before[3].id}").click().run()
    after = store.get_conversation(ws, cid).messages
    assert [m.content for m in after[:3]] == [m.content for m in before[:3]] and len(after) == 4
    assert after[3].id != before[3].id and after[3].content == before[3].content  # greedy: the same reply again
    # The cache rolled back to the end of the prompt, and the logits kept there gave the first token: all of the
    # prompt came from it.
    assert after[3].stats["reused_tokens"] == after[3].stats["prompt_tokens"]
    # The old reply is kept as version 1 of 2.
    assert at.chat_message[3].caption[-1].value == "2/2" and at.button(key=f"next_{after[3].id}").disabled
    at.button(key=f"previous_{after[3].id}").click().run()
    assert (
        store.get_conversation(ws, cid).messages[3].id == before[3].id and at.chat_message[3].caption[-1].value == "1/2"
    )
    assert at.get("code")[-1].value == before[3].content  # the copy button's text: the reply as written

    # Edit the first prompt: a branch from the start; the whole first branch stays.
    at.button(key=f"edit_{before[0].id}").click().run()
    assert at.text_area(key="edit_text").value == "Say something"
    at.text_area(key="edit_text").set_value("Say less").run()
    at.button(key="edit_send").click().run()
    edited = store.get_conversation(ws, cid)
    assert [m.content for m in edited.messages][0] == "Say less" and len(edited.messages) == 2
    assert [m.markdown[0].value for m in at.chat_message] == ["Say less", edited.messages[1].content]
    at.button(key=f"previous_{edited.messages[0].id}").click().run()
    back = store.get_conversation(ws, cid).messages
    assert [m.content for m in back][:3] == ["Say something", before[1].content, "Say more"] and back[3].id == before[
        3
    ].id
    assert len(at.chat_message) == 4 and at.chat_message[0].caption[-1].value == "1/2"


def test_a_prompt_too_long_is_handed_back_and_nothing_is_stored(store):
    at = short_replies(open_page())
    at.number_input(key="max_length").set_value(64).run()
    chat(at, "Tell me about this. " * 40)
    assert any("too long" in e.value for e in at.error)
    assert any(("Tell me about this. " * 40).strip() in c.value for c in at.code)
    assert store.list_conversations(workspace_of(at)) == [] and len(at.chat_message) == 0


@pytest.mark.slow  # over 4 s here: left out of `make test-fast`
def test_workspace_stays_in_the_url_and_workspaces_are_isolated(store):
    a = short_replies(open_page())
    chat(a, "Private to A")
    ws_a, conversation_a = workspace_of(a), a.query_params["c"]
    assert len(ws_a) == 22

    # A refresh or a bookmark: the same URL opens the same workspace and conversation.
    again = open_page(ws=ws_a, c=conversation_a)
    assert workspace_of(again) == ws_a and listed(again) == [conversation_a]
    assert again.chat_message[0].markdown[0].value == "Private to A"

    # Another browser gets another workspace, and cannot open A's conversation by its id.
    b = open_page(c=conversation_a)
    ws_b = workspace_of(b)
    assert ws_b != ws_a and listed(b) == [] and len(b.chat_message) == 0 and "c" not in b.query_params
    page_b = open_page(CONVERSATIONS, ws=ws_b, c=conversation_a)
    assert workspace_of(page_b) == ws_b and not page_b.dataframe and not page_b.download_button

    # Malformed or unknown workspace ids get a fresh workspace, never A's data.
    for forged in (
        "",
        "x",
        ws_a + "x",
        ws_a[:-1],
        ws_a.lower() if ws_a.lower() != ws_a else ws_a.upper(),
        "' OR '1'='1' --",
        "../../data/conversations.sqlite3",
        "%",
        "A" * 22,
    ):
        for page in (HOME, CONVERSATIONS):
            at = open_page(page, ws=forged, c=conversation_a)
            assert workspace_of(at) not in (ws_a, forged)  # unknown ids too: a fresh workspace
            assert listed(at) == [] and len(at.chat_message) == 0 and not at.dataframe
            assert "Private to A" not in json.dumps([m.value for m in at.markdown])
    assert {s.title for s in store.list_conversations(ws_a)} == {"Private to A"}


def test_signed_in_users_get_their_own_workspace_and_the_url_cannot_reach_it(store):
    alice = {"is_logged_in": True, "sub": "alice-123", "iss": "https://idp.example", "email": "alice@example.com"}
    bob = {"is_logged_in": True, "sub": "bob-456", "iss": "https://idp.example", "email": "bob@example.com"}
    at = short_replies(open_page(user=alice))
    assert "ws" not in at.query_params
    chat(at, "Alice's secret")
    ws_alice = store.workspace_for_owner("https://idp.example|alice-123")
    assert [s.title for s in store.list_conversations(ws_alice)] == ["Alice's secret"]
    # Alice again, from any URL: her workspace. Bob, even with Alice's workspace in the URL: his own, empty.
    assert len(listed(open_page(user=alice, ws="A" * 22))) == 1
    assert listed(open_page(user=bob, ws=ws_alice)) == []
    assert not open_page(CONVERSATIONS, user=bob, ws=ws_alice).dataframe
    # Without auth, a signed-in user's workspace id in the URL opens nothing.
    assert listed(open_page(ws=ws_alice)) == []
    # Signed out: nothing but the sign-in button.
    out = open_page(user={"is_logged_in": False})
    assert [b.key for b in out.button] == ["sign_in"] and not out.chat_input and not listed(out)


def test_access_password_is_asked_before_anything_is_shown(store):
    at = open_page(secrets={"access_password": "open sesame"})
    assert not at.chat_input and not at.sidebar.button and "ws" not in at.query_params
    at.text_input(key="access_password_input").set_value("wrong")
    at.button(key="access_submit").click().run()
    assert [e.value for e in at.error] == ["Wrong password."] and not at.chat_input
    at.text_input(key="access_password_input").set_value("open sesame")
    at.button(key="access_submit").click().run()
    assert not at.exception and at.chat_input and "ws" in at.query_params
    page = open_page(CONVERSATIONS, secrets={"access_password": "open sesame"})
    assert [t.key for t in page.text_input] == ["access_password_input"] and not page.file_uploader


def hostile_workspace(store) -> tuple[str, str]:
    ws = store.create_workspace()
    [cid] = store.import_conversations(
        ws,
        [
            Conversation(
                title=HOSTILE,
                messages=[
                    ChatMessage("user", HOSTILE),
                    ChatMessage("assistant", "Reply with " + HOSTILE, model="m", precision="FP32"),
                    ChatMessage("user", "cut short"),
                    ChatMessage("assistant", "The first half", status="partial"),
                ],
            )
        ],
    )
    store.recover_interrupted()
    return ws, cid


def markdown_like(at: AppTest):
    return [*at.markdown, *at.caption]


def test_html_in_messages_and_titles_renders_as_text_on_every_page(store):
    ws, cid = hostile_workspace(store)
    home = open_page(ws=ws, c=cid)
    assert [m.markdown[0].value for m in home.chat_message][:2] == [HOSTILE, "Reply with " + HOSTILE]
    conversations = open_page(CONVERSATIONS, ws=ws)
    assert conversations.dataframe[0].value["Title"].tolist() == [HOSTILE]
    for at in (home, conversations):
        elements = markdown_like(at)
        assert elements and not any(e.proto.allow_html for e in elements)  # never rendered as HTML
        assert not at.get("html")
    # In captions (the title under the page's heading) every Markdown special is escaped, so the title shows as
    # typed: no tag, link or emphasis survives as markup.
    assert '\\<script\\>alert\\("pwned"\\)' in " ".join(c.value for c in home.caption)
    # The interrupted reply is kept and marked.
    assert "interrupted" in home.chat_message[3].caption[0].value
    assert home.chat_message[3].markdown[0].value == "The first half"


@pytest.fixture
def downloads(monkeypatch):
    """What each download button would send: the page builds exports on click (deferred), so record the
    callables Streamlit registers, by file name, and call them as Streamlit's server would."""
    registered = {}
    original = MediaFileManager.add_deferred

    def record(self, data_callable, mimetype, coordinates, file_name=None, **kwargs):
        registered[file_name] = (data_callable, mimetype)
        return original(self, data_callable, mimetype, coordinates, file_name=file_name, **kwargs)

    monkeypatch.setattr(MediaFileManager, "add_deferred", record)
    return registered


def test_conversations_page_filters_and_exports(store, downloads):
    ws = store.create_workspace()
    store.import_conversations(
        ws,
        [
            Conversation(
                title="Apples",
                created_at=1_600_000_000,
                updated_at=1_600_000_000,
                messages=[
                    ChatMessage("user", "apples?", created_at=1_600_000_000),
                    ChatMessage("assistant", "red", model="SmolLM2", precision="BF16", created_at=1_600_000_000),
                ],
            ),
            Conversation(
                title="Bananas",
                messages=[
                    ChatMessage("user", "bananas?"),
                    ChatMessage("assistant", "yellow", model="ChatGLM3-6B", precision="INT4"),
                ],
            ),
        ],
    )
    at = open_page(CONVERSATIONS, ws=ws)
    assert at.dataframe[0].value["Title"].tolist() == ["Bananas", "Apples"]
    at.text_input(key="filter_search").set_value("yellow").run()
    assert at.dataframe[0].value["Title"].tolist() == ["Bananas"]
    at.text_input(key="filter_search").set_value("").run()
    at.multiselect(key="filter_models").set_value(["SmolLM2"]).run()
    assert at.dataframe[0].value["Title"].tolist() == ["Apples"]
    at.multiselect(key="filter_models").set_value([]).run()
    at.date_input(key="filter_since").set_value(datetime.date(2021, 1, 1)).run()
    assert at.dataframe[0].value["Title"].tolist() == ["Bananas"]
    downloads.clear()
    at.date_input(key="filter_since").set_value(None).run()

    # Nothing chosen: every listed conversation is exported, in each format.
    assert sorted(b.key for b in at.download_button) == sorted(
        f"export_{f}" for f in ("json", "md", "csv", "html", "jsonl")
    )
    names = {name.rsplit(".", 1)[1]: name for name in downloads}
    build, mime = downloads[names["json"]]
    document = json.loads(build())
    assert mime == "application/json" and document["format"] == FORMAT_NAME
    assert [c["title"] for c in document["conversations"]] == ["Bananas", "Apples"]
    assert downloads[names["jsonl"]][0]().decode().count("\n") == 2
    assert "<title>2 conversations</title>" in downloads[names["html"]][0]().decode()

    # One chosen: only it, in a file named after it.
    downloads.clear()
    apples = store.list_conversations(ws, "Apples")[0].id
    at.multiselect(key="export_selection").set_value([apples]).run()
    assert set(downloads) == {f"apples.{ext}" for ext in ("json", "md", "csv", "html", "jsonl")}
    csv_rows = downloads["apples.csv"][0]().decode().strip().splitlines()
    assert len(csv_rows) == 3 and "Bananas" not in "".join(csv_rows)
    assert downloads["apples.md"][0]().decode().startswith("# Apples")


def test_conversations_page_imports_good_files_and_rejects_bad_ones(store):
    ws = store.create_workspace()
    at = open_page(CONVERSATIONS, ws=ws)
    assert not at.dataframe and at.button(key="import_button").disabled

    good = json.dumps(
        {
            "messages": [
                {"role": "user", "content": "Imported question"},
                {"role": "assistant", "content": "Imported answer"},
            ]
        }
    ).encode()
    at.file_uploader(key="import_file").upload("chat.json", good, "application/json").run()
    at.button(key="import_button").click().run()
    assert not at.exception and [s.value for s in at.success] == ["Imported 1 conversation(s)."]
    assert at.dataframe[0].value["Title"].tolist() == ["Imported question"]
    before = store.get_conversations(ws)

    bad = json.dumps({"messages": [{"role": "function", "content": "x"}]}).encode()
    at.file_uploader(key="import_file").set_value(("bad.json", bad, "application/json")).run()
    at.button(key="import_button").click().run()
    [error] = at.error
    assert "[0].role: expected one of system, user, assistant, tool, got 'function'" in shown(error.value)
    assert "Nothing was changed" in error.value and store.get_conversations(ws) == before

    at.file_uploader(key="import_file").set_value(("broken.json", b'{"messages": [', "application/json")).run()
    at.button(key="import_button").click().run()
    assert "not valid JSON" in at.error[0].value and store.get_conversations(ws) == before


def test_open_in_chat_from_the_conversations_page(store):
    at = short_replies(open_page())
    chat(at, "Find me later")
    found = at.query_params["c"]
    at.button(key="new_conversation").click().run()
    at.switch_page("ui/pages/Conversations.py").run()
    at.multiselect(key="export_selection").set_value([found]).run()
    at.button(key="open_in_chat").click().run()
    assert not at.exception and at.chat_message[0].markdown[0].value == "Find me later"


def test_sampling_defaults_come_from_the_model_and_a_workspace_keeps_its_own(store):
    at = open_page()
    ws = workspace_of(at)
    sidebar = " ".join(c.value for c in at.sidebar.caption).replace("\\", "")  # drop plain()'s escapes
    assert "the model's context length: max length 4096" in sidebar
    assert "this app's defaults: max new tokens 1024, temperature 0.7" in sidebar  # the tiny model recommends nothing
    assert at.slider(key="temperature").value == 0.7 and at.slider(key="repetition_penalty").value == 1.1
    assert "from this app's defaults" in at.slider(key="temperature").help
    at.slider(key="temperature").set_value(0.3).run()
    assert store.get_setting(ws, "sampling") == {"temperature": 0.3}
    assert "your settings: temperature 0.3 (model: 0.7)" in " ".join(c.value for c in at.sidebar.caption).replace(
        "\\", ""
    )
    again = open_page(ws=ws)  # another visit of the same workspace
    assert again.slider(key="temperature").value == 0.3 and again.slider(key="top_p").value == 0.9
    again.button(key="reset_controls").click().run()
    assert again.slider(key="temperature").value == 0.7 and store.get_setting(ws, "sampling") == {}


def test_system_prompt_presets_pin_and_archive(store):
    at = short_replies(open_page())
    ws = workspace_of(at)
    at.text_area(key="system_prompt").set_value("Answer like a pirate.").run()
    at.text_input(key="preset_name").set_value("Pirate").run()
    at.button(key="save_preset").click().run()
    assert store.list_presets(ws) == {"Pirate": "Answer like a pirate."}
    at.text_area(key="system_prompt").set_value("").run()
    assert at.selectbox(key="preset_choice").value == "Pirate"
    at.button(key="use_preset").click().run()
    assert at.text_area(key="system_prompt").value == "Answer like a pirate."
    assert open_page(ws=ws).text_area(key="system_prompt").value == "Answer like a pirate."  # kept for the workspace
    chat(at, "Ahoy")
    assert (
        store.get_conversation(ws, at.query_params["c"]).messages[1].params["system_prompt"] == "Answer like a pirate."
    )
    at.button(key="delete_preset").click().run()
    assert store.list_presets(ws) == {} and not at.exception

    first = at.query_params["c"]
    at.button(key="new_conversation").click().run()
    chat(at, "Second")
    second = at.query_params["c"]
    assert listed(at) == [second, first]
    at.button(key=f"open_{first}").click().run()
    at.button(key="pin_conversation").click().run()
    assert listed(at) == [first, second] and at.button(key=f"open_{first}").label.startswith("📌")
    at.button(key="archive_conversation").click().run()
    assert listed(at) == [second]
    at.toggle(key="show_archived").set_value(True).run()
    assert listed(at) == [first]


def test_a_share_link_shows_that_conversation_only_read_only_until_revoked(store):
    at = short_replies(open_page())
    chat(at, "Shared question " + HOSTILE)
    shared = at.query_params["c"]
    at.button(key="new_conversation").click().run()
    chat(at, "Private question")
    at.button(key=f"open_{shared}").click().run()
    at.button(key="share_conversation").click().run()
    link = at.sidebar.code[0].value
    token = link.split("share=")[1]
    assert link.endswith(f"/Shared?share={token}") and store.share_token(workspace_of(at), shared) == token

    viewer = open_page("Shared")
    viewer.query_params["share"] = token
    viewer.run()
    assert [m.markdown[0].value for m in viewer.chat_message][0] == "Shared question " + HOSTILE
    assert len(viewer.chat_message) == 2 and "Private question" not in json.dumps([m.value for m in viewer.markdown])
    assert not viewer.button and not viewer.chat_input and not viewer.text_area and "ws" not in viewer.query_params
    assert not any(e.proto.allow_html for e in markdown_like(viewer))

    at.button(key="revoke_share").click().run()
    viewer.run()
    assert not viewer.chat_message and "not valid" in viewer.info[0].value


def test_the_access_password_guards_share_links_too(store):
    """A share link opens no workspace, but the portal's access password still applies to it: without the password
    the page shows the password form and nothing of the conversation; with it, the conversation."""
    ws = store.create_workspace()
    [cid] = store.import_conversations(
        ws,
        [
            Conversation(
                title="Shared",
                messages=[ChatMessage("user", "Secret question"), ChatMessage("assistant", "Secret answer")],
            )
        ],
    )
    token = store.share(ws, cid)
    secrets = {"access_password": "team pw"}
    viewer = page_app("Shared", timeout=60)
    viewer.secrets = secrets
    viewer.query_params["share"] = token
    viewer.run()
    assert not viewer.exception and not viewer.chat_message
    assert "Secret" not in json.dumps([m.value for m in viewer.markdown])
    viewer.text_input(key="access_password_input").set_value("guess")
    viewer.button(key="access_submit").click().run()
    assert not viewer.chat_message and "Wrong password." in [e.value for e in viewer.error]
    viewer.text_input(key="access_password_input").set_value("team pw")
    viewer.button(key="access_submit").click().run()
    assert [m.markdown[0].value for m in viewer.chat_message] == ["Secret question", "Secret answer"]
