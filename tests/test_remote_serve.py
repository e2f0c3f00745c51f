"""The remote backend against this project's own OpenAI-compatible server (`python -m glm_core serve`, another
process, tiny model, FP32): a greedy reply through it equals the local engine's; stop closes the stream and the
server's running count drops; the portal chats through it; the server killed mid-reply leaves the partial reply
with a one-line reason (on a server of its own: the tests may run in any order)."""

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest
from api_helpers import start_tiny_serve
from conftest import ROOT, shown
from streamlit.testing.v1 import AppTest

from glm_core import SamplingParams
from glm_core.backends.config import make_entry
from glm_core.backends.remote import RemoteBackend
from glm_core.engine import Engine
from ui.resources import get_hub

pytestmark = pytest.mark.server

PROMPT = [{"role": "user", "content": "Tell me about the sea."}]


def health(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def serve(tiny_model_dir, tmp_path_factory):
    process, port = start_tiny_serve(tiny_model_dir, tmp_path_factory.mktemp("serve-data"))
    yield process, port
    process.kill()
    process.wait()


@pytest.fixture
def doomed_serve(tiny_model_dir, tmp_path):
    """A server of its own, for a test that kills it (the module's server stays up whatever the order)."""
    process, port = start_tiny_serve(tiny_model_dir, tmp_path / "serve-data")
    yield process, port
    process.kill()
    process.wait()


def test_a_reply_through_serve_equals_the_local_engines(serve, tiny_loaded):
    """Same model, prompt and controls: greedy, and sampled with a seed (the tiny model's greedy reply is special
    tokens only, which decode to nothing; a seeded sample shows the text itself is equal)."""
    _, port = serve
    remote = RemoteBackend(f"http://127.0.0.1:{port}/v1")  # the server's one model
    engine = Engine(tiny_loaded)
    try:
        for params in (
            SamplingParams(max_new_tokens=24, temperature=0),
            SamplingParams(max_new_tokens=24, temperature=1.0, top_p=1.0, seed=7),
        ):
            through = remote.submit("c1", PROMPT, params).wait(60)
            local = engine.submit("c1", PROMPT, params).wait(60)
            assert through.error is None and through.text == local.text, params
            assert through.stats.completion_tokens == local.stats.completion_tokens == 24
            assert through.stats.prompt_tokens == local.stats.prompt_tokens  # the server's usage
            assert through.finish_reason == "length"
    finally:
        engine.close()
    assert through.text.strip() and through.stats.ttft_s > 0 and through.stats.decode_tokens_per_s > 0
    card = remote.card()
    assert card.backend == "remote" and card.device == f"127.0.0.1:{port}"


def streaming_reply(remote: RemoteBackend, conversation_id: str):
    """A long reply through `remote`, once its first 20 characters have arrived."""
    request = remote.submit(conversation_id, PROMPT, SamplingParams(max_new_tokens=3000, max_length=4096))
    deadline = time.monotonic() + 60
    while len(request.text_so_far) < 20:
        assert time.monotonic() < deadline and not request.done
        time.sleep(0.02)
    return request


def test_stop_closes_the_stream_and_serve_stops_generating(serve):
    _, port = serve
    request = streaming_reply(RemoteBackend(f"http://127.0.0.1:{port}/v1"), "c2")
    assert health(port)["running"] == 1
    request.stop()
    reply = request.wait(10)
    assert reply.finish_reason == "stopped" and reply.text and reply.error is None
    deadline = time.monotonic() + 10
    while health(port)["running"] != 0:  # the server saw its client go away and stopped the request
        assert time.monotonic() < deadline, health(port)
        time.sleep(0.05)


def test_the_portal_chats_through_serve(serve, data_dir):
    _, port = serve
    hub = get_hub()
    hub.add_remote(make_entry("serve", f"http://127.0.0.1:{port}/v1", env={}))
    try:
        at = AppTest.from_file(str(ROOT / "Home.py"), default_timeout=120)
        at.session_state["draft_backend"] = "serve"
        at.run()
        at.slider(key="max_new_tokens").set_value(8).run()
        at.chat_input[0].set_value("Hello there").run()
        assert not at.exception and not at.error
        reply = at.chat_message[1]
        assert "completion 8 tokens" in reply.caption[0].value and "(remote)" in shown(reply.caption[0].value)
    finally:
        hub.remove("serve")


def test_bench_concurrency_measures_a_remote_server_client_side(serve):
    from glm_core.bench.concurrency import format_concurrency_report, run_remote_concurrency_bench

    _, port = serve
    result = run_remote_concurrency_bench(f"http://127.0.0.1:{port}/v1", [1, 3], max_new_tokens=12)
    assert [run["streams"] for run in result["runs"]] == [1, 3] and result["runs"][0]["ratio_to_one_stream"] == 1
    for run in result["runs"]:  # the server's usage: every stream's tokens counted
        assert 0 < run["completion_tokens"] <= 12 * run["streams"] and run["aggregate_tokens_per_s"] > 0
    assert result["device"] == f"remote http://127.0.0.1:{port}/v1" and result["newcomer_ttft_s"] > 0
    assert "client side" in format_concurrency_report(result)


def test_bench_concurrency_against_a_server_that_is_down_is_one_line(tmp_path):
    from api_helpers import free_port

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "glm_core",
            "bench",
            "concurrency",
            "--backend",
            f"http://127.0.0.1:{free_port()}/v1#m",
            "--streams",
            "1",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: cannot reach the server"), done.stderr


def test_serve_killed_mid_reply_keeps_the_partial_reply(doomed_serve):
    process, port = doomed_serve
    remote = RemoteBackend(f"http://127.0.0.1:{port}/v1")
    request = streaming_reply(remote, "c3")
    process.kill()
    reply = request.wait(30)
    assert reply.finish_reason == "error" and reply.text.startswith(request.text_so_far[:20])
    assert "lost in the middle of the reply" in reply.error and "\n" not in reply.error
    again = remote.submit("c3", PROMPT, SamplingParams(max_new_tokens=4)).wait(30)
    assert again.error == f"cannot reach the server at 127.0.0.1:{port} (connection refused)"
