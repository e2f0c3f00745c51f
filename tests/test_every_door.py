"""One greedy prompt, one reply, whatever the door: the chat page (AppTest), the CLI on the local model, the HTTP API
on the portal's own port (started as a user starts it: `streamlit run Home.py`, default address, called at
127.0.0.1, localhost and [::1]), and the CLI through `serve` as a remote backend. Only `temperature 0` and the
reply's length are given; every other control takes the model's defaults, composed in one place
(sampling_defaults.compose_params). A ChatGLM2 checkpoint in the original layout is the model because its family's
documented defaults (no repetition penalty) differ from ours (1.1): a door that filled them differently would
give another reply."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request

import openai
import pytest
from api_helpers import free_port, start_portal, start_serve, wait_until_up
from conftest import ROOT, open_page, stop_process

pytestmark = pytest.mark.server

PROMPT = "今天天气怎么样？"
NEW_TOKENS = 12


def run_cli(*args, stdin: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "glm_core", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def glm2_folder(glm2):
    return str(glm2[0])


@pytest.fixture(scope="module")
def portal(glm2_folder, tmp_path_factory):
    """`streamlit run Home.py` as a user starts it: no address given (Streamlit listens on every interface, an IPv4
    client arriving as ::ffff:127.0.0.1), no keys."""
    port, folder = free_port(), tmp_path_factory.mktemp("portal")
    env = {
        "GLM_MODEL_PATH": glm2_folder,
        "GLM_PRECISION": "fp32",
        "GLM_DEVICE": "cpu",
        "GLM_DATA_DIR": str(folder / "data"),
    }
    for name in ("GLM_API_KEYS", "GLM_API_OPEN_TO_NETWORK"):
        env[name] = ""
    log_path = folder / "portal.log"
    with open(log_path, "w") as log:
        process = start_portal(port, log, address=None, **env)
    wait_until_up(process, f"http://127.0.0.1:{port}/health", 240, describe=log_path.read_text)
    yield port
    stop_process(process, timeout=30)


@pytest.fixture(scope="module")
def serve(glm2_folder, tmp_path_factory):
    port, folder = free_port(), tmp_path_factory.mktemp("serve")
    log_path = folder / "serve.log"
    with open(log_path, "w") as log:
        process = start_serve(
            port,
            "--model",
            glm2_folder,
            "--precision",
            "fp32",
            "--device",
            "cpu",
            log=log,
            GLM_DATA_DIR=str(folder / "data"),
        )
    wait_until_up(process, f"http://127.0.0.1:{port}/health", 240, describe=log_path.read_text)
    yield port
    stop_process(process, timeout=30)


def api_reply(base_url: str) -> str:
    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=300)
    completion = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": PROMPT}], temperature=0, max_tokens=NEW_TOKENS
    )
    assert completion.usage.completion_tokens == NEW_TOKENS
    return completion.choices[0].message.content


def page_reply(glm2_folder: str) -> str:
    from ui.resources import get_hub, get_store

    at = open_page()
    try:
        at.text_input(key="load_path").set_value(glm2_folder)
        at.selectbox(key="load_precision").set_value("fp32")
        at.button(key="load_button").click().run()
        assert not at.exception and not at.error
        at.slider(key="temperature").set_value(0.0)
        at.slider(key="max_new_tokens").set_value(NEW_TOKENS)
        at.chat_input[0].set_value(PROMPT).run()
        assert not at.exception and not at.error
        workspace = at.query_params["ws"]
        workspace = workspace[0] if isinstance(workspace, list) else workspace
        conversation = get_store().get_conversation(workspace, at.session_state.conversation_id)
        reply = conversation.messages[-1]
        assert reply.role == "assistant" and reply.params["repetition_penalty"] == 1.0
        return reply.content
    finally:
        get_hub().unload()  # the next page test loads the default again


def test_one_greedy_prompt_gives_one_reply_through_every_door(glm2_folder, portal, serve, env_cleanup):
    given = ("--temperature", "0", "--max-new-tokens", str(NEW_TOKENS))
    local = run_cli(
        "chat", "--model", glm2_folder, "--precision", "fp32", "--device", "cpu", *given, stdin=PROMPT + "\n"
    )
    assert local["completion_tokens"] == NEW_TOKENS
    # The reply must hold text, or an equality of empty strings would prove nothing.
    assert len(local["reply"].strip()) >= 3, local
    replies = {
        "CLI, local model": local["reply"],
        "CLI through serve": run_cli("chat", "--model", f"http://127.0.0.1:{serve}/v1", *given, stdin=PROMPT + "\n")[
            "reply"
        ],
        "API on serve": api_reply(f"http://127.0.0.1:{serve}/v1"),
        "chat page": page_reply(glm2_folder),
    }
    for host in ("127.0.0.1", "localhost", "[::1]"):  # the portal's own port answers its own machine however named
        replies[f"portal API at {host}"] = api_reply(f"http://{host}:{portal}/v1")
    assert set(replies.values()) == {local["reply"]}, replies


def test_the_api_names_the_models_defaults(serve):
    """What an omitted field becomes, and where it came from (as vLLM's --generation-config auto)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{serve}/v1/models", timeout=10) as response:
        model = json.loads(response.read())["data"][0]
    defaults = model["defaults"]
    assert (defaults["temperature"], defaults["top_p"], defaults["repetition_penalty"], defaults["top_k"]) == (
        0.8,
        0.8,
        1.0,
        0,
    )
    assert defaults["sources"]["repetition_penalty"] == "ChatGLM2/3 documented defaults"
