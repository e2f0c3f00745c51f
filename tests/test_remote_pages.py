"""The portal with a remote backend beside the local one, through AppTest: a conversation switches its model (only
that conversation), streams from the server, keeps a cut reply with its one-line reason; the Conversations page
filters by model; the GPU monitor shows a vLLM server's /metrics figures."""

import pytest
from conftest import ROOT, page_app, shown
from faulty_openai_server import FaultyServer  # noqa: E402
from streamlit.testing.v1 import AppTest

from glm_core.backends.config import make_entry
from ui.resources import get_hub, get_store


@pytest.fixture
def server():
    s = FaultyServer().start()
    yield s
    s.stop()


@pytest.fixture
def remotes(server):
    hub = get_hub()
    names = []
    for model in ("words", "cut", "slow"):
        hub.add_remote(make_entry(f"srv-{model}", f"{server.url}#{model}", env={}))
        names.append(f"srv-{model}")
    yield names
    for name in names:
        hub.remove(name)


def home(backend: str | None = None) -> AppTest:
    at = AppTest.from_file(str(ROOT / "Home.py"), default_timeout=60)
    if backend:
        at.session_state["draft_backend"] = backend  # as if chosen in the sidebar: no local model needed
    at.run()
    assert not at.exception, at.exception
    return at


def test_a_conversation_talks_to_a_remote_model_and_remembers_it(data_dir, remotes):
    at = home("srv-words")
    sidebar = " ".join(c.value for c in at.sidebar.caption)
    assert "remote server 127\\.0\\.0\\.1" in sidebar and "Not known here" in sidebar
    assert at.selectbox(key=next(s.key for s in at.selectbox if s.key.startswith("backend_"))).value == "srv-words"
    at.chat_input[0].set_value("hello").run()
    assert not at.exception
    reply = at.chat_message[1]
    assert reply.markdown[0].value.startswith("word0 word1")
    assert "completion" in reply.caption[0].value and "words (remote)" in shown(reply.caption[0].value)
    ws, cid = at.query_params["ws"], at.session_state.conversation_id
    assert get_store().get_conversation(ws, cid).backend == "srv-words"

    # Switch this conversation to another model: stored with it; the next turn goes there.
    at.selectbox(key=f"backend_{cid}").set_value("srv-cut").run()
    assert get_store().get_conversation(ws, cid).backend == "srv-cut"
    at.chat_input[0].set_value("and again").run()
    assert not at.exception
    cut = at.chat_message[3]
    assert cut.markdown[0].value == "word0 word1 word2"  # the partial reply is kept
    assert "lost in the middle of the reply" in cut.error[0].value

    # The Conversations page filters by model.
    page = page_app("Conversations", timeout=60)
    page.session_state["workspace"] = ws
    page.run()
    assert not page.exception
    page.multiselect(key="filter_models").set_value(["cut"]).run()
    assert not page.exception and any("1 of 1" in c.value for c in page.caption)
    assert list(page.dataframe[0].value["Talks to"]) == ["srv-cut"]


def test_gpu_monitor_shows_a_remote_servers_metrics(data_dir, remotes):
    page = page_app("GPU_monitor", timeout=60)
    page.run()
    assert not page.exception
    text = " ".join(m.value for m in page.markdown) + " ".join(c.value for c in page.caption)
    assert "srv\\-slow" in text and "KV cache 25 % used · 0 running · 0 waiting" in text


def test_quantization_page_says_remote_models_are_measured_on_their_server(data_dir, remotes):
    page = page_app("Quantization", timeout=60)
    page.run()
    assert not page.exception
    assert any("srv\\-words" in i.value and "measured on it" in i.value for i in page.info)


def test_an_admin_adds_and_removes_a_remote_server_from_the_sidebar(data_dir, server):
    hub = get_hub()
    at = home()
    try:
        at.text_input(key="new_backend_name").set_value("team-vllm")
        at.text_input(key="new_backend_url").set_value(f"{server.url}#words")
        at.text_input(key="new_backend_key").set_value("sk-secret-key")
        at.button(key="add_backend").click().run()
        assert not at.exception and "team-vllm" in hub.names()
        picker = next(s for s in at.selectbox if s.key.startswith("backend_"))
        assert "team-vllm" in picker.options
        listing = " ".join(c.value for c in at.sidebar.caption)
        assert "team\\-vllm" in listing and "sk-secret-key" not in listing + " ".join(at.text_input.values)

        # A bad entry says why, adds nothing, and the form is ready again.
        at.text_input(key="new_backend_name").set_value("team-vllm")
        at.text_input(key="new_backend_url").set_value(f"{server.url}#cut")
        at.button(key="add_backend").click().run()
        assert "exists already" in at.sidebar.error[0].value
        at.text_input(key="new_backend_name").set_value("two words")
        at.text_input(key="new_backend_url").set_value(f"{server.url}#cut")
        at.button(key="add_backend").click().run()
        assert "a backend name is" in at.sidebar.error[0].value
        at.text_input(key="new_backend_name").set_value("not-a-server")
        at.text_input(key="new_backend_url").set_value("/etc")
        at.button(key="add_backend").click().run()
        assert "only remote servers" in at.sidebar.error[0].value
        assert sorted(n for n in hub.names() if not hub.is_local(n)) == ["team-vllm"]

        at.button(key="remove_backend_team-vllm").click().run()
        assert not at.exception and "team-vllm" not in hub.names()
        assert not any(b.key == "remove_backend_team-vllm" for b in at.button)
    finally:
        hub.remove("team-vllm")


def test_configured_keys_go_only_to_the_urls_they_were_configured_with(data_dir, server, monkeypatch):
    """The reproduction: with GLM_REMOTE_API_KEY and a configured backend's GLM_BACKEND_GLM4_KEY set, an admin adds a
    server named glm4 at a typed URL without a key, and types a URL in "Load another model": the listener behind
    both URLs must receive neither key. A configured backend still sends its own."""
    from glm_core.backends.config import make_entry as configured_entry

    monkeypatch.setenv("GLM_REMOTE_API_KEY", "sk-global")
    monkeypatch.setenv("GLM_BACKEND_GLM4_KEY", "sk-glm4")
    hub = get_hub()
    at = home()
    try:
        at.text_input(key="new_backend_name").set_value("glm4")
        at.text_input(key="new_backend_url").set_value(f"{server.url}#words")
        at.button(key="add_backend").click().run()
        assert not at.exception and "glm4" in hub.names()
        assert hub.get("glm4").submit("c1", [{"role": "user", "content": "hi"}]).wait(30).error is None
        at.text_input(key="load_path").set_value(f"{server.url}#words")
        at.button(key="load_button").click().run()
        assert not at.exception and hub.engine.card().backend == "remote"
        assert hub.engine.submit("c2", [{"role": "user", "content": "hi"}]).wait(30).error is None
        assert server.authorizations and set(server.authorizations) == {"Bearer EMPTY"}, server.authorizations
        # Configured (GLM_BACKENDS or secrets.toml) with that name and URL, the key is its own.
        server.authorizations.clear()
        configured = configured_entry("glm4", f"{server.url}#words")
        assert configured.api_key == "sk-glm4"
        monkeypatch.delenv("GLM_BACKEND_GLM4_KEY")
        assert configured_entry("other", f"{server.url}#words").api_key == "sk-global"
    finally:
        hub.remove("glm4")
        hub.unload()


def test_the_portal_starts_the_local_model_it_offers_and_none_when_it_offers_only_remote_servers(tmp_path, monkeypatch):
    """What the portal's lifespan loads when the server starts: GLM_BACKENDS' own local entry (not GLM_MODEL_PATH),
    the settings' model when nothing is configured, and nothing when only remote servers are (a local model loaded
    anyway would become the default for new conversations as soon as it was ready)."""
    from glm_core.backends.config import configured_backends
    from glm_core.backends.hub import BackendHub
    from ui.api_mount import load_configured_local_model

    only_remote = BackendHub(configured_backends(None, env={"GLM_BACKENDS": "peer=http://127.0.0.1:9/v1#m"}))
    load_configured_local_model(only_remote)
    assert only_remote.engine is None and only_remote.last_error is None and only_remote.names() == ["peer"]

    named = tmp_path / "no-model-here"
    with_local = BackendHub(
        configured_backends(None, env={"GLM_BACKENDS": f"mine={named}; peer=http://127.0.0.1:9/v1"})
    )
    load_configured_local_model(with_local)  # fails at once (no such folder): what it tried is kept
    assert with_local.last_error_spec.path == str(named) and with_local.engine is None

    monkeypatch.setenv("GLM_MODEL_PATH", str(tmp_path / "settings-model"))
    from_settings = BackendHub(configured_backends(None, env={}))  # nothing configured: the one local model
    load_configured_local_model(from_settings)
    assert from_settings.last_error_spec.path == str(tmp_path / "settings-model")


def test_a_non_admin_can_neither_add_nor_remove_servers(data_dir, remotes):
    """With admins named (here by a password nobody gave), a user's page offers no way to change what everyone uses:
    no remove button for any offered server, no add form; the servers stay offered."""
    at = AppTest.from_file(str(ROOT / "Home.py"), default_timeout=60)
    at.secrets = {"admin_password": "root pw"}
    at.session_state["draft_backend"] = remotes[0]
    at.run()
    assert not at.exception
    keys = [b.key for b in at.button]
    assert not [k for k in keys if k.startswith("remove_backend_")] and "add_backend" not in keys
    assert set(remotes) <= set(get_hub().names())
    admin = home(remotes[0])  # no secrets file: this machine's session is admin and has the buttons
    assert {f"remove_backend_{name}" for name in remotes} <= {b.key for b in admin.button}
