"""Home.py through Streamlit's AppTest, on the real embedded model."""

import pytest
from conftest import ROOT, shown
from streamlit.testing.v1 import AppTest

from ui.resources import get_store

HOME = str(ROOT / "Home.py")


def new_app() -> AppTest:
    at = AppTest.from_file(HOME, default_timeout=300)
    at.run()
    assert not at.exception
    return at


def send(at: AppTest, text: str) -> AppTest:
    at.chat_input[0].set_value(text).run()
    assert not at.exception
    return at


@pytest.fixture
def app(env_cleanup):
    at = new_app()
    at.slider(key="temperature").set_value(0.0).run()
    return at


def test_model_card_in_sidebar(app):
    sidebar = " ".join(m.value for m in app.sidebar.markdown) + " ".join(c.value for c in app.sidebar.caption)
    sidebar = sidebar.replace("\\", "")  # names are shown as text: their Markdown characters escaped
    assert "SmolLM2-135M-Instruct" in sidebar
    assert "BF16" in sidebar and "cpu" in sidebar and "parameters" in sidebar and "loaded in" in sidebar


def test_prompt_gets_a_streamed_reply_with_stats(app):
    send(app, "What is the capital of France?")
    assert [m.name for m in app.chat_message] == ["user", "assistant"]
    reply = app.chat_message[1]
    assert "Paris" in reply.markdown[0].value
    stats = reply.caption[0].value
    for part in ("prompt", "completion", "time to first token", "tokens/s"):
        assert part in stats

    # The second turn reuses the kept cache, and the page says so.
    send(app, "And of Germany?")
    assert len(app.chat_message) == 4
    assert "Berlin" in app.chat_message[3].markdown[0].value
    assert "(0 from cache)" not in shown(app.chat_message[3].caption[0].value)


def test_new_conversation_empties_the_chat_and_keeps_the_old_one(app):
    send(app, "Hello!")
    assert len(app.chat_message) == 2
    first_id = app.session_state.conversation_id
    app.button(key="new_conversation").click().run()
    assert len(app.chat_message) == 0 and app.session_state.conversation_id != first_id
    assert app.button(key=f"open_{first_id}").label == "Hello\\!"  # listed in the sidebar, Markdown-escaped


def test_empty_prompt_is_ignored(app):
    send(app, "   ")
    assert len(app.chat_message) == 0 and not app.error


def test_oversized_prompt_is_refused_without_losing_it(app):
    app.number_input(key="max_length").set_value(256).run()
    app.slider(key="max_new_tokens").set_value(64).run()
    long_prompt = "Tell me about this. " * 100
    send(app, long_prompt)
    assert any("too long" in e.value for e in app.error)
    assert any(long_prompt.strip() in c.value for c in app.code)  # handed back to edit and resend
    assert get_store().list_conversations(app.query_params["ws"]) == []  # nothing was stored


def test_bad_model_path_shows_the_reason_and_keeps_the_model(app, tmp_path):
    app.text_input(key="load_path").set_value(str(tmp_path / "no-such-model"))
    app.button(key="load_button").click().run()
    assert not app.exception
    assert any("no such file" in e.value for e in app.error)
    # The running model stays loaded and answers.
    send(app, "What is the capital of France?")
    assert "Paris" in app.chat_message[1].markdown[0].value


def test_default_model_that_fails_to_load_leaves_the_app_usable(env_cleanup, tmp_path):
    from ui.resources import get_hub

    get_hub().unload()
    env_cleanup.setenv("GLM_MODEL_PATH", str(tmp_path / "missing"))
    at = new_app()
    assert any("no such file" in e.value for e in at.error)
    assert at.chat_input[0].disabled
    env_cleanup.delenv("GLM_MODEL_PATH")
    at = new_app()  # the embedded default loads again
    assert not at.error and not at.chat_input[0].disabled
