"""`python -m glm_core chat` and `bench turns` as a user runs them."""

import json
import os
import sqlite3
import subprocess
import sys
import time

import pytest
from conftest import ROOT

from glm_core.conversations.conversation import ChatMessage, Conversation
from glm_core.conversations.store import Store


def run_cli(*args, stdin="", timeout=600):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "glm_core", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )


@pytest.mark.slow  # over 4 s here: left out of `make test-fast`
def test_piped_chat_prints_one_json_line_per_turn():
    result = run_cli(
        "chat",
        "--temperature",
        "0",
        "--max-new-tokens",
        "40",
        "--precision",
        "fp32",
        stdin="What is the capital of France?\n\nAnd of Germany?\n",
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 2  # the empty line was skipped
    first, second = lines
    assert set(first) == {"prompt", "reply", "prompt_tokens", "completion_tokens", "ttft_s", "tokens_per_s", "stopped"}
    assert "Paris" in first["reply"] and first["stopped"] is False
    assert "Berlin" in second["reply"]
    # Consecutive turns of one conversation: the second prompt saw the first exchange.
    assert second["prompt_tokens"] > first["prompt_tokens"] + first["completion_tokens"]


def test_bad_model_path_is_a_clear_cli_error(tmp_path):
    result = run_cli("chat", "--model", str(tmp_path / "nowhere"), stdin="hi\n")
    assert result.returncode == 2
    assert "error: no such file or folder" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow  # over 4 s here: left out of `make test-fast`
def test_bench_turns_json_has_the_promised_fields(tiny_model_dir):
    result = run_cli(
        "bench",
        "turns",
        "--model",
        str(tiny_model_dir),
        "--precision",
        "fp32",
        "--max-new-tokens",
        "4",
        "--decode-tokens",
        "16",
        "--repeats",
        "1",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert len(figures["ttft_reuse_s"]) == len(figures["ttft_recompute_s"]) == 10
    assert figures["engine_tokens_per_s"] > 0 and figures["generate_tokens_per_s"] > 0
    assert figures["context_tokens"] == sorted(figures["context_tokens"])
    # With the kept cache only the new turn is prefilled.
    assert max(figures["prefill_tokens_reuse"][1:]) < figures["context_tokens"][-1] / 3


@pytest.mark.slow  # over 4 s here: left out of `make test-fast`
def test_bench_quant_json_has_the_promised_fields(tiny_model_dir):
    result = run_cli(
        "bench",
        "quant",
        "--model",
        str(tiny_model_dir),
        "--levels",
        "bf16,int8,int4",
        "--decode-tokens",
        "4",
        "--eval-tokens",
        "64",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["level"] for r in rows] == ["bf16", "int8", "int4"]
    for row in rows:
        for key in ("weights_bytes", "load_peak_bytes", "peak_bytes", "ttft_s", "decode_tokens_per_s", "perplexity"):
            assert row[key] is not None and row[key] > 0, (key, row)
    assert rows[2]["weights_bytes"] < rows[1]["weights_bytes"] < rows[0]["weights_bytes"]


@pytest.mark.slow  # over 4 s here: left out of `make test-fast`
def test_bench_quant_reports_a_level_that_fails(tiny_model_dir):
    result = run_cli("bench", "quant", "--model", str(tiny_model_dir), "--levels", "bf16,fp8", "--json")
    rows = json.loads(result.stdout)
    assert result.returncode == 1 and "unknown precision" in rows[1]["error"]


# ---- stored conversations: chat --workspace, export, import --------------------------------------------------


def tiny_chat(tiny_model_dir, *args, stdin):
    return run_cli(
        "chat",
        "--model",
        str(tiny_model_dir),
        "--precision",
        "fp32",
        "--temperature",
        "0",
        "--max-new-tokens",
        "8",
        *args,
        stdin=stdin,
    )


@pytest.mark.slow  # over 4 s here: left out of `make test-fast`
def test_chat_stores_its_turns_and_continues_a_conversation_by_title(tiny_model_dir, data_dir):
    first = tiny_chat(
        tiny_model_dir,
        "--workspace",
        "team-bench",
        "--conversation",
        "Nightly run",
        stdin="First question\nSecond question\n",
    )
    assert first.returncode == 0, first.stderr
    assert len(first.stdout.splitlines()) == 2 and "stored in workspace team-bench" in first.stderr
    again = tiny_chat(
        tiny_model_dir, "--workspace", "team-bench", "--conversation", "Nightly run", stdin="Third question\n"
    )
    assert again.returncode == 0, again.stderr
    [summary] = Store(data_dir).list_conversations("team-bench")
    conversation = Store(data_dir).get_conversation("team-bench", summary.id)
    assert conversation.title == "Nightly run"
    assert [m.content for m in conversation.messages if m.role == "user"] == [
        "First question",
        "Second question",
        "Third question",
    ]
    reply = conversation.messages[-1]
    assert reply.role == "assistant" and reply.status == "complete" and reply.precision == "FP32"
    assert reply.params["temperature"] == 0 and reply.stats["completion_tokens"] == 8
    assert reply.stats["reused_tokens"] == 0  # a new process: the history was recomputed from the store
    assert json.loads(again.stdout)["prompt_tokens"] == reply.stats["prompt_tokens"]


@pytest.mark.slow  # over 4 s here: left out of `make test-fast`
def test_chat_takes_the_models_sampling_defaults_unless_an_option_is_given(tiny_model_dir, data_dir, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "generation_config.json").write_text(
        json.dumps({"do_sample": False, "max_new_tokens": 6, "repetition_penalty": 1.3, "eos_token_id": 2})
    )
    base = ("chat", "--model", str(folder), "--precision", "fp32", "--workspace", "defaults")
    plain = run_cli(*base, "--conversation", "plain", stdin="Tell me a story\n")
    given = run_cli(
        *base,
        "--conversation",
        "given",
        "--max-new-tokens",
        "3",
        "--temperature",
        "0.5",
        "--seed",
        "1",
        stdin="Tell me a story\n",
    )
    assert plain.returncode == 0 and given.returncode == 0, (plain.stderr, given.stderr)
    stored = {c.title: c.messages[-1] for c in Store(data_dir).get_conversations("defaults")}
    # generation_config.json: greedy, 6 new tokens, its penalty; ours fill the rest (top_p 0.9)
    assert json.loads(plain.stdout)["completion_tokens"] == 6 and json.loads(given.stdout)["completion_tokens"] == 3
    assert {k: stored["plain"].params[k] for k in ("temperature", "max_new_tokens", "repetition_penalty", "top_p")} == {
        "temperature": 0,
        "max_new_tokens": 6,
        "repetition_penalty": 1.3,
        "top_p": 0.9,
    }
    assert {k: stored["given"].params[k] for k in ("temperature", "max_new_tokens", "repetition_penalty")} == {
        "temperature": 0.5,
        "max_new_tokens": 3,
        "repetition_penalty": 1.3,
    }
    bad = run_cli(*base, "--top-p", "7", stdin="hi\n")
    assert bad.returncode == 2 and "top_p" in bad.stderr and "[load]" not in bad.stderr  # refused before loading


@pytest.mark.slow  # over 4 s here: left out of `make test-fast`
def test_chat_options_are_checked(tiny_model_dir):
    no_workspace = tiny_chat(tiny_model_dir, "--conversation", "x", stdin="hi\n")
    assert no_workspace.returncode == 2 and "--conversation needs --workspace" in no_workspace.stderr
    bad = tiny_chat(tiny_model_dir, "--workspace", "has spaces", stdin="hi\n")
    assert bad.returncode == 2 and "workspace ids are" in bad.stderr


@pytest.mark.slow  # over 4 s here: left out of `make test-fast`
def test_export_then_import_round_trips_through_the_command_line(data_dir, tmp_path):
    store = Store(data_dir)
    store.import_conversations(
        "source",
        [
            Conversation(
                title="Unicode 🦙 and <html>",
                messages=[
                    ChatMessage("user", "你好 <script>alert(1)</script>"),
                    ChatMessage(
                        "assistant",
                        "```python\nprint('hi')\n```",
                        model="m",
                        precision="BF16",
                        stats={"prompt_tokens": 3, "completion_tokens": 2},
                        finish_reason="eos",
                    ),
                ],
            )
        ],
    )
    out = tmp_path / "export.json"
    exported = run_cli("export", "--workspace", "source", "--format", "json", "--out", str(out))
    assert exported.returncode == 0, exported.stderr
    imported = run_cli("import", str(out), "--workspace", "target")
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == "imported 1 conversation(s) into workspace target"
    [source], [target] = Store(data_dir).get_conversations("source"), Store(data_dir).get_conversations("target")
    assert target.id != source.id and target.title == source.title
    assert [(m.role, m.content, m.model, m.stats) for m in target.messages] == [
        (m.role, m.content, m.model, m.stats) for m in source.messages
    ]

    for fmt, expected in [
        ("md", "# Unicode 🦙 and <html>"),
        ("csv", "conversation_id,conversation_title"),
        ("html", "&lt;script&gt;alert(1)&lt;/script&gt;"),
        ("jsonl", '"history": []'),
    ]:
        result = run_cli("export", "--workspace", "source", "--format", fmt)
        assert result.returncode == 0 and expected in result.stdout, (fmt, result.stderr)
    assert "<script>" not in run_cli("export", "--workspace", "source", "--format", "html").stdout

    listing = run_cli("workspaces")
    assert "source  1 conversation(s)" in listing.stdout and "target  1 conversation(s)" in listing.stdout


@pytest.mark.slow  # over 4 s here: left out of `make test-fast`
def test_bad_import_files_fail_with_a_clear_message_and_change_nothing(data_dir, tmp_path):
    Store(data_dir).import_conversations("w", [Conversation(title="keep me", messages=[ChatMessage("user", "x")])])
    cases = {
        "broken.json": (b'{"messages": [', "the file is not valid JSON"),
        "schema.json": (
            json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode(),
            "[0].role: expected one of system, user, assistant, tool, got 'robot'",
        ),
        "image.bin": (b"\x89PNG\r\n\x1a\n\x00\x00", "not UTF-8"),
    }
    for name, (data, reason) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        result = run_cli("import", str(path), "--workspace", "w")
        assert result.returncode == 2, result.stdout
        assert result.stderr.startswith(f"error: {path}: ") and reason in result.stderr
        assert "nothing was imported" in result.stderr and "Traceback" not in result.stderr
    missing = run_cli("import", str(tmp_path / "nope.json"), "--workspace", "w")
    assert missing.returncode == 2 and "cannot read the file" in missing.stderr
    assert [s.title for s in Store(data_dir).list_conversations("w")] == ["keep me"]
    unknown = run_cli("export", "--workspace", "nobody")
    assert unknown.returncode == 2 and "no workspace 'nobody'" in unknown.stderr


@pytest.mark.slow  # over 4 s here: left out of `make test-fast`
def test_a_reply_survives_the_process_being_killed_mid_generation(tiny_model_dir, data_dir):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "glm_core",
            "chat",
            "--model",
            str(tiny_model_dir),
            "--precision",
            "fp32",
            "--max-new-tokens",
            "4000",
            "--seed",
            "1",
            "--workspace",
            "crash",
            "--conversation",
            "Killed",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
        env=env,
        text=True,
    )
    try:
        process.stdin.write("Write forever.\n")
        process.stdin.flush()
        deadline, partial = time.time() + 120, None
        while time.time() < deadline and partial is None:
            time.sleep(0.2)
            try:
                store = Store(data_dir)
                summaries = store.list_conversations("crash")
            except sqlite3.Error:
                continue
            if summaries:
                messages = store.get_conversation("crash", summaries[0].id).messages
                if len(messages) == 2 and messages[1].content:
                    partial = messages[1]
        assert partial is not None and partial.status == "partial", "no partial reply was written"
        process.kill()  # SIGKILL: no clean-up of any kind runs
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    store = Store(data_dir)
    [summary] = store.list_conversations("crash")
    user, reply = store.get_conversation("crash", summary.id).messages
    assert user.content == "Write forever." and user.status == "complete"
    assert reply.content.startswith(partial.content) and reply.status == "partial"
    assert store.recover_interrupted() == 1  # what the portal does when it starts
    reply = store.get_conversation("crash", summary.id).messages[1]
    assert reply.status == "interrupted" and reply.content and "interrupted" in reply.stats_line()


@pytest.mark.slow  # over 4 s here: left out of `make test-fast`
def test_chat_through_a_remote_server():
    """`chat --model http://...`: the same JSON lines through an OpenAI-compatible server; a reply cut half-way
    keeps its text with a one-line reason."""
    from faulty_openai_server import FaultyServer

    server = FaultyServer().start()
    try:
        ok = run_cli("chat", "--model", f"{server.url}#words", "--max-new-tokens", "3", stdin="hi\n", timeout=60)
        assert ok.returncode == 0, ok.stderr
        line = json.loads(ok.stdout)
        assert line["reply"] == "word0 word1 word2" and line["completion_tokens"] == 3 and line["prompt_tokens"] == 7
        cut = run_cli("chat", "--model", f"{server.url}#cut", stdin="hi\n", timeout=60)
        line = json.loads(cut.stdout)
        assert line["reply"] == "word0 word1 word2" and "lost in the middle of the reply" in line["error"]
        assert "error: the connection to 127.0.0.1" in cut.stderr and "Traceback" not in cut.stderr
    finally:
        server.stop()
