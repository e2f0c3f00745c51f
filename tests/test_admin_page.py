"""The Admin page and the chat page's side of administration, through the frame with AppTest: keys made (shown
once) and revoked, quotas set, self-service keys, the audit entries of each action, usage counted for a browser
chat, the quota refusal that hands the prompt back, and a restricted backend invisible to a person not listed."""

from __future__ import annotations

import pytest
from conftest import page_app, shown
from faulty_openai_server import FaultyServer

from glm_core.admin import admin_for
from glm_core.admin.quotas import Quota
from glm_core.admin.usage import usage_summary
from glm_core.backends.config import make_entry
from ui.resources import get_hub

ALICE = {"is_logged_in": True, "sub": "alice-1", "iss": "https://idp.example", "email": "alice@example.com"}
BOB = {"is_logged_in": True, "sub": "bob-2", "iss": "https://idp.example", "email": "bob@example.com"}
ADMINS = {"admins": ["alice@example.com"]}


def texts(elements) -> str:
    return " ".join(shown(str(e.value)) for e in elements)


def run(what):
    """Run an AppTest, or the AppTest of an element just changed; it must not raise."""
    at = what.run()
    assert not at.exception, at.exception
    return at


@pytest.fixture
def remote():
    """A remote backend (a scripted OpenAI-compatible server) beside the local one: chats need no local model."""
    server = FaultyServer().start()
    hub = get_hub()
    hub.add_remote(make_entry("srv-words", f"{server.url}#words", env={}))
    hub.add_remote(make_entry("srv-big", f"{server.url}#words", env={}))
    yield server
    hub.remove("srv-words")
    hub.remove("srv-big")
    server.stop()


def chat(user=None, secrets=None, backend="srv-words"):
    at = page_app()
    at.session_state["draft_backend"] = backend
    if user is not None:
        at.user = user
    if secrets is not None:
        at.secrets = secrets
    return run(at)


def test_an_admin_makes_a_key_shown_once_revokes_it_and_sets_quotas(data_dir):
    accounts = admin_for(data_dir)
    at = run(page_app("Admin"))  # no secrets file: this machine's browser is admin
    assert [t.label for t in at.tabs] == ["API keys", "Usage", "Quotas", "Audit log", "Backends"]
    at.text_input(key="new_key_name").set_value("ci-bot")
    at.number_input(key="new_key_days").set_value(30)
    at = run(at.button(key="new_key_create").click())
    key = at.code[0].value
    assert key.startswith("glm_") and accounts.keys.verify(key).name == "ci-bot"
    assert "shown this once" in texts(at.success)
    run(at)  # the next run shows it no more
    assert not [c for c in at.code if c.value == key]
    assert "ci-bot" in at.dataframe[0].value["Name"].tolist()

    at = run(at.button(key="revoke_key").click())
    assert accounts.keys.list()[0].state() == "revoked"

    at.text_input(key="quota_name").set_value("ci-bot")
    at.number_input(key="quota_tokens").set_value(5000)
    at.number_input(key="quota_rpm").set_value(10)
    at = run(at.button(key="quota_set").click())
    assert accounts.quotas.all()["ci-bot"] == Quota(5000, 10, None)

    at = run(at.toggle(key="self_service_keys").set_value(True))
    audit = [(e.action, e.target, e.client) for e in accounts.audit.entries()]
    assert audit[:4] == [
        ("settings.change", "self_service_keys", "local"),
        ("quota.set", "ci-bot", "local"),
        ("key.revoke", "ci-bot", "local"),
        ("key.create", "ci-bot", "local"),
    ]
    assert key not in repr(accounts.audit.entries())
    (audit_table,) = [d.value for d in at.dataframe if "action" in d.value.columns]
    assert "key.create" in audit_table["action"].tolist() and "detail" in audit_table.columns


def test_a_person_makes_their_own_key_only_where_admins_allow_it(data_dir):
    accounts = admin_for(data_dir)
    bob = page_app("Admin")
    bob.user, bob.secrets = BOB, ADMINS
    run(bob)
    assert "for admins" in texts(bob.info) and not bob.tabs and not bob.text_input
    accounts.set_setting("self_service_keys", True)
    run(bob)
    bob.text_input(key="own_key_name").set_value("bob-laptop")
    bob = run(bob.button(key="own_key_create").click())
    record = accounts.keys.verify(bob.code[0].value)
    assert (record.name, record.owner, record.admin) == ("bob-laptop", "bob@example.com", False)
    assert accounts.audit.entries()[0].actor == "bob@example.com"


def test_a_browser_chat_is_counted_and_a_quota_hands_the_prompt_back(data_dir, remote):
    accounts = admin_for(data_dir)
    at = chat()
    at = run(at.chat_input[0].set_value("hello"))
    assert at.chat_message[1].markdown[0].value.startswith("word0")
    workspace = at.query_params["ws"]
    assert accounts.usage.flush()
    (row,) = usage_summary(accounts.db, by=("person", "backend", "door"))
    assert (row["person"], row["backend"], row["door"], row["requests"]) == (workspace, "srv-words", "browser", 1)
    assert row["completion_tokens"] > 0 and row["prompt_tokens"] > 0 and row["mean_duration_s"] > 0

    accounts.quotas.set(workspace, Quota(tokens_per_day=1))
    at = run(at.chat_input[0].set_value("and again"))
    assert "Daily token quota reached" in texts(at.error)
    assert "Tokens left today: 0 of 1" in texts(at.caption)
    assert "and again" in [c.value for c in at.code]  # handed back, not stored, not sent
    assert len(at.chat_message) == 2
    assert accounts.usage.flush() and usage_summary(accounts.db, by=())[0]["requests"] == 1


def test_a_restricted_backend_is_invisible_to_a_person_not_listed(data_dir, remote):
    admin_for(data_dir).backend_access.restrict("srv-big", ["bob@example.com", "group:ml"])
    carol = {**BOB, "sub": "carol-3", "email": "carol@example.com"}
    seen = chat(user=carol, secrets=ADMINS)
    options = [o for s in seen.selectbox if s.key.startswith("backend_") for o in s.options]
    assert "srv-words" in options and "srv-big" not in options
    # Asked for by name (an old link, a stored conversation): not used, and the page says so.
    sneaky = chat(user=carol, secrets=ADMINS, backend="srv-big")
    assert "srv-big" not in [o for s in sneaky.selectbox if s.key.startswith("backend_") for o in s.options]
    assert "not offered" in texts(sneaky.info)
    for allowed in (BOB, {**carol, "groups": ["ML"]}, ALICE):  # listed, in the group, an admin
        listed = chat(user=allowed, secrets=ADMINS)
        assert "srv-big" in [o for s in listed.selectbox if s.key.startswith("backend_") for o in s.options]


def test_a_person_with_no_backend_left_gets_none_not_the_local_model(data_dir, remote):
    accounts = admin_for(data_dir)
    for name in get_hub().names():
        accounts.backend_access.restrict(name, ["alice@example.com"])
    carol = {**BOB, "sub": "carol-3", "email": "carol@example.com"}
    seen = chat(user=carol, secrets=ADMINS, backend=None)
    assert "No model here is offered to you" in texts(seen.info)
    assert seen.chat_input[0].disabled


def test_page_actions_are_in_the_audit_log_with_who_and_from_where(data_dir, remote):
    accounts = admin_for(data_dir)
    at = chat()  # this machine's browser, no secrets file: an admin
    at = run(at.chat_input[0].set_value("hello"))
    conversation = at.session_state.conversation_id
    at = run(at.button(key="share_conversation").click())
    at = run(at.button(key="revoke_share").click())
    at.text_input(key="new_backend_name").set_value("gpu2")
    at.text_input(key="new_backend_url").set_value(f"{remote.url}#words")
    at = run(at.button(key="add_backend").click())
    assert not at.error, [e.value for e in at.error]
    at = run(at.button(key="remove_backend_gpu2").click())
    entries = accounts.audit.entries()
    assert [(e.action, e.target) for e in entries[:4]] == [
        ("backend.remove", "gpu2"),
        ("backend.add", "gpu2"),
        ("share.revoke", conversation),
        ("share.create", conversation),
    ]
    assert entries[1].detail == {"server": f"{remote.url}#words"}  # never the key typed with it
    assert all(e.client == "local" and e.actor.startswith("local browser") for e in entries[:4])
    assert "hello" not in repr(entries)  # never a prompt

    # Someone who gives the admin password becomes admin, and leaves: both in the log, with the session's workspace.
    other = page_app()
    other.secrets = {"admin_password": "let me in"}
    other = run(other)
    other.text_input(key="admin_password_input").set_value("let me in")
    other = run(other.button(key="admin_submit").click())
    other = run(other.button(key="admin_leave").click())
    actions = [(e.action, e.actor.split(" (")[0]) for e in accounts.audit.entries()[:2]]
    assert actions == [("role.admin_left", "admin-password session"), ("role.admin_granted", "admin-password session")]


def test_a_model_load_is_in_the_audit_log(data_dir, tiny_model_dir, env_cleanup):
    accounts = admin_for(data_dir)
    at = run(page_app())
    at.text_input(key="load_path").set_value(str(tiny_model_dir))
    at.selectbox(key="load_precision").set_value("fp32")
    at = run(at.button(key="load_button").click())
    (entry,) = [e for e in accounts.audit.entries() if e.action == "model.load"]
    assert entry.target == str(tiny_model_dir) and entry.detail["precision"] == "fp32"
    get_hub().unload()
