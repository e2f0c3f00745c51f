"""Team administration (glm_core.admin): personal API keys through the real `openai` client on a real server,
usage records, quotas (429 with Retry-After), the audit log and access per backend; the CLI as a user types it."""

from __future__ import annotations

import contextlib
import io
import json
import sqlite3
import time

import openai
import pytest
from api_helpers import ThreadServer, raw_request

from glm_core.admin import Admin, admin_for
from glm_core.admin.audit import without_credentials
from glm_core.admin.backend_access import Person
from glm_core.admin.quotas import Quota, QuotaExceeded
from glm_core.admin.usage import UsageRecord, to_csv, usage_summary
from glm_core.api import ApiConfig, create_app
from glm_core.api.config import ApiLimits
from glm_core.cli import main as cli_main
from glm_core.protocol import ReplyStats

LIMITS = ApiLimits(max_body_bytes=64 * 1024, max_tokens=24, default_max_tokens=16)
ASK = dict(model="m", messages=[{"role": "user", "content": "Say something."}], max_tokens=5, seed=1)


def cli(*args: str) -> str:
    """`python -m glm_core ...` in this process (the same data folder); its stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main(list(args)) == 0
    return out.getvalue()


@pytest.fixture
def served(engine, data_dir):
    """The API over the tiny model, keeping its keys, usage and quotas in this test's data folder."""
    accounts = admin_for(data_dir)
    with ThreadServer(create_app(lambda: engine, ApiConfig(keys=("env-key",), limits=LIMITS), accounts)) as running:
        yield running, accounts


@pytest.fixture
def keyless(engine, data_dir):
    accounts = admin_for(data_dir)
    with ThreadServer(create_app(lambda: engine, ApiConfig(limits=LIMITS), accounts)) as running:
        yield running, accounts


def client(server, key) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=120)


def test_personal_keys_created_used_expired_and_revoked_through_the_openai_client(keyless, data_dir):
    server, accounts = keyless
    # No key anywhere: this machine's clients need none (as before).
    assert client(server, "anything").chat.completions.create(**ASK).choices[0].message.content is not None
    made = json.loads(cli("keys", "create", "--name", "alice", "--json"))
    assert set(made) >= {"id", "name", "key"} and made["name"] == "alice" and made["key"].startswith("glm_")
    # From now on the API asks every caller for a key.
    with pytest.raises(openai.AuthenticationError):
        client(server, "anything").chat.completions.create(**ASK)
    assert raw_request(server.port, "GET", "/v1/models")[0] == 401
    reply = client(server, made["key"]).chat.completions.create(**ASK)
    assert reply.usage.completion_tokens == 5
    # Kept hashed: the key appears nowhere in the file, nor in the listing; the listing says it was used.
    stored = b"".join(p.read_bytes() for p in data_dir.glob("admin.sqlite3*"))
    assert made["key"].encode() not in stored and made["key"][4:].encode() not in stored
    listed = json.loads(cli("keys", "list", "--json"))
    assert [k["name"] for k in listed] == ["alice"] and "key" not in listed[0] and listed[0]["last_used_at"]
    assert made["key"] not in json.dumps(listed)

    short = json.loads(cli("keys", "create", "--name", "short-lived", "--expires-days", "0.00001", "--json"))
    time.sleep(1.0)
    with pytest.raises(openai.AuthenticationError, match="expired"):
        client(server, short["key"]).chat.completions.create(**ASK)

    cli("keys", "revoke", "--name", "alice")
    with pytest.raises(openai.AuthenticationError, match="revoked"):
        client(server, made["key"]).chat.completions.create(**ASK)
    # No live key left: back to this machine's clients without a key (but a dead key is still refused).
    assert not accounts.keys.any_live()
    assert client(server, "anything").models.list().data
    with pytest.raises(openai.AuthenticationError, match="expired"):
        client(server, short["key"]).models.list()
    # The name may be given again; the new key is another key.
    again = json.loads(cli("keys", "create", "--name", "alice", "--json"))
    assert again["key"] != made["key"] and client(server, again["key"]).models.list().data
    with pytest.raises(ValueError, match="already named"):
        accounts.keys.create("alice")


def test_configured_keys_keep_working_beside_personal_ones(served):
    server, accounts = served
    _, key = accounts.keys.create("bob")
    assert client(server, "env-key").chat.completions.create(**ASK).usage.completion_tokens == 5
    assert client(server, key).chat.completions.create(**ASK).usage.completion_tokens == 5
    with pytest.raises(openai.AuthenticationError):
        client(server, "glm_" + "x" * 43).models.list()


def test_an_admin_key_may_free_memory_and_the_audit_log_says_who(served, monkeypatch):
    import glm_core.telemetry.memory as memory

    monkeypatch.setattr(memory, "free_cached_memory", lambda *a: None)
    server, accounts = served
    _, user_key = accounts.keys.create("carol")
    _, admin_key = accounts.keys.create("ops", admin=True)
    assert raw_request(server.port, "GET", "/free_gc", headers={"Authorization": f"Bearer {user_key}"})[0] == 403
    assert raw_request(server.port, "GET", "/free_gc", headers={"Authorization": f"Bearer {admin_key}"})[0] == 200
    entry = accounts.audit.entries()[0]
    assert (entry.actor, entry.action, entry.client) == ("key:ops", "memory.free", "127.0.0.1")


def test_usage_is_counted_for_api_calls_streamed_or_not(served):
    server, accounts = served
    _, key = accounts.keys.create("dave")
    whole = client(server, key).chat.completions.create(**ASK)
    stream = client(server, key).chat.completions.create(**ASK, stream=True, stream_options={"include_usage": True})
    streamed = [c for c in stream if c.usage is not None][0].usage
    client(server, "env-key").chat.completions.create(**ASK)
    assert accounts.usage.flush()
    rows = {row["person"]: row for row in usage_summary(accounts.db, by=("person",))}
    assert rows["dave"]["requests"] == 2
    assert rows["dave"]["prompt_tokens"] == whole.usage.prompt_tokens + streamed.prompt_tokens
    assert rows["dave"]["completion_tokens"] == whole.usage.completion_tokens + streamed.completion_tokens == 10
    assert rows["dave"]["cached_tokens"] == streamed.prompt_tokens_details.cached_tokens + (
        whole.usage.prompt_tokens_details.cached_tokens
    )
    assert rows["dave"]["mean_ttft_s"] > 0 and rows["dave"]["mean_duration_s"] >= rows["dave"]["mean_ttft_s"]
    env_row = [r for name, r in rows.items() if name.startswith("key-")]
    assert len(env_row) == 1 and env_row[0]["requests"] == 1  # a configured key counts under its id, never the key
    by_model = json.loads(cli("usage", "--by", "model", "--by", "person", "--json"))
    assert {(r["person"], r["requests"]) for r in by_model} >= {("dave", 2)}
    assert by_model[0]["model"] and "env-key" not in json.dumps(by_model)


def test_past_a_quota_the_api_answers_429_with_retry_after_and_names_the_limit(served):
    server, accounts = served
    _, key = accounts.keys.create("erin")
    cli("quota", "set", "--name", "erin", "--tokens-per-day", "1")
    client(server, key).chat.completions.create(**ASK)  # under the quota when it starts: it runs
    with pytest.raises(openai.RateLimitError, match="Daily token quota") as refused:
        client(server, key).chat.completions.create(**ASK)
    retry_after = int(refused.value.response.headers["retry-after"])
    assert 0 < retry_after <= 86400
    assert refused.value.body["code"] == "quota_tokens_per_day"
    assert client(server, "env-key").chat.completions.create(**ASK)  # others are not affected

    cli("quota", "set", "--default", "--requests-per-minute", "1")
    _, fresh = accounts.keys.create("erin-batch")
    client(server, fresh).chat.completions.create(**ASK)
    status, headers, body = raw_request(
        server.port,
        "POST",
        "/v1/chat/completions",
        json.dumps({**ASK}).encode(),
        {"Authorization": f"Bearer {fresh}", "Content-Type": "application/json"},
    )
    assert status == 429 and 1 <= int(headers["retry-after"]) <= 60
    assert "per minute" in json.loads(body)["error"]["message"]
    assert json.loads(cli("quota", "list", "--json"))["*"]["requests_per_minute"] == 1
    actions = [(e.action, e.target) for e in accounts.audit.entries()]
    assert ("quota.set", "erin") in actions and ("quota.set", "*") in actions


def test_quotas_count_unwritten_usage_running_replies_and_the_minute(tmp_path):
    admin = Admin(tmp_path)
    now = [1000.0]
    admin.quotas.clock = lambda: now[0]
    admin.quotas.set("*", Quota(tokens_per_day=100, requests_per_minute=3, running=1))
    ticket = admin.quotas.admit("frank", "person", "browser")
    with pytest.raises(QuotaExceeded, match="running at once") as refused:
        admin.quotas.admit("frank", "person", "browser")
    assert refused.value.limit == "running"
    ticket.done(
        backend="local",
        model="m",
        level="fp32",
        stats=ReplyStats(prompt_tokens=70, completion_tokens=40),
        outcome="eos",
    )
    # Counted at once, written or not.
    assert admin.usage.tokens_today("frank") == 110
    with pytest.raises(QuotaExceeded, match="110 of 100"):
        admin.quotas.admit("frank", "person", "browser")
    admin.quotas.set("frank", Quota(tokens_per_day=1000, requests_per_minute=3))  # their own beats the default
    admin.quotas.admit("frank", "person", "browser").cancel()
    admin.quotas.admit("frank", "person", "browser").cancel()
    with pytest.raises(QuotaExceeded, match="per minute") as refused:
        admin.quotas.admit("frank", "person", "browser")
    assert refused.value.retry_after_s == 60
    now[0] += 61
    admin.quotas.admit("frank", "person", "browser").cancel()
    assert admin.quotas.left_today("frank") == (890, 1000)
    assert admin.usage.flush()
    with sqlite3.connect(tmp_path / "admin.sqlite3") as db:
        assert db.execute("SELECT who, prompt_tokens, completion_tokens FROM usage").fetchall() == [("frank", 70, 40)]
    admin.close()


def test_usage_is_written_in_batches_by_its_own_thread(tmp_path):
    """The caller's thread never writes: every insert happens on the writer's thread, many records per transaction."""
    import threading

    admin = Admin(tmp_path)
    writes = []
    write = admin.usage._write

    def counted(records):
        writes.append((threading.current_thread().name, len(records)))
        write(records)

    admin.usage._write = counted
    record = UsageRecord(time.time(), "g", "person", "browser", "local", "m", "fp32", 5, 0, 3, 0.1, 0.2, "eos")
    for _ in range(2000):
        admin.usage.record(record)
    assert admin.usage.flush()
    assert usage_summary(admin.db, by=())[0]["requests"] == 2000
    assert {name for name, _ in writes} == {"glm-usage-writer"}
    assert sum(n for _, n in writes) == 2000 and len(writes) <= 2000 // 100
    admin.close()


def test_csv_cells_never_run_as_formulas():
    text = to_csv([{"who": "=HYPERLINK(1)", "n": 1}])
    assert "'=HYPERLINK" in text


def test_the_audit_log_refuses_a_key_and_lists_newest_first(tmp_path):
    admin = Admin(tmp_path)
    _, key = admin.keys.create("h")
    with pytest.raises(ValueError, match="must not hold an API key"):
        admin.audit.record("x", "key.create", "h", {"oops": key})
    admin.audit.record("alice@example.com", "model.load", "embedded", {"precision": "bf16"}, "10.0.0.2")
    admin.audit.record("alice@example.com", "model.unload", "embedded", {}, "10.0.0.2")
    assert [e.action for e in admin.audit.entries()] == ["model.unload", "model.load"]
    assert without_credentials("http://u:secret@gpu1:8000/v1") == "http://gpu1:8000/v1"
    admin.close()


def test_a_restricted_backend_is_visible_only_to_listed_people_and_groups(tmp_path):
    admin = Admin(tmp_path)
    admin.backend_access.restrict("big-gpu", ["Alice@example.com", "group:ml-team"], by="admin")
    names = ["local", "big-gpu"]
    alice = Person.from_user_info({"is_logged_in": True, "email": "alice@example.com"})
    bob = Person.from_user_info({"is_logged_in": True, "email": "bob@example.com"})
    carol = Person.from_user_info({"is_logged_in": True, "email": "carol@example.com", "groups": ["ML-Team"]})
    anonymous = Person.from_user_info({})
    assert admin.backend_access.visible(names, alice) == names
    assert admin.backend_access.visible(names, carol) == names
    assert admin.backend_access.visible(names, bob) == ["local"]
    assert admin.backend_access.visible(names, anonymous) == ["local"]
    assert admin.backend_access.visible(names, Person(frozenset(), admin=True)) == names
    admin.backend_access.restrict("big-gpu", [])
    assert admin.backend_access.visible(names, bob) == names
    admin.close()


def test_every_generating_route_is_counted_and_under_quotas(served):
    """/v1/completions and /v1/responses go through the same admission and accounting as chat completions."""
    server, accounts = served
    _, key = accounts.keys.create("gina")
    api = client(server, key)
    done = api.completions.create(model="m", prompt="Once upon a time", max_tokens=4, seed=1)
    answered = api.responses.create(model="m", input="Say something.", max_output_tokens=4)
    assert accounts.usage.flush()
    (row,) = usage_summary(accounts.db, by=("person",))
    assert row["requests"] == 2
    assert row["completion_tokens"] == done.usage.completion_tokens + answered.usage.output_tokens
    accounts.quotas.set("gina", Quota(tokens_per_day=1))
    with pytest.raises(openai.RateLimitError, match="Daily token quota"):
        api.responses.create(model="m", input="Again.", max_output_tokens=4)
    with pytest.raises(openai.RateLimitError, match="Daily token quota"):
        api.completions.create(model="m", prompt="Again", max_tokens=4)


def test_a_restricted_model_answers_only_listed_keys_and_their_owners(served):
    server, accounts = served
    accounts.backend_access.restrict("local", ["team-bot", "alice@example.com"])
    _, listed = accounts.keys.create("team-bot")
    _, owned = accounts.keys.create("alice-laptop", owner="alice@example.com")
    _, other = accounts.keys.create("someone-else")
    _, admin_key = accounts.keys.create("ops", admin=True)
    for key in (listed, owned, admin_key):
        assert client(server, key).chat.completions.create(**ASK).usage.completion_tokens == 5
    for key in (other, "env-key"):
        with pytest.raises(openai.PermissionDeniedError, match="restricted"):
            client(server, key).models.list()
    accounts.backend_access.restrict("local", [])
    assert client(server, other).models.list().data
