"""The remote backend over an OpenAI-compatible server: spec parsing, Prometheus figures, streaming with usage,
stop closing the stream (the server sees its client go away), and every failure path as a one-line reason with the
partial reply kept, against a deliberately faulty server on a real socket (tests/faulty_openai_server.py)."""

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from faulty_openai_server import FaultyServer  # noqa: E402

from glm_core import SamplingParams
from glm_core.backends.remote import RemoteBackend, is_remote, parse_prometheus, parse_target, remote_spec
from glm_core.conversations.conversation import Conversation
from glm_core.conversations.store import Store
from glm_core.conversations.turn import start_turn
from glm_core.sampling_defaults import compose_params

HELLO = [{"role": "user", "content": "hello"}]
FIVE = SamplingParams(max_new_tokens=5, temperature=0)


@pytest.fixture
def server():
    s = FaultyServer().start()
    yield s
    s.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, timeout=5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


# ---- torch-free parts ---------------------------------------------------------------------------------------


def test_spec_parsing():
    assert is_remote("http://gpu1:8000/v1") and is_remote(" HTTPS://x") and not is_remote("/models/glm")
    t = parse_target("http://gpu1:8000/v1#THUDM/glm-4-9b-chat")
    assert (t.base_url, t.model, t.host, t.server_root) == (
        "http://gpu1:8000/v1",
        "THUDM/glm-4-9b-chat",
        "gpu1:8000",
        "http://gpu1:8000",
    )
    assert parse_target("http://gpu1:8000").base_url == "http://gpu1:8000/v1"  # no path: the usual /v1
    assert parse_target("https://host/proxy/v1/").server_root == "https://host/proxy"
    assert remote_spec("http://gpu1:8000/#m").path == "http://gpu1:8000/v1#m"
    assert remote_spec("http://gpu1:8000#m") == remote_spec("http://gpu1:8000/v1#m")
    for bad, reason in [
        ("http://user:secret@h/v1", "not in the URL"),
        ("ftp://h", "http"),
        ("http://h/v1?x=1", "query"),
        ("http://:80/v1", "no host"),
        ("http://h:port/v1", "port"),
    ]:
        with pytest.raises(ValueError, match=reason):
            parse_target(bad)


# Captured from a vLLM 0.x server (V1 engine) serving one model; trimmed to the lines around what is read.
VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="THUDM/glm-4-9b-chat"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="THUDM/glm-4-9b-chat"} 1.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="THUDM/glm-4-9b-chat"} 0.4375
vllm:num_requests_running{engine="0",model_name="other"} 5.0
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="THUDM/glm-4-9b-chat"} 1.2345e+04
"""


def test_prometheus_figures_of_vllm_and_sglang():
    assert parse_prometheus(VLLM_METRICS, "THUDM/glm-4-9b-chat") == {
        "kv_cache_usage": 0.4375,
        "running": 3.0,
        "waiting": 1.0,
    }
    assert parse_prometheus(VLLM_METRICS)["running"] == 8.0  # no model named: summed over label sets
    old = 'vllm:gpu_cache_usage_perc{model_name="m"} 0.5\nvllm:num_requests_running{model_name="m"} 2\n'
    assert parse_prometheus(old, "m") == {"kv_cache_usage": 0.5, "running": 2.0}
    sglang = (
        'sglang:token_usage{model_name="m"} 0.1\nsglang:num_running_reqs{model_name="m"} 4.0\n'
        'sglang:num_queue_reqs{model_name="m"} 0.0\n'
    )
    assert parse_prometheus(sglang, "m") == {"kv_cache_usage": 0.1, "running": 4.0, "waiting": 0.0}
    assert parse_prometheus("<html>not metrics</html>") == {}


# ---- against a real socket -----------------------------------------------------------------------------------


def test_streams_a_reply_with_usage_and_figures(server):
    backend = RemoteBackend(f"{server.url}#words")
    # Composed as every door composes them: only what was set is sent, the server's own defaults apply to the rest.
    params, _ = compose_params(None, {"max_new_tokens": 5, "temperature": 0, "top_k": 40}, seed=3)
    request = backend.submit("c1", HELLO, params)
    pieces = list(request.text_stream())
    reply = request.wait(5)
    assert "".join(pieces) == reply.text == "word0 word1 word2 word3 word4"
    assert reply.finish_reason == "length" and reply.error is None
    assert (reply.stats.prompt_tokens, reply.stats.completion_tokens) == (7, 5)  # the server's usage
    assert reply.stats.ttft_s > 0 and reply.stats.total_s >= reply.stats.ttft_s
    sent = server.requests[-1]
    assert sent["stream_options"] == {"include_usage": True} and sent["max_tokens"] == 5
    assert sent["messages"] == HELLO and sent["top_k"] == 40 and sent["seed"] == 3 and sent["temperature"] == 0
    assert "repetition_penalty" not in sent and "top_p" not in sent
    card = backend.card()
    assert card.name == "words" and card.backend == "remote" and card.device == server.url.split("/")[2]
    assert "precision" in card.unknown_remotely
    assert backend.memory_report() is None
    backend.close()


def test_llama_cpp_gets_its_own_sampling_names():
    """llama.cpp (owned_by "llamacpp" in /v1/models) reads `repeat_penalty` and ignores `repetition_penalty`: a
    penalty that was set goes under its name. As for every server, only what was set is sent."""
    controls = SamplingParams(max_new_tokens=3, temperature=0.5, top_k=0, repetition_penalty=1.2)  # all set
    only_length, _ = compose_params(None, {"max_new_tokens": 3})
    sent = {}
    for owned_by in ("llamacpp", "vllm"):
        s = FaultyServer(owned_by=owned_by).start()
        try:
            backend = RemoteBackend(f"{s.url}#words")
            assert backend.submit("c1", HELLO, controls).wait(5).error is None
            assert backend.submit("c1", HELLO, only_length).wait(5).error is None
            sent[owned_by] = s.requests
            backend.close()
        finally:
            s.stop()
    llama, penalty_off = sent["llamacpp"]
    assert (llama["repeat_penalty"], llama["top_k"]) == (1.2, 0) and "min_p" not in llama
    assert "repetition_penalty" not in llama
    assert not {"repeat_penalty", "repetition_penalty", "top_k", "temperature", "top_p"} & set(penalty_off)
    vllm, _ = sent["vllm"]
    assert (vllm["repetition_penalty"], vllm["top_k"]) == (1.2, 0) and not {"min_p", "repeat_penalty"} & set(vllm)


def test_no_model_named_takes_the_servers_first(server):
    backend = RemoteBackend(server.url)
    reply = backend.submit("c1", HELLO, FIVE).wait(5)
    assert reply.text.startswith("word0") and server.requests[-1]["model"] == "words"
    assert wait_until(lambda: backend.card().max_context == 4096)
    card = backend.card()
    assert card.remote and card.status == "reachable" and card.parameters is None  # not known from here
    assert set(card.to_dict()) == {
        *("name", "family", "precision", "device", "source", "backend", "max_context", "sampling_defaults"),
        *("reasoning", "thinking_switch", "server", "unknown_remotely", "status"),
    }
    assert backend.load_report().to_dict() == {"running": 0, "waiting": 0, "max_batch": None, "in_flight_here": 0}


def test_the_remote_backend_comes_in_through_the_engines_submit(server):
    """One way in (protocol.SubmitPath): the remote backend and the engine share submit, so a request is refused
    the same way on both before anything is sent: bad controls, a conversation with a reply coming, a closed
    backend."""
    from glm_core import ConversationBusy, EngineClosed
    from glm_core.engine import Engine
    from glm_core.protocol import SubmitPath

    assert RemoteBackend.submit is SubmitPath.submit is Engine.submit
    backend = RemoteBackend(f"{server.url}#slow")
    request = backend.submit("c1", HELLO, SamplingParams(max_new_tokens=200))
    # The accepted request reaches the server from the backend's own thread: counted once it has arrived, so that
    # nothing sent after this can be it.
    assert wait_until(lambda: len(server.requests) == 1)
    with pytest.raises(ConversationBusy):
        backend.submit("c1", HELLO, FIVE)
    with pytest.raises(ValueError, match="max new tokens"):
        backend.submit("c2", HELLO, SamplingParams(max_new_tokens=0))
    sent = len(server.requests)
    request.stop()
    assert request.wait(5).finish_reason == "stopped"
    backend.close()
    with pytest.raises(EngineClosed):
        backend.submit("c3", HELLO, FIVE)
    assert len(server.requests) == sent  # none of the refused ones reached the server


def test_stop_closes_the_stream_and_the_server_stops_generating(server):
    backend = RemoteBackend(f"{server.url}#slow")
    request = backend.submit("c1", HELLO, SamplingParams(max_new_tokens=200))
    assert wait_until(lambda: request.text_so_far.count("word") >= 2)
    assert backend.metrics(max_age_s=0)["running"] == 1 and backend.load_report().running == 1
    request.stop()
    reply = request.wait(5)
    assert reply.finish_reason == "stopped" and reply.error is None and reply.text.startswith("word0 word1")
    # The server noticed its client went away and ended the stream, long before its 200 words (20 s).
    assert wait_until(lambda: server.running == 0 and server.disconnects == 1, timeout=3)
    assert backend.metrics(max_age_s=0) == {"kv_cache_usage": 0.25, "running": 0.0, "waiting": 0.0}


def test_failures_are_one_line_and_keep_the_partial_reply(server):
    cut = RemoteBackend(f"{server.url}#cut").submit("c1", HELLO, FIVE).wait(10)
    assert cut.finish_reason == "error" and cut.text == "word0 word1 word2"
    assert "lost in the middle of the reply" in cut.error and "\n" not in cut.error
    expected = {
        "broken": "failed (HTTP 500): the engine crashed",
        "busy": "busy (429",
        "nope": "has no model 'nope' (404)",
    }
    for model, reason in expected.items():
        reply = RemoteBackend(f"{server.url}#{model}").submit("c1", HELLO, FIVE).wait(10)
        assert reply.finish_reason == "error" and reason in reply.error and reply.text == "", (model, reply.error)


def test_wrong_key_is_401_and_the_key_is_never_in_the_reason(monkeypatch):
    server = FaultyServer(key="right-key").start()
    try:
        monkeypatch.setenv("GLM_REMOTE_API_KEY", "wrong-key-123")
        reply = RemoteBackend(f"{server.url}#words").submit("c1", HELLO, FIVE).wait(10)
        assert "refused the API key (401" in reply.error and "wrong-key-123" not in reply.error
        assert (
            RemoteBackend(f"{server.url}#words", api_key="right-key").submit("c1", HELLO, FIVE).wait(10).error is None
        )
    finally:
        server.stop()


def test_down_then_back_without_a_restart():
    port = free_port()
    backend = RemoteBackend(f"http://127.0.0.1:{port}/v1#words")
    reply = backend.submit("c1", HELLO, FIVE).wait(10)
    assert reply.error == f"cannot reach the server at 127.0.0.1:{port} (connection refused)"
    assert backend.metrics(max_age_s=0) is None
    server = FaultyServer(port).start()
    try:
        assert backend.submit("c1", HELLO, FIVE).wait(10).text.startswith("word0")
    finally:
        server.stop()


def test_server_killed_mid_reply_keeps_the_partial_reply_in_the_store(data_dir):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "faulty_openai_server.py"), str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        process.stdout.readline()  # listening
        backend = RemoteBackend(f"http://127.0.0.1:{port}/v1#slow")
        store = Store(data_dir)
        ws = store.create_workspace()
        turn = start_turn(
            store, backend, ws, Conversation(), keep=0, prompt="hello", params=SamplingParams(max_new_tokens=200)
        )
        stream = turn.text_stream()
        text = next(stream) + next(stream)
        assert text.startswith("word0")
        process.kill()
        for delta in stream:
            text += delta
        result = turn.finish(timeout=10)
        assert result.reply.finish_reason == "error" and "lost in the middle of the reply" in result.reply.error
        stored = store.get_conversation(ws, turn.conversation_id).messages[1]
        assert stored.content == text and stored.error == result.reply.error and stored.finish_reason == "error"
        assert stored.model == "slow" and stored.precision == "remote"
    finally:
        process.kill()
        process.wait()
