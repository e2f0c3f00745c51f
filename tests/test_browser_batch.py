"""Four people in four browsers send a prompt at the same moment: all four replies stream at once (the engine
decodes them together) instead of one after another."""

import contextlib
import re

import pytest
from browser_support import CHROMIUM, CHROMIUM_ARGS

pytestmark = [pytest.mark.browser, pytest.mark.server, pytest.mark.solo]

PROMPTS = [
    "Write a 2000-word essay on the history of the Roman Empire, with a title and sections.",
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in great detail how a steam engine works, step by step.",
    "Describe a journey through every country of South America, one long paragraph each.",
]


def test_four_browsers_stream_their_replies_at_the_same_time(server, output_dir):
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        pages = [browser.new_context(viewport={"width": 1100, "height": 800}).new_page() for _ in PROMPTS]
        try:
            for page in pages:
                page.goto(server)
            boxes = [page.get_by_test_id("stChatInputTextArea") for page in pages]
            for box in boxes:
                expect(box).to_be_enabled(timeout=240_000)
            for box, prompt in zip(boxes, PROMPTS):
                box.fill(prompt)
            for box in boxes:
                box.press("Enter")
            # The reply's text (the message also holds its avatar icon's name).
            replies = [
                page.get_by_test_id("stChatMessage").nth(1).get_by_test_id("stMarkdownContainer").first
                for page in pages
            ]
            for reply in replies:  # every reply has started streaming ...
                expect(reply).to_contain_text(re.compile(r"\w"), timeout=180_000)
            first = [len(reply.inner_text()) for reply in replies]
            pages[0].wait_for_timeout(10_000)
            grown = [len(reply.inner_text()) > n for reply, n in zip(replies, first)]
            # ... and while all four have text, they keep growing together: none waited for another to finish.
            assert sum(grown) >= 3, f"replies that grew in the same 10 s: {grown}"
            for page in pages:  # stop the replies still running (a sampled reply may have ended on its own)
                stop = page.get_by_test_id("stChatInputStopButton")
                if stop.is_visible():
                    with contextlib.suppress(PlaywrightTimeoutError):  # it ended between the look and the click
                        stop.click(timeout=5_000)
        finally:
            for number, page in enumerate(pages, start=1):
                page.screenshot(path=str(output_dir / f"four_browsers_{number}.png"), full_page=True)
            browser.close()
