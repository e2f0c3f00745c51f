"""Real browser: `streamlit run Home.py`, Debian's chromium driven by Playwright, a prompt and its reply."""

import json
import re
import socket
import time
from pathlib import Path

import pytest
from browser_support import CHROMIUM, CHROMIUM_ARGS, need_chromium, portal, running_portal
from conftest import OUTPUT_DIR

pytestmark = [pytest.mark.browser, pytest.mark.server]


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
    # Greedy, as a person sets it: at the card's temperature 0.2 the embedded model answers "L'Étoile, la Cité..."
    # to this prompt in 4 samples of 16 (seeds 0-15), and "Paris" greedily.
    temperature = page.get_by_test_id("stSidebar").get_by_test_id("stSlider").filter(has_text="Temperature")
    thumb = temperature.get_by_role("slider")
    thumb.focus()
    thumb.press("Home")
    expect(thumb).to_have_value("0")
    box.fill("What is the capital of France?")
    box.press("Enter")
    messages = page.get_by_test_id("stChatMessage")
    expect(messages).to_have_count(2, timeout=120_000)
    expect(messages.nth(1)).to_contain_text("tokens/s", timeout=120_000)  # the stats line ends the reply
    # The reply's own text (the message's inner text also holds the avatar icon's name).
    expect(messages.nth(1).get_by_test_id("stMarkdownContainer").first).to_contain_text("Paris")
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
    system_prompt = page.get_by_label("System prompt", exact=True)
    system_prompt.fill("Be brief.")
    system_prompt.press("Control+Enter")
    expect(messages.nth(1)).to_contain_text("stopped", timeout=60_000)
    stopped = messages.nth(1).get_by_test_id("stMarkdownContainer").first.inner_text()
    assert stopped.strip(), stopped  # the partial reply's own text (not the avatar's icon name), kept


def test_stored_conversation_reopens_from_the_url_and_shows_html_as_text(portal_data, server, page):
    from playwright.sync_api import expect

    from glm_core.conversations.conversation import ChatMessage, Conversation
    from glm_core.conversations.store import Store

    hostile = '<b id="injected">bold?</b><img id="injected-img" src=x onerror="document.title=\'pwned\'">'
    store = Store(portal_data)
    ws = store.create_workspace()
    [cid] = store.import_conversations(
        ws,
        [
            Conversation(
                title="Hostile " + hostile,
                messages=[
                    ChatMessage("user", hostile),
                    ChatMessage("assistant", "**Markdown still works** " + hostile),
                ],
            )
        ],
    )
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
    # the portal loads its default model when it starts: the page names it, its level, device and weights
    expect(main).to_contain_text(re.compile(r"Model: SmolLM2-135M-Instruct · (FP32|BF16) · cpu · weights \d+ MiB"))
    # The sampler started with the first visit; the fragment redraws every 2 s until the chart has two samples.
    expect(page.get_by_test_id("stVegaLiteChart")).to_have_count(1, timeout=60_000)
    assert "ws=" in page.url  # the page applies the access rules first, like every page
    page.set_viewport_size({"width": 1280, "height": 1150})  # the screenshot shows the whole page


def test_quantization_page(server, portal_data, page, tmp_path, monkeypatch):
    """A small run from the command line lands in the shared history; the page shows the prediction for the default
    preset with the published figures, and the run as a table of measured vs predicted with grouped bar charts."""
    import json

    from playwright.sync_api import expect
    from test_bench_memory import MID_GLM, run_cli

    config = tmp_path / "mid-glm.json"
    config.write_text(json.dumps(MID_GLM))
    monkeypatch.setenv("GLM_DATA_DIR", str(portal_data))  # the run goes to the portal's history
    done = run_cli(
        "bench",
        "memory",
        "--model",
        str(config),
        "--levels",
        "bf16,int8,int4",
        "--encode",
        "256",
        "--generate",
        "1024",
        "--device",
        "cpu",
    )
    assert done.returncode == 0, done.stderr
    page.goto(f"{server}/Quantization")
    main = page.get_by_test_id("stMain")
    expect(main).to_contain_text("Predicted from config.json", timeout=120_000)
    expect(main).to_contain_text("Encode 256: measured (GB)")  # the run, chosen in the history
    expect(main).to_contain_text("resident memory (RSS)")
    expect(page.get_by_test_id("stVegaLiteChart")).to_have_count(2, timeout=60_000)
    expect(page.get_by_test_id("stDownloadButton")).to_contain_text("Download every run as CSV")
    page.set_viewport_size({"width": 1400, "height": 1500})


# At BF16 (auto's choice on a CPU with native BF16), sums differ in their last bits with the batch's shape: a greedy
# reply that rambles (the embedded model's 1.1 penalty makes this one ramble) can then take another word. With no
# penalty it is a short list whose every token wins by a wide margin (under load, 2 of 2 runs differed with 1.1).
NO_PENALTY = {"repetition_penalty": 1.0}


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
        chunks = api.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "Name three colors."}],
            max_tokens=24,
            temperature=0,
            stream=True,
            extra_body=NO_PENALTY,
        )
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    with ThreadPoolExecutor(1) as pool:
        box.fill("What is the capital of France?")
        box.press("Enter")
        from_api = pool.submit(api_reply)
        messages = page.get_by_test_id("stChatMessage")
        expect(messages).to_have_count(2, timeout=120_000)
        expect(messages.nth(1)).to_contain_text("tokens/s", timeout=120_000)  # the page's reply ended meanwhile
        assert from_api.result(timeout=120).strip()
    alone = (
        api.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "Name three colors."}],
            max_tokens=24,
            temperature=0,
            extra_body=NO_PENALTY,
        )
        .choices[0]
        .message.content
    )
    assert alone == from_api.result()  # greedy: the batched reply is the reply alone


def stored_workspace(data_dir, sampling=None):
    """A workspace made here, opened by URL (the server shares GLM_DATA_DIR), with its own sampling settings."""
    from glm_core.conversations.store import Store

    store = Store(data_dir)
    ws = store.create_workspace()
    if sampling:
        store.set_setting(ws, "sampling", sampling)
    return store, ws


# Records, in the page, when the streaming reply's text grows: [(ms, characters), ...].
WATCH_REPLY = """(index) => {
    window.growth = [];
    const observer = new MutationObserver(() => {
        const message = document.querySelectorAll('[data-testid="stChatMessage"]')[index];
        const text = message && [...message.querySelectorAll('[data-testid="stMarkdownContainer"]')]
            .find(element => !element.closest('[data-testid="stAlert"]'));  // not "Waiting for the model"
        const length = text ? text.innerText.length : 0;
        const last = window.growth.length ? window.growth[window.growth.length - 1][1] : 0;
        if (length > last) window.growth.push([performance.now(), length]);
    });
    observer.observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def seen_speed(page, reply_index: int) -> dict:
    """Tokens/s as the reader saw them (completion tokens after the first, over the time the text took to grow to
    its final length) against the engine's figure on the reply's stats line."""
    import re

    message = page.get_by_test_id("stChatMessage").nth(reply_index)
    stats = message.get_by_test_id("stCaptionContainer").first.inner_text()
    tokens = int(re.search(r"completion ([\d,]+) tokens", stats).group(1).replace(",", ""))
    engine = float(re.search(r"([\d.]+) tokens/s", stats).group(1))
    growth = page.evaluate("window.growth")
    Path(OUTPUT_DIR / f"speed-growth-{reply_index}-{time.time():.0f}.json").write_text(json.dumps([stats, growth]))
    final = growth[-1][1]
    start = growth[0][0]
    end = next(t for t, length in growth if length >= 0.98 * final)
    seconds = (end - start) / 1000
    gaps = [later[0] - earlier[0] for earlier, later in zip(growth, growth[1:])]
    return {
        "steps": len(growth),
        "longest_pause_share": max(gaps, default=0) / max(end - start, 1),
        "tokens": tokens,
        "characters": final,
        "seconds": seconds,
        "engine": engine,
        "browser": (tokens - 1) / seconds,
        "characters_per_s": final / seconds,
    }


def engine_alone(prompts, sampling) -> list[float]:
    """Decode tokens/s of the same greedy replies from the embedded model in this process, one at a time."""
    from glm_core import ModelSpec, SamplingParams
    from glm_core.backends.hub import BackendHub

    hub = BackendHub()
    engine = hub.load(ModelSpec("embedded"))
    try:
        params = SamplingParams(top_p=0.9, **sampling)
        return [
            engine.submit(f"alone-{i}", [{"role": "user", "content": prompt}], params).wait().stats.decode_tokens_per_s
            for i, prompt in enumerate(prompts)
        ]
    finally:
        hub.unload()


@pytest.mark.solo
def test_browser_speed_matches_the_engine(portal_data, server, output_dir):
    """Two sessions stream a long greedy reply each, at once; each reader sees the reply grow as it is generated:
    in many steps, none of them a long freeze. The speed as the reader saw it against the engine's figure is
    printed (a ratio measured in one run), not asserted: on a busy 2-core machine the browser's own drawing takes
    the cores the decode loop needs."""
    from playwright.sync_api import expect, sync_playwright

    sampling = {"max_new_tokens": 200, "temperature": 0.0, "repetition_penalty": 1.1}
    prompts = (
        "Write a long story about a dragon who learns to bake bread.",
        "Write a long story about a robot who learns to paint.",
    )
    results = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        pages = []
        for prompt in prompts:
            _, ws = stored_workspace(portal_data, sampling)
            page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
            page.goto(f"{server}/?ws={ws}")
            expect(page.get_by_test_id("stChatInputTextArea")).to_be_enabled(timeout=240_000)
            page.evaluate(WATCH_REPLY, 1)
            page.get_by_test_id("stChatInputTextArea").fill(prompt)
            pages.append(page)
        for page in pages:
            page.get_by_test_id("stChatInputTextArea").press("Enter")
        for index, page in enumerate(pages):
            expect(page.get_by_test_id("stChatMessage").nth(1)).to_contain_text("tokens/s", timeout=600_000)
            results.append(seen_speed(page, 1))
            page.screenshot(path=str(output_dir / f"test_browser_speed_session_{index + 1}.png"), full_page=True)
        browser.close()
    alone = engine_alone(prompts, sampling)  # the same replies with no page drawing them (the server idles now)
    for index, (r, solo) in enumerate(zip(results, alone), start=1):
        print(
            f"\nsession {index}: {r['tokens']} tokens, {r['characters']} characters in {r['seconds']:.1f} s: "
            f"browser {r['browser']:.1f} tokens/s ({r['characters_per_s']:.0f} characters/s), stats line "
            f"{r['engine']:.1f} tokens/s, ratio {r['browser'] / r['engine']:.2f}; the engine alone, same reply: "
            f"{solo:.1f} tokens/s, browser / alone {r['browser'] / solo:.2f}"
        )
    for r in results:
        assert r["tokens"] > 50
        assert r["steps"] >= r["tokens"] // 10, r  # drawn as it came, not at the end
        assert r["longest_pause_share"] < 0.5, r  # no freeze of half the reply's time


def open_popover(page, popover) -> None:
    """Open a popover. A rerun that lands just after the click (the page was still settling after the previous
    action) can close it again, as it would for a person, who clicks again: so click until its body shows."""
    from playwright.sync_api import expect

    body = page.get_by_test_id("stPopoverBody")
    for _ in range(3):
        popover.get_by_role("button").click()
        try:
            expect(body).to_be_visible(timeout=5_000)
            return
        except AssertionError:
            continue
    expect(body).to_be_visible()


def test_versions_defaults_copy_and_share_link(portal_data, server, page, output_dir):
    """Regenerate adds a version to flip between; the sidebar shows where each default came from; each message has
    a copy button; a share link opened in another browser context shows that conversation only, read-only."""
    from playwright.sync_api import expect

    from glm_core.conversations.conversation import ChatMessage, Conversation

    store, ws = stored_workspace(portal_data, {"max_new_tokens": 24, "temperature": 0.0})
    code_and_math = (
        "Here is code:\n\n```python\ndef square(x):\n    return x ** 2\n```\n\n"
        "and Euler's identity: $e^{i\\pi} + 1 = 0$"
    )
    [other] = store.import_conversations(
        ws,
        [
            Conversation(
                title="Not shared",
                messages=[ChatMessage("user", "A private question"), ChatMessage("assistant", "A private answer")],
            )
        ],
    )
    [cid] = store.import_conversations(
        ws,
        [
            Conversation(
                title="Versions",
                messages=[ChatMessage("user", "Show me code and maths"), ChatMessage("assistant", code_and_math)],
            )
        ],
    )
    page.goto(f"{server}/?ws={ws}&c={cid}")
    messages = page.get_by_test_id("stChatMessage")
    expect(messages).to_have_count(2, timeout=240_000)
    # Code is highlighted and LaTeX rendered by Streamlit's Markdown.
    expect(messages.nth(1).locator(".katex").first).to_be_visible()
    expect(messages.nth(1).get_by_test_id("stCode")).to_contain_text("return x ** 2")
    sidebar = page.get_by_test_id("stSidebar")
    expect(sidebar).to_contain_text("SmolLM2 model card: top p 0.9")  # the model's default, and where it came from
    expect(sidebar).to_contain_text("your settings: max new tokens 24 (model: 1024), temperature 0 (model: 0.2)")
    page.get_by_role("button", name="Regenerate").click()
    expect(messages.nth(1)).to_contain_text("tokens/s", timeout=120_000)
    expect(messages.nth(1)).to_contain_text("2/2", timeout=60_000)
    page.get_by_role("button", name="‹").click()
    expect(messages.nth(1)).to_contain_text("1/2", timeout=60_000)
    expect(messages.nth(1)).to_contain_text("Euler")
    copy_buttons = page.get_by_test_id("stPopover")
    expect(copy_buttons).to_have_count(2)  # one per message
    # The popover holds the shown version's raw text. One opened while the flip's rerun is still redrawing can hold
    # the other version's: a person closes it and opens it again, and so does the test.
    code = page.get_by_test_id("stPopoverBody").get_by_test_id("stCode")
    for attempt in range(3):
        open_popover(page, copy_buttons.nth(1))
        try:
            expect(code).to_contain_text("$e^{i\\pi} + 1 = 0$", timeout=10_000)
            break
        except AssertionError:
            page.keyboard.press("Escape")
            if attempt == 2:
                raise
    page.keyboard.press("Escape")
    page.screenshot(path=str(output_dir / "versions.png"), full_page=True)
    sidebar.get_by_role("button", name="Reset to the model's defaults").scroll_into_view_if_needed()
    page.screenshot(path=str(output_dir / "sidebar_defaults.png"))

    # A click that lands while the page is still redrawing after the flip can be lost with the element it hit (the
    # sidebar's expander closes again, or the button is replaced): a person opens the menu and clicks again, and so
    # does the test.
    menu = sidebar.get_by_text("Rename, pin, archive, share or delete")
    share = sidebar.get_by_role("button", name="Share a read-only link")
    shown_link = sidebar.get_by_test_id("stCode")
    for attempt in range(3):
        if shown_link.count():  # the last click took effect after all
            break
        if not share.is_visible():
            menu.click()
        share.click()
        try:
            expect(shown_link).to_be_attached(timeout=15_000)
            break
        except AssertionError:
            page.screenshot(path=str(output_dir / f"share_click_lost_{attempt}.png"), full_page=True)
            if attempt == 2:
                raise
    link = shown_link.inner_text().strip()
    assert link.startswith(server) and "/Shared?share=" in link and ws not in link

    viewer = page.context.browser.new_context(viewport={"width": 1000, "height": 800}).new_page()
    viewer.goto(link)
    shown = viewer.get_by_test_id("stChatMessage")
    expect(shown).to_have_count(2, timeout=120_000)
    expect(shown.nth(0)).to_contain_text("Show me code and maths")
    main = viewer.get_by_test_id("stMain")
    expect(main).to_contain_text("Shared read-only")
    assert "A private" not in viewer.content() and ws not in viewer.url and other not in viewer.content()
    assert (
        viewer.get_by_test_id("stChatInput").count() == 0
        and viewer.get_by_role("button", name="Regenerate").count() == 0
    )
    viewer.screenshot(path=str(output_dir / "shared_conversation.png"), full_page=True)
    store.revoke_share(ws, cid)
    viewer.reload()
    expect(viewer.get_by_test_id("stMain")).to_contain_text("not valid", timeout=60_000)
    viewer.context.close()


def lan_address() -> str | None:
    """An IPv4 address of this machine that is not loopback: a browser reaching the portal through it arrives as a
    colleague's browser on the network would, from a non-loopback address."""
    import psutil

    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return address.address
    return None


def test_without_secrets_only_this_machines_browsers_are_admins(page, output_dir, tiny_model_dir):
    """The portal started as a user starts it (default address: every interface, no secrets file): a browser on
    the server's own machine is admin; one arriving from the network is a user, and the sidebar says how an admin
    is configured. The portal prints who is admin when it starts."""
    from playwright.sync_api import expect

    lan = lan_address()
    if lan is None:
        pytest.skip("this machine has no non-loopback IPv4 address to arrive from")
    env = {"GLM_MODEL_PATH": str(tiny_model_dir), "GLM_PRECISION": "fp32"}
    with running_portal(output_dir, env, "streamlit-admin.log", address=None) as (url, _, log_path):
        port = url.rsplit(":", 1)[1]
        sidebar = page.get_by_test_id("stSidebar")
        page.goto(f"http://{lan}:{port}")
        expect(sidebar).to_contain_text("Only browsers on the server's own machine are admins", timeout=120_000)
        expect(sidebar).to_contain_text("Only admins load another model")
        assert page.get_by_test_id("stSidebar").get_by_text("Load another model", exact=True).count() == 0
        page.goto(url)
        expect(sidebar).to_contain_text("You are an admin", timeout=120_000)
        expect(sidebar.get_by_text("Load another model", exact=True)).to_have_count(1)
        assert "Admins: browsers on this machine only" in log_path.read_text()


def test_a_portal_killed_mid_reply_shows_the_reply_interrupted_after_a_restart(page, output_dir, tmp_path):
    """kill -9 of the real `streamlit run Home.py` while a reply streams; the portal restarted on the same data shows
    the reply as far as it was stored, marked interrupted, in the same conversation's URL."""
    from urllib.parse import parse_qs, urlsplit

    from playwright.sync_api import expect

    need_chromium()
    env = {"GLM_DATA_DIR": str(tmp_path / "data")}
    with running_portal(output_dir, env, "streamlit-killed.log") as (url, process, _):
        page.goto(url)
        box = page.get_by_test_id("stChatInputTextArea")
        expect(box).to_be_enabled(timeout=240_000)
        box.fill("Write a 2000-word essay on the history of the Roman Empire, with a title and sections.")
        box.press("Enter")
        reply = page.get_by_test_id("stChatMessage").nth(1).get_by_test_id("stMarkdownContainer").first
        expect(reply).not_to_be_empty(timeout=120_000)
        page.wait_for_timeout(3000)  # the store receives the reply every second while it streams
        workspace = parse_qs(urlsplit(page.url).query)["ws"][0]
        process.kill()  # SIGKILL: no shutdown hook runs
        process.wait()
    from glm_core.conversations.store import Store

    [conversation] = Store(tmp_path / "data").list_conversations(workspace)
    with running_portal(output_dir, env, "streamlit-restarted.log") as (url, _, _):
        page.goto(f"{url}/?ws={workspace}&c={conversation.id}")
        messages = page.get_by_test_id("stChatMessage")
        expect(messages).to_have_count(2, timeout=120_000)
        expect(messages.nth(1)).to_contain_text("interrupted", timeout=60_000)
        kept = messages.nth(1).get_by_test_id("stMarkdownContainer").first.inner_text()
        assert kept.strip(), "the reply stored before the kill is shown"


def test_a_reasoning_model_s_thinking_folds_above_its_answer(page, output_dir, tmp_path):
    """A GLM-4.5-style model that thinks, then answers (tests/glm_family_fixtures.py), loaded as the portal's
    model: the reply shows a closed "Thinking" section above the answer; opening it shows the thinking."""
    from glm_family_fixtures import write_reasoning_folder
    from playwright.sync_api import expect

    need_chromium()
    folder, chain = write_reasoning_folder(tmp_path / "glm-45-tiny")
    env = {"GLM_MODEL_PATH": str(folder), "GLM_PRECISION": "fp32"}
    with portal(output_dir, env, log_name="streamlit-reasoning.log") as url:
        page.goto(url)
        box = page.get_by_test_id("stChatInputTextArea")
        expect(box).to_be_enabled(timeout=240_000)
        expect(page.get_by_test_id("stSidebar")).to_contain_text("Think before answering")
        box.fill("Capital?")
        box.press("Enter")
        messages = page.get_by_test_id("stChatMessage")
        expect(messages).to_have_count(2, timeout=120_000)
        reply = messages.nth(1)
        expect(reply).to_contain_text("tokens/s", timeout=120_000)
        thinking = reply.get_by_test_id("stExpander")
        expect(thinking).to_contain_text("Thinking")
        expect(reply).to_contain_text(chain["answer"])
        expect(reply).not_to_contain_text("<think>")
        thinking.get_by_text("Thinking").click()
        expect(thinking).to_contain_text(chain["reasoning"])
