"""Real browser: `streamlit run Home.py`, Debian's chromium driven by Playwright, a prompt and its reply."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(output_dir):
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail("Debian's chromium is missing: `make test` installs it")
        pytest.skip("Debian's chromium is not installed (make test installs it)")
    port = free_port()
    log = open(output_dir / "streamlit-server.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "Home.py", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--server.headless", "true"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
        assert process.poll() is None, (output_dir / "streamlit-server.log").read_text()
    else:
        process.kill()
        pytest.fail("streamlit did not come up within 120 s")
    yield url
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


@pytest.fixture
def page(request, output_dir):
    """A fresh Chromium page; its screenshot lands in test-output/ named after the test, pass or fail."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        try:
            yield page
        finally:
            page.screenshot(path=str(output_dir / f"{request.node.name}.png"), full_page=True)
            browser.close()


def test_chat_in_a_real_browser(server, page):
    from playwright.sync_api import expect

    page.goto(server)
    box = page.get_by_test_id("stChatInputTextArea")
    expect(box).to_be_enabled(timeout=240_000)  # enabled once the model has loaded
    box.fill("What is the capital of France?")
    box.press("Enter")
    messages = page.get_by_test_id("stChatMessage")
    expect(messages).to_have_count(2, timeout=120_000)
    expect(messages.nth(1)).to_contain_text("tokens/s", timeout=120_000)  # the stats line ends the reply
    reply = messages.nth(1).inner_text()
    assert len(reply.split("prompt")[0].strip()) > 0
    expect(page.get_by_test_id("stSidebar")).to_contain_text("SmolLM2-135M-Instruct")


def test_stop_keeps_the_partial_reply(server, page):
    from playwright.sync_api import expect

    page.goto(server)
    box = page.get_by_test_id("stChatInputTextArea")
    expect(box).to_be_enabled(timeout=240_000)
    box.fill("Write a 2000-word essay on the history of the Roman Empire, with a title and sections.")
    box.press("Enter")
    messages = page.get_by_test_id("stChatMessage")
    expect(messages).to_have_count(2, timeout=120_000)
    expect(messages.nth(1)).not_to_be_empty(timeout=120_000)
    page.wait_for_timeout(1500)  # let some text stream in
    page.get_by_test_id("stChatInputStopButton").click()
    expect(box).to_be_enabled(timeout=60_000)
    # Any interaction reruns the page, which redraws the history from the conversation:
    # the stopped reply is still there, with its figures, marked stopped.
    system_prompt = page.get_by_label("System prompt")
    system_prompt.fill("Be brief.")
    system_prompt.press("Control+Enter")
    expect(messages.nth(1)).to_contain_text("stopped", timeout=60_000)
    stopped = messages.nth(1).inner_text()
    assert len(stopped.split("prompt")[0].strip()) > 0


def test_stored_conversation_reopens_from_the_url_and_shows_html_as_text(data_dir, server, page):
    from playwright.sync_api import expect

    from glm_core.conversations.conversation import ChatMessage, Conversation
    from glm_core.conversations.store import Store

    hostile = '<b id="injected">bold?</b><img id="injected-img" src=x onerror="document.title=\'pwned\'">'
    store = Store(data_dir)
    ws = store.create_workspace()
    [cid] = store.import_conversations(ws, [Conversation(title="Hostile " + hostile, messages=[
        ChatMessage("user", hostile), ChatMessage("assistant", "**Markdown still works** " + hostile)])])
    page.goto(f"{server}/?ws={ws}&c={cid}")
    messages = page.get_by_test_id("stChatMessage")
    expect(messages).to_have_count(2, timeout=240_000)
    expect(messages.nth(0)).to_contain_text('<b id="injected">bold?</b>')  # shown as typed
    expect(messages.nth(1).locator("strong")).to_have_text("Markdown still works")
    assert page.locator("#injected, #injected-img").count() == 0 and page.title() != "pwned"
    expect(page.get_by_test_id("stSidebar")).to_contain_text('Hostile <b id="injected">')
    # A refresh keeps the workspace and the conversation (they are in the URL).
    page.reload()
    expect(messages).to_have_count(2, timeout=120_000)
    assert f"ws={ws}" in page.url and f"c={cid}" in page.url


def test_gpu_monitor_page(server, page):
    """Without an NVIDIA GPU (as here) the page says so, shows host memory, and charts the last minutes."""
    from playwright.sync_api import expect

    page.goto(f"{server}/GPU_monitor")
    main = page.get_by_test_id("stMain")
    expect(main).to_contain_text("No NVIDIA GPU found", timeout=120_000)
    expect(main).to_contain_text("Host memory used")
    expect(main).to_contain_text("This process (RSS)")
    expect(main).to_contain_text("No model is loaded")  # nothing has opened the chat page of this fresh server
    # The sampler started with the first visit; the fragment redraws every 2 s until the chart has two samples.
    expect(page.get_by_test_id("stVegaLiteChart")).to_have_count(1, timeout=60_000)
    assert "ws=" in page.url  # the page applies the access rules first, like every page
    page.set_viewport_size({"width": 1280, "height": 1150})  # the screenshot shows the whole page


def test_quantization_page(server, page, tmp_path):
    """A small run from the command line lands in the shared history; the page shows the prediction for the default
    preset with the published figures, and the run as a table of measured vs predicted with grouped bar charts."""
    import json

    from playwright.sync_api import expect

    from test_bench_memory import MID_GLM, run_cli

    config = tmp_path / "mid-glm.json"
    config.write_text(json.dumps(MID_GLM))
    done = run_cli("bench", "memory", "--model", str(config), "--levels", "bf16,int8,int4", "--encode", "256",
                   "--generate", "1024", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    page.goto(f"{server}/Quantization")
    main = page.get_by_test_id("stMain")
    expect(main).to_contain_text("Predicted from config.json", timeout=120_000)
    expect(main).to_contain_text("Encode 256: measured (GB)")  # the run, chosen in the history
    expect(main).to_contain_text("resident memory (RSS)")
    expect(page.get_by_test_id("stVegaLiteChart")).to_have_count(2, timeout=60_000)
    expect(page.get_by_test_id("stDownloadButton")).to_contain_text("Download every run as CSV")
    page.set_viewport_size({"width": 1400, "height": 1500})


def test_portal_chat_and_an_api_client_at_the_same_time(server, page):
    """One process, one model, one batch: a browser chat and an `openai` client streaming on the portal's port."""
    from concurrent.futures import ThreadPoolExecutor

    import openai
    from playwright.sync_api import expect

    page.goto(server)
    box = page.get_by_test_id("stChatInputTextArea")
    expect(box).to_be_enabled(timeout=240_000)
    api = openai.OpenAI(base_url=f"{server}/v1", api_key="unused: no keys, this machine", max_retries=0, timeout=120)

    def api_reply() -> str:
        chunks = api.chat.completions.create(model="m", messages=[{"role": "user", "content": "Name three colors."}],
                                             max_tokens=48, temperature=0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    with ThreadPoolExecutor(1) as pool:
        box.fill("What is the capital of France?")
        box.press("Enter")
        from_api = pool.submit(api_reply)
        messages = page.get_by_test_id("stChatMessage")
        expect(messages).to_have_count(2, timeout=120_000)
        expect(messages.nth(1)).to_contain_text("Paris", timeout=120_000)  # the page's reply streams meanwhile
        assert from_api.result(timeout=120).strip()
    alone = api.chat.completions.create(model="m", messages=[{"role": "user", "content": "Name three colors."}],
                                        max_tokens=48, temperature=0).choices[0].message.content
    assert alone == from_api.result()  # greedy: the batched reply is the reply alone
