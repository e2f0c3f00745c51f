"""Tool calls on the chat page in a real browser (the session's shared portal, the embedded model): a stored call and
result drawn as such and escaped, then a forced call made, answered with a result, and the model going on."""

import re

import pytest
from test_browser import page  # noqa: F401 - the page fixture (a fresh Chromium page, its screenshot kept)

from glm_core.conversations.conversation import ChatMessage, Conversation
from glm_core.conversations.store import Store
from glm_core.tool_calls import EXAMPLE_TOOLS, check_tools

pytestmark = [pytest.mark.browser, pytest.mark.server]

HOSTILE = '<img id="injected" src=x onerror="document.title=\'pwned\'">'


def choose_tool(page_, option: str) -> None:
    """Pick the tool choice; the dropdown is opened again if a rerun redrew the sidebar while it was opening."""
    from playwright.sync_api import expect

    box = page_.get_by_test_id("stSidebar").get_by_test_id("stSelectbox").filter(has_text="Tool choice")
    for _ in range(5):
        box.click()
        choice = page_.get_by_role("option", name=option, exact=True)
        try:
            choice.click(timeout=5_000)
            break
        except Exception:  # playwright's TimeoutError: the dropdown closed again
            page_.keyboard.press("Escape")
    expect(box.get_by_role("combobox")).to_have_value(option, timeout=30_000)


def test_a_call_is_drawn_as_a_call_and_its_result_answers_it(portal_data, server, page):  # noqa: F811
    from playwright.sync_api import expect

    store = Store(portal_data)
    ws = store.create_workspace()
    store.set_setting(ws, "sampling", {"max_new_tokens": 60, "temperature": 0.0})  # room for a whole call
    call = {"id": "call_old", "name": "get_time", "arguments": '{"timezone": "' + HOSTILE.replace('"', '\\"') + '"}'}
    [cid] = store.import_conversations(
        ws,
        [
            Conversation(
                title="Clock",
                tools=check_tools(EXAMPLE_TOOLS["Weather and time"]),
                messages=[
                    ChatMessage("user", "What time is it in Paris?"),
                    ChatMessage("assistant", "", tool_calls=[call]),
                    ChatMessage("tool", "12:00 " + HOSTILE, tool_call_id="call_old", tool_name="get_time"),
                    ChatMessage("assistant", "It is noon in Paris."),
                ],
            )
        ],
    )
    page.goto(f"{server}/?ws={ws}&c={cid}")
    messages = page.get_by_test_id("stChatMessage")
    expect(messages).to_have_count(4, timeout=240_000)
    expect(messages.nth(1)).to_contain_text("Calls get_time")
    expect(messages.nth(1).get_by_test_id("stCode")).to_contain_text('"timezone"')
    expect(messages.nth(2)).to_contain_text("Result of get_time")
    expect(messages.nth(2).get_by_test_id("stCode")).to_contain_text("12:00 <img")  # shown as typed
    assert page.locator("#injected").count() == 0 and page.title() != "pwned"

    expect(page.get_by_test_id("stChatInputTextArea")).to_be_enabled(timeout=240_000)  # the model is loaded
    choose_tool(page, "call get_time")
    box = page.get_by_test_id("stChatInputTextArea")
    box.fill("And in Tokyo?")
    box.press("Enter")
    expect(messages).to_have_count(7, timeout=240_000)  # ... the new call and the form asking for its result
    expect(messages.nth(5)).to_contain_text("Calls get_time", timeout=120_000)
    # the forced choice would make another call: let the model answer in words now
    choose_tool(page, "none (answer in text)")
    result = page.get_by_label(re.compile(r"Result of get\\?_time"))  # the label escapes Markdown: get\_time
    expect(result).to_be_visible(timeout=60_000)
    result.fill("19:00")
    page.get_by_role("button", name="Send the result").click()
    expect(messages).to_have_count(8, timeout=240_000)
    expect(messages.nth(6)).to_contain_text("19:00")
    expect(messages.nth(7)).to_contain_text("tokens/s", timeout=120_000)  # the stats line ends the reply
    [stored] = Store(portal_data).get_conversations(ws, [cid])
    assert [m.role for m in stored.messages][4:] == ["user", "assistant", "tool", "assistant"]
    assert stored.messages[5].tool_calls[0]["name"] == "get_time" and stored.messages[6].content == "19:00"
