"""The chat's Compare mode in a real browser: the embedded model at INT8 and INT4 answering one prompt at once,
each column streaming, blind; a vote reveals the names and lands in the team's ranking."""

import pytest
from browser_support import need_chromium, running_portal
from test_browser import page  # noqa: F401 - the page fixture (a fresh Chromium page, its screenshot kept)

from glm_core.conversations.arena import Arena
from glm_core.conversations.store import Store

pytestmark = [pytest.mark.browser, pytest.mark.server]


def pick(page_, label: str) -> None:
    """Chooses one configuration and waits until the page has it (a slow rerun must not swallow the next pick)."""
    from playwright.sync_api import expect

    chooser = page_.get_by_test_id("stMultiSelect")
    chooser.click()
    page_.get_by_role("option", name=label, exact=True).click()
    page_.keyboard.press("Escape")
    expect(chooser).to_contain_text(label, timeout=60_000)


def test_two_levels_stream_side_by_side_and_a_blind_vote_ranks_them(page, output_dir, data_dir):  # noqa: F811
    from playwright.sync_api import expect

    need_chromium()
    workspace = Store(data_dir).create_workspace()
    Store(data_dir).set_setting(workspace, "sampling", {"max_new_tokens": 160})  # both replies run to this length
    env = {"GLM_PRECISION": "int8", "GLM_COMPILE": "off", "GLM_MODELS_MEMORY_MB": "6000"}
    with running_portal(output_dir, env, "streamlit-compare.log") as (url, _, _):
        page.goto(f"{url}/?ws={workspace}")
        expect(page.get_by_test_id("stChatInputTextArea")).to_be_enabled(timeout=240_000)  # the model is loaded
        page.get_by_text("Compare", exact=True).click()
        main = page.get_by_role("main")
        expect(main).to_contain_text("Configurations (2-4)", timeout=60_000)
        pick(page, "SmolLM2-135M-Instruct INT8")
        pick(page, "SmolLM2-135M-Instruct INT4")
        # By its own placeholder: while a rerun is slow, the chat's "Ask anything" box can stay drawn beside it.
        box = page.get_by_placeholder("One prompt to every column")
        expect(box).to_be_enabled(timeout=120_000)
        box.fill("Write a long story about a lighthouse keeper who finds a message in a bottle.")
        box.press("Enter")
        expect(main).to_contain_text("Answer B", timeout=240_000)  # INT4 loaded beside INT8, both columns drawn
        columns = main.get_by_test_id("stColumn")
        # Both columns have streamed text while no vote button exists yet (the buttons come once both are done).
        both_streaming = False
        for _ in range(600):
            texts = [columns.nth(i).inner_text() for i in range(2)]
            voting = page.get_by_role("button", name="Answer A is better").count() > 0
            if voting:
                break
            if all(len(t.replace("Answer A", "").replace("Answer B", "").strip(" …\n")) > 20 for t in texts):
                both_streaming = True
                page.screenshot(path=str(output_dir / "compare-streaming.png"), full_page=True)
                break
            page.wait_for_timeout(200)
        assert both_streaming, "both columns should stream before either vote button is shown"
        vote = page.get_by_role("button", name="Answer A is better")
        expect(vote).to_be_visible(timeout=300_000)
        assert "SmolLM2-135M-Instruct" not in columns.nth(0).inner_text()  # blind until the vote
        vote.click()
        expect(main).to_contain_text("Your vote: SmolLM2-135M-Instruct", timeout=60_000)
        expect(main).to_contain_text("160 tokens")  # each column's stats line, shown after the vote
        expect(main).to_contain_text("tokens/s")
        expect(main).to_contain_text("Blind-vote ranking of the team (1 pairwise votes)")
        expect(main).to_contain_text("Bradley-Terry")
        page.screenshot(path=str(output_dir / "compare-voted.png"), full_page=True)
    (vote_row,) = Arena(data_dir).votes(workspace)
    assert {vote_row.config_a, vote_row.config_b} == {"SmolLM2-135M-Instruct INT8", "SmolLM2-135M-Instruct INT4"}
    assert vote_row.winner in ("a", "b")


def test_quality_beside_cost_on_the_quantization_page(page, output_dir, data_dir):  # noqa: F811
    """A quality run of the embedded model from the command line lands in the team's history; the page shows it
    as a table and two charts: KL divergence against weights, top-1 agreement against tokens/s."""
    from playwright.sync_api import expect
    from test_cli import run_cli

    need_chromium()
    done = run_cli("bench", "quality", "--levels", "bf16,int8,int4", "--tokens", "96", "--decode-tokens", "8")
    assert done.returncode == 0, done.stderr
    with running_portal(output_dir, {"GLM_COMPILE": "off"}, "streamlit-quality.log") as (url, _, _):
        page.goto(f"{url}/Quantization")
        main = page.get_by_role("main")
        expect(main).to_contain_text("Quality per level", timeout=120_000)
        expect(main).to_contain_text("SmolLM2-135M-Instruct, 95 tokens of bundled, against FP32", timeout=60_000)
        expect(main).to_contain_text("KL divergence (mean) against the weights each level holds")
        expect(page.get_by_test_id("stVegaLiteChart")).to_have_count(2, timeout=60_000)
        expect(page.get_by_test_id("stDownloadButton")).to_contain_text(
            "Download every quality run as CSV", timeout=60_000
        )
        page.set_viewport_size({"width": 1400, "height": 1800})
        page.get_by_text("Quality per level").scroll_into_view_if_needed()
        page.screenshot(path=str(output_dir / "quality-beside-cost.png"), full_page=True)
