"""The HTTP API (glm_core.api) on a real server over real sockets, with the tiny model: the official `openai`
client, the seeds' request bodies byte for byte, keys, errors, stop on disconnect, concurrency, kept caches."""

from __future__ import annotations

import json
import re
import threading
import time

import openai
import pytest

from api_helpers import ThreadServer, json_frames, raw_request, sse_frames
from glm_core.api import ApiConfig, create_app
from glm_core.api.config import ApiLimits
from glm_core.engine import Engine

KEYS = tuple(f"test-key-{i:02d}" for i in range(16))
ADMIN_KEY = "test-admin-key"
LIMITS = ApiLimits(max_body_bytes=64 * 1024, max_tokens=4096, default_max_tokens=16)


@pytest.fixture(scope="module")
def engine(tiny_loaded):
    engine = Engine(tiny_loaded)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def server(engine):
    config = ApiConfig(keys=KEYS, admin_keys=(ADMIN_KEY,), limits=LIMITS)
    with ThreadServer(create_app(lambda: engine, config)) as running:
        yield running


def client(server, key=KEYS[0], **options) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, **options)


def auth(key=KEYS[0]) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_openai_client_non_streamed_and_streamed_give_the_same_seeded_reply(server):
    api = client(server)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count to three."}]
    whole = api.chat.completions.create(model="anything", messages=messages, max_tokens=8, seed=7, temperature=1)
    assert whole.object == "chat.completion" and whole.id.startswith("chatcmpl-")
    [choice] = whole.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"  # the tiny model rambles until the limit
    assert whole.usage.completion_tokens == 8 and whole.usage.prompt_tokens > 5
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 8

    chunks = list(api.chat.completions.create(model="anything", messages=messages, max_tokens=8, seed=7, temperature=1,
                                              stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finishing = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishing == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert {c.model for c in chunks} == {whole.model}


def test_models_and_embeddings_through_the_openai_client(server, engine):
    api = client(server)
    [model] = api.models.list().data
    assert model.id == engine.card()["name"] and model.object == "model"
    by_default = api.embeddings.create(model=model.id, input=["hello world", "hello GPT"])  # base64 on the wire
    as_floats = api.embeddings.create(model=model.id, input="hello world", encoding_format="float")
    vectors = [d.embedding for d in by_default.data]
    assert len(vectors) == 2 and len(vectors[0]) == 64  # the tiny model's hidden size
    assert all(abs(sum(x * x for x in v) - 1) < 1e-4 for v in vectors)
    assert as_floats.data[0].embedding == pytest.approx(vectors[0], abs=1e-6)
    assert by_default.usage.prompt_tokens > 2


def test_keys_are_required_and_checked(server):
    with pytest.raises(openai.AuthenticationError):
        client(server, key="not-a-key").models.list()
    status, _, body = raw_request(server.port, "GET", "/v1/models")
    error = json.loads(body)["error"]
    assert status == 401 and error["code"] == "missing_api_key" and "Bearer" in error["message"]
    status, _, body = raw_request(server.port, "POST", "/", b'{"prompt": "hi", "history": []}')
    assert status == 401
    status, _, body = raw_request(server.port, "GET", "/health")  # the one route without a key
    assert status == 200 and json.loads(body)["status"] == "ok"
    assert raw_request(server.port, "GET", "/free_gc", headers=auth())[0] == 403  # not an admin key
    status, _, body = raw_request(server.port, "GET", "/free_gc", headers=auth(ADMIN_KEY))
    assert status == 200 and json.loads(body) == {"success": True}


@pytest.mark.parametrize("body, status, words", [
    (b'{"messages": [', 400, "not valid JSON"),
    (b'{"model": "m"}', 400, "messages"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 5}', 400, "temperature"),
    (b'{"messages": [{"role": "assistant", "content": "hi"}]}', 400, "end with a user message"),
    (b'{"messages": [{"role": "tool", "content": "hi"}]}', 400, "role"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}', 400, "at most 4096"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4090}', 400, "context is 4096"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "n": 2}', 400, "n"),
    (b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', 400, "text content"),
    (b'{"messages": [{"role": "user", "content": "' + b"x" * 70_000 + b'"}]}', 413, "larger"),
])
def test_bad_requests_get_a_clear_error_in_openai_shape(server, body, status, words):
    got, _, answer = raw_request(server.port, "POST", "/v1/chat/completions", body, auth())
    assert got == status, answer
    error = json.loads(answer)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words.lower() in error["message"].lower() and "Traceback" not in error["message"]


def test_unknown_routes_and_methods_answer_in_the_same_shape(server):
    status, _, body = raw_request(server.port, "GET", "/v1/nothing", headers=auth())
    assert status == 404 and json.loads(body)["error"]["type"] == "not_found_error"
    status, _, body = raw_request(server.port, "GET", "/v1/chat/completions", headers=auth())
    assert status == 405 and "error" in json.loads(body)
