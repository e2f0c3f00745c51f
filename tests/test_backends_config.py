"""Several backends at once: GLM_BACKENDS and secrets.toml's [backends] parsing, the hub offering them by name, and
which backend a conversation talks to. Torch-free: nothing here loads a model."""

import pytest
from faulty_openai_server import FaultyServer  # noqa: E402

from glm_core import ModelSpec
from glm_core.backends.config import (
    configured_backends,
    conversation_backend,
    key_env_name,
    parse_backends_env,
    parse_backends_secrets,
)
from glm_core.backends.hub import BackendHub
from glm_core.backends.remote import RemoteBackend

LOCAL = ModelSpec("embedded", "int8", "cpu")


def test_glm_backends_env():
    env = {"GLM_BACKEND_GLM4_9B_KEY": "sk-secret"}
    entries = parse_backends_env(
        "local=embedded; glm4-9b=http://gpu1:8000/v1#THUDM/glm-4-9b-chat\n# a comment\n  llama = http://cpu2:8080 ;",
        local_defaults=LOCAL,
        env=env,
    )
    assert [e.name for e in entries] == ["local", "glm4-9b", "llama"]
    assert entries[0].spec == LOCAL and not entries[0].remote
    assert entries[1].spec.path == "http://gpu1:8000/v1#THUDM/glm-4-9b-chat" and entries[1].api_key == "sk-secret"
    assert entries[2].spec.path == "http://cpu2:8080/v1" and entries[2].api_key is None
    assert "sk-secret" not in repr(entries)  # a key never shows in a log line or a traceback
    assert key_env_name("glm4-9b") == "GLM_BACKEND_GLM4_9B_KEY"
    for bad, reason in [
        ("justaname", "name=model-or-URL"),
        ("a=embedded;b=/models/x", "at most one"),
        ("a=http://h/v1;a=http://g/v1", "given twice"),
        ("bad name!=http://h", "backend name"),
        ("r=http://u:p@h/v1", "not in the URL"),
    ]:
        with pytest.raises(ValueError, match=reason):
            parse_backends_env(bad, local_defaults=LOCAL, env={})


def test_secrets_section_wins_over_the_environment():
    section = {
        "vllm": {"url": "http://gpu1:8000/v1", "model": "THUDM/chatglm3-6b", "api_key": "k1"},
        "mine": {"path": "/models/chatglm2", "precision": "int4"},
    }
    entries = parse_backends_secrets(section, local_defaults=LOCAL, env={})
    assert entries[0].spec.path == "http://gpu1:8000/v1#THUDM/chatglm3-6b" and entries[0].api_key == "k1"
    assert entries[1].spec == ModelSpec("/models/chatglm2", "int4", "cpu")
    assert configured_backends(section, env={"GLM_BACKENDS": "x=http://h/v1"})[0].name == "vllm"
    assert configured_backends(None, env={"GLM_BACKENDS": "x=http://h/v1"})[0].name == "x"
    assert [e.name for e in configured_backends(None, env={})] == ["local"]
    with pytest.raises(ValueError, match="needs `url`"):
        parse_backends_secrets({"x": {"model": "m"}})


def test_conversation_backend_choice():
    assert conversation_backend("glm4", ["local", "glm4"], "local") == ("glm4", None)
    assert conversation_backend(None, ["local", "glm4"], "local") == ("local", None)
    name, note = conversation_backend("gone", ["local"], "local")
    assert name == "local" and "'gone'" in note and "not offered" in note


def test_hub_offers_several_backends_and_adds_and_removes_remote_ones():
    server = FaultyServer().start()
    try:
        entries = parse_backends_env(f"local=embedded; words={server.url}#words", local_defaults=LOCAL, env={})
        hub = BackendHub(entries)
        assert hub.names() == ["local", "words"] and hub.default_name == "local"
        assert hub.get("local") is None and hub.local_spec == LOCAL  # loaded on first use, not at start
        words = hub.get("words")
        assert isinstance(words, RemoteBackend) and words.submit("c", [{"role": "user", "content": "hi"}]).wait(5).text

        from glm_core.backends.config import make_entry

        hub.add_remote(make_entry("slow", f"{server.url}#slow", env={}))
        with pytest.raises(ValueError, match="exists already"):
            hub.add_remote(make_entry("words", f"{server.url}#words", env={}))
        assert hub.names() == ["local", "words", "slow"]
        hub.remove("words")
        assert hub.names() == ["local", "slow"] and hub.get("words") is None

        # A URL loaded into the local slot (the CLI's --model http://...) makes a remote backend there, no download.
        slot = hub.load(ModelSpec(f"{server.url}#words"))
        assert (
            isinstance(slot, RemoteBackend)
            and hub.engine is slot
            and hub.load(ModelSpec(server.url + "#words")) is slot
        )
        hub.close()
        assert hub.engine is None and hub.names() == ["local"]
    finally:
        server.stop()
