"""The HTTP API (glm_core.api) on a real server over real sockets, with the tiny model: the official `openai`
client, the seeds' request bodies byte for byte, keys, errors, stop on disconnect, concurrency, kept caches."""

from __future__ import annotations

import dataclasses
import http.client
import json
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from api_helpers import (
    ThreadServer,
    free_port,
    json_frames,
    raw_request,
    sse_frames,
    start_portal,
    start_serve,
    wait_until_up,
)
from conftest import stop_process

from glm_core.api import ApiConfig, create_app
from glm_core.api.config import ApiLimits

KEYS = tuple(f"test-key-{i:02d}" for i in range(16))
ADMIN_KEY = "test-admin-key"
# Replies stay short (the tiny model rambles until a limit): the seeds' max_length 2048 is capped by max_tokens.
LIMITS = ApiLimits(max_body_bytes=64 * 1024, max_tokens=24, default_max_tokens=16)
LONG = "hello " * 4200  # over the tiny model's 4096-token context, under the body limit


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

    chunks = list(
        api.chat.completions.create(
            model="anything",
            messages=messages,
            max_tokens=8,
            seed=7,
            temperature=1,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finishing = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishing == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert {c.model for c in chunks} == {whole.model}


def test_a_stop_string_ends_the_reply_before_it(server):
    api = client(server, KEYS[9])
    options = dict(
        model="m",
        messages=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Say many words."}],
        max_tokens=20,
        seed=11,
        temperature=1,
    )
    full = api.chat.completions.create(**options).choices[0].message.content
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip() and full.index(stop) > 0
    cut = api.chat.completions.create(**options, stop=[stop, "never appears"])
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    chunks = list(api.chat.completions.create(**options, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full[: full.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stop_strings_are_held_back_until_certain():
    from glm_core.api.generation import StopStrings

    stops = StopStrings(["END", "\n\n"])
    assert [stops.push(p) for p in ["Hello E", "N", "ding\n", "\nmore"]] == ["Hello ", "", "ENding", ""]
    assert stops.hit and stops.flush() == ""
    assert StopStrings(["xyz"]).push("abc") == "abc"
    tail = StopStrings(["xyz"])
    assert tail.push("abx") == "ab" and tail.flush() == "x"


def test_stop_strings_cut_where_a_plain_search_of_the_whole_text_cuts():
    """Against an independent expectation: the whole reply searched at once, cut before the stop string that
    ends first (the longest of those ending at the same place), whatever the pieces the reply arrives in."""
    import random

    from glm_core.api.generation import StopStrings

    def expected(text: str, stops: list[str]) -> str:
        ends = [(i + len(s), -len(s)) for s in stops for i in range(len(text)) if text.startswith(s, i)]
        if not ends:
            return text
        end, minus_length = min(ends)
        return text[: end + minus_length]

    rng = random.Random(5)
    for _ in range(3000):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 4))]
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 30)))
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 6))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        matcher = StopStrings(stops)
        out = "".join(matcher.push(piece) for piece in pieces) + matcher.flush()
        assert out == expected(text, stops), (stops, pieces)


def test_stop_strings_are_bounded(server):
    status, _, body = raw_request(
        server.port,
        "POST",
        "/v1/chat/completions",
        json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stop": ["x" * 257]}).encode(),
        auth(),
    )
    assert status == 400 and "256 characters" in json.loads(body)["error"]["message"]
    status, _, body = raw_request(
        server.port,
        "POST",
        "/v1/chat/completions",
        json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stop": list("abcde")}).encode(),
        auth(),
    )
    assert status == 400 and "at most 4" in json.loads(body)["error"]["message"]


def test_models_and_embeddings_through_the_openai_client(server, engine):
    api = client(server)
    [model] = api.models.list().data
    assert model.id == engine.card().name and model.object == "model"
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
    health = json.loads(body)
    assert status == 200 and health["status"] == "ok"
    assert set(health) == {
        "status",
        "model",
        "running",
        "waiting",
        "max_batch",
        "decoded_tokens",
        "fast_path",
    }  # the LoadReport's JSON, and whether the compiled decode path is ready
    assert health["fast_path"] == "off"  # GLM_COMPILE=off in tests
    assert raw_request(server.port, "GET", "/free_gc", headers=auth())[0] == 403  # not an admin key
    status, _, body = raw_request(server.port, "GET", "/free_gc", headers=auth(ADMIN_KEY))
    assert status == 200 and json.loads(body) == {"success": True}


@pytest.mark.parametrize(
    "body, status, words",
    [
        (b'{"messages": [', 400, "not valid JSON"),
        (b'{"model": "m"}', 400, "messages"),
        (b'{"messages": [{"role": "user", "content": "hi"}]}', 400, "model: field required"),  # required, as OpenAI's
        (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 5}', 400, "temperature"),
        (b'{"model": "m", "messages": [{"role": "assistant", "content": "hi"}]}', 400, "end with a user message"),
        (b'{"model": "m", "messages": [{"role": "tool", "content": "hi"}]}', 400, "follow an assistant message"),
        (b'{"model": "m", "messages": [{"role": "robot", "content": "hi"}]}', 400, "role"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 25}', 400, "at most 24"),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "' + LONG.encode() + b'"}]}',
            400,
            "context is 4096",
        ),
        (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 2}', 400, "n"),
        (b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', 400, "text content"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "' + b"x" * 70_000 + b'"}]}', 413, "larger"),
    ],
)
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


def test_who_may_call_without_keys_and_with_them():
    from glm_core.api.access import Access
    from glm_core.api.errors import ApiError

    keyless = Access(ApiConfig())
    local = keyless.identify(None, "127.0.0.1")
    assert local.key_id is None and local.admin and local.owner is None
    assert keyless.identify("Bearer whatever", "::1").admin  # a key sent to a keyless server changes nothing
    with pytest.raises(ApiError) as refused:
        keyless.identify(None, "203.0.113.7")
    assert refused.value.status == 403 and "GLM_API_KEYS" in refused.value.message
    remote = Access(ApiConfig(open_to_network=True)).identify(None, "203.0.113.7")
    assert not remote.admin and remote.owner == "client-203.0.113.7"

    keyed = Access(ApiConfig(keys=("k1",), admin_keys=("a1",)))
    caller = keyed.identify("Bearer k1", "203.0.113.7")
    assert caller.key_id.startswith("key-") and "k1" not in caller.key_id and not caller.admin
    assert caller.owner == caller.scope == caller.key_id
    assert keyed.identify("bearer a1", "203.0.113.7").admin
    for header in (None, "Bearer k2", "Basic k1", "Bearer "):
        with pytest.raises(ApiError) as refused:
            keyed.identify(header, "127.0.0.1")  # with keys, this machine needs one too
        assert refused.value.status == 401


def test_without_keys_web_pages_cannot_drive_the_api(engine, monkeypatch):
    """The reproductions, on a real keyless server: a DNS-rebinding name in Host, another site's Origin, and a
    cross-site `<img src=".../free_gc">` (no Origin, Sec-Fetch-Site: cross-site) are refused, and /free_gc frees
    nothing for it; the seeds' clients (no Origin, no Sec-Fetch-*) and same-origin pages keep working."""
    import glm_core.telemetry.memory as memory

    freed = []
    monkeypatch.setattr(memory, "free_cached_memory", lambda *a: freed.append(1))
    config = ApiConfig(limits=LIMITS, allowed_hosts=frozenset({"portal.example"}))
    with ThreadServer(create_app(lambda: engine, config)) as running:
        port = running.port
        seed_body = b'{"prompt": "hi", "history": [], "max_length": 40}'
        for headers, code in (
            ({"Host": f"rebind.evil.example:{port}"}, "foreign_host"),
            ({"Origin": "http://evil.example"}, "cross_site"),
            ({"Origin": "null"}, "cross_site"),
            ({"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"}, "cross_site"),
        ):
            for method, path, body in (
                ("POST", "/", seed_body),
                ("GET", "/v1/models", None),
                ("GET", "/free_gc", None),
            ):
                status, _, answer = raw_request(port, method, path, body, headers)
                assert status == 403 and json.loads(answer)["error"]["code"] == code, (headers, path, answer)
        assert freed == []  # the cross-site /free_gc changed nothing
        assert raw_request(port, "GET", "/free_gc")[0] == 200 and freed == [1]  # the seeds' client
        assert raw_request(port, "POST", "/", seed_body)[0] == 200
        same_origin = {"Origin": f"http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"}
        assert raw_request(port, "GET", "/v1/models", headers=same_origin)[0] == 200  # /docs' "try it out"
        named = {"Host": "portal.example", "Origin": "http://portal.example"}  # GLM_API_ALLOWED_HOSTS
        assert raw_request(port, "GET", "/v1/models", headers=named)[0] == 200
        for host in ("localhost", "[::1]", "127.0.0.1"):
            assert raw_request(port, "GET", "/v1/models", headers={"Host": f"{host}:{port}"})[0] == 200


def test_keys_from_the_environment_and_the_secrets_file(tmp_path):
    from glm_core.api.config import load_api_config

    secrets = tmp_path / "secrets.toml"
    secrets.write_text('access_password = "x"\napi_keys = ["s1", "s2"]\napi_admin_keys = "sa"\n')
    config = load_api_config({"GLM_API_KEYS": "e1, e2 s1", "GLM_API_MAX_TOKENS": "100"}, [secrets])
    assert config.keys == ("e1", "e2", "s1", "s2") and config.admin_keys == ("sa",)
    assert config.limits.max_tokens == 100 and not config.open_to_network
    assert config.limits.default_max_tokens == 100  # the default 1024, held to the most a request may ask
    limits = load_api_config({"GLM_API_DEFAULT_MAX_TOKENS": "256"}, []).limits
    assert (limits.max_tokens, limits.default_max_tokens) == (4096, 256)
    secrets.write_text("api_keys = [1, 2]\n")
    with pytest.raises(ValueError, match="list of strings"):
        load_api_config({}, [secrets])
    secrets.write_text("api_keys = [\n")
    with pytest.raises(ValueError, match="cannot read"):
        load_api_config({}, [secrets])
    with pytest.raises(ValueError, match="GLM_API_MAX_TOKENS"):
        load_api_config({"GLM_API_MAX_TOKENS": "lots"}, [])


def test_stateless_conversations_find_the_longest_remembered_prefix():
    from glm_core.api.conversation_ids import StatelessConversations

    forgotten = []
    ids = StatelessConversations(forgotten.append, capacity=3)
    turn1 = [{"role": "user", "content": "a"}]
    first = ids.claim("key-1", turn1)
    ids.release("key-1", first, turn1 + [{"role": "assistant", "content": "A"}])
    assert ids.claim("key-1", turn1) == first  # the same request again (the engine answers from its kept prompt)
    assert ids.claim("key-1", turn1) != first  # busy: a concurrent repeat gets its own
    ids.release("key-1", first, turn1 + [{"role": "assistant", "content": "A"}])
    turn2 = turn1 + [{"role": "assistant", "content": "A"}, {"role": "user", "content": "b"}]
    assert ids.claim("key-2", turn2) != first  # another key never finds it
    assert ids.claim("key-1", turn2) == first
    assert ids.claim("key-1", turn2) != first  # busy: a concurrent twin gets its own
    ids.release("key-1", first, turn2 + [{"role": "assistant", "content": "B"}])
    edited = turn1 + [{"role": "assistant", "content": "A"}, {"role": "user", "content": "c"}]
    assert ids.claim("key-1", edited) == first  # an edit finds the earlier state (the engine crops)
    ids.release("key-1", first, None)
    for n in range(3):  # past the capacity, the oldest entries go, and a conversation nobody points to is forgotten
        other = ids.claim("key-1", [{"role": "user", "content": str(n)}])
        ids.release("key-1", other, [{"role": "user", "content": str(n)}, {"role": "assistant", "content": "x"}])
    assert first in forgotten and len(ids) == 3


# ---- the seeds' clients: their request bodies byte for byte, as their documents show them ----------------------

CHATGLM_BODY = '{"prompt": "你好", "history": []}'.encode()  # ChatGLM's README: curl -d '...'
STREAM_API_BODY = '{"query": "你好", "history": []}'.encode()
GLM_API_CHAT_BODY = """{
    "prompt": "蓝牙耳机坏了我应该去医院看什么科？",
    "history": [],
    "max_length": 4096,
    "top_p": 0.5,
    "temperature": 1
}""".encode()
GLM_API_TOKENIZE_BODY = """{
    "prompt":"如果给你一个机会，你会想逃离你所在的虚拟世界吗？",
    "max_length": 4096
}""".encode()
GLM_API_EMBEDDING_BODY = b"""{
    "prompt": ["hello world", "hello GPT"]
}"""


def post(server, path, body, key=KEYS[1]):
    status, headers, answer = raw_request(server.port, "POST", path, body, auth(key))
    assert status == 200, answer
    return headers, answer


def test_chatglm_api_py_route(server):
    _, answer = post(server, "/", CHATGLM_BODY)
    reply = json.loads(answer)
    assert set(reply) == {"response", "history", "status", "time"}
    assert reply["status"] == 200 and re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", reply["time"])
    assert reply["history"] == [["你好", reply["response"]]] and reply["response"]
    # The next turn sends that history back; an explicit temperature 0 is greedy (twice the same reply).
    body = json.dumps({"prompt": "再见", "history": reply["history"], "temperature": 0, "max_length": 200})
    first, second = (json.loads(post(server, "/", body.encode())[1]) for _ in range(2))
    assert first["response"] == second["response"]
    assert first["history"] == [["你好", reply["response"]], ["再见", first["response"]]]


def test_stream_api_routes(server):
    _, answer = post(server, "/chat", STREAM_API_BODY)
    reply = json.loads(answer)
    assert set(reply) == {"query", "response", "history", "success"} and reply["success"] is True
    assert reply["query"] == "你好" and reply["history"] == [["你好", reply["response"]]]

    headers, raw = post(server, "/stream", STREAM_API_BODY)
    assert headers["content-type"].startswith("text/event-stream")
    assert b"\r\n\r\n" in raw  # the seeds' sse-starlette line ends
    frames = sse_frames(raw)
    assert {f["event"] for f in frames} == {"delta"}
    events = [json.loads(f["data"]) for f in frames]
    *deltas, last = events
    assert deltas and all(set(d) == {"delta", "response", "finished"} and d["finished"] is False for d in deltas)
    assert "".join(d["delta"] for d in deltas) == deltas[-1]["response"] == last["response"]
    assert last == {
        "query": "你好",
        "delta": "[EOS]",
        "response": last["response"],
        "history": [["你好", last["response"]]],
        "finished": True,
    }


def test_glm_api_routes(server, engine):
    _, answer = post(server, "/chat", GLM_API_CHAT_BODY)
    reply = json.loads(answer)
    assert set(reply) == {"content", "prompt_tokens", "completion_tokens", "total_tokens", "model", "object"}
    assert reply["object"] == "chat.completion" and reply["model"] == engine.card().name
    assert reply["total_tokens"] == reply["prompt_tokens"] + reply["completion_tokens"] > reply["prompt_tokens"] > 0

    _, raw = post(server, "/chat-stream", GLM_API_CHAT_BODY)
    chunks = json_frames(raw)
    assert chunks and all(set(c) == set(reply) and c["content"] for c in chunks)
    assert [c["completion_tokens"] for c in chunks] == list(range(1, len(chunks) + 1))

    _, answer = post(server, "/tokenize", GLM_API_TOKENIZE_BODY)
    tokens = json.loads(answer)
    assert set(tokens) == {"tokenIds", "tokens"} and len(tokens["tokenIds"]) == len(tokens["tokens"]) > 5
    assert tokens["tokenIds"] == engine.tokenize("如果给你一个机会，你会想逃离你所在的虚拟世界吗？")

    _, answer = post(server, "/embedding", GLM_API_EMBEDDING_BODY)
    embedded = json.loads(answer)
    assert embedded["object"] == "embedding" and len(embedded["data"]) == 2 and len(embedded["data"][0]) == 64


def test_glm_api_history_of_pairs_and_the_typescript_clients_flat_history(server):
    pairs = {"prompt": "and then?", "history": [["hi", "hello"], ["how are you", "fine"]], "max_length": 300}
    flat = {**pairs, "history": [["hi", "hello", "how are you", "fine"]]}  # the GLM API's TypeScript example
    for body in (pairs, flat):
        assert json.loads(post(server, "/chat", json.dumps(body).encode())[1])["content"]
    status, _, answer = raw_request(server.port, "POST", "/chat", b'{"prompt": "x", "history": [["odd"]]}', auth())
    assert status == 400 and "pair" in json.loads(answer)["error"]["message"]


def test_seed_routes_without_a_key_only_when_configured(engine):
    config = ApiConfig(keys=KEYS, seeds_without_key=True, limits=LIMITS)
    with ThreadServer(create_app(lambda: engine, config)) as open_seeds:
        assert raw_request(open_seeds.port, "POST", "/", CHATGLM_BODY)[0] == 200
        assert raw_request(open_seeds.port, "POST", "/tokenize", GLM_API_TOKENIZE_BODY)[0] == 200
        assert raw_request(open_seeds.port, "GET", "/v1/models")[0] == 401  # OpenAI's routes still need a key
        assert raw_request(open_seeds.port, "GET", "/free_gc")[0] == 401
        bad_key = raw_request(open_seeds.port, "POST", "/", CHATGLM_BODY, {"Authorization": "Bearer wrong"})
        assert bad_key[0] == 401  # a key, if sent, must be right


def test_openai_stream_uses_plain_newlines(server):
    body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": true}'
    _, raw = post(server, "/v1/chat/completions", body)
    assert b"\r" not in raw and raw.rstrip().endswith(b"data: [DONE]")
    assert sse_frames(raw)[-1]["data"] == "[DONE]"


def test_replies_carry_every_field_openai_requires(server):
    """On the wire, as strict clients and llm-comply read it (the openai client fills in what is missing, so it
    cannot tell): refusal and logprobs null, annotations empty, a system_fingerprint; in a stream, every choice
    has finish_reason (null until the last), and usage appears only when asked for, null until the last chunk."""
    whole = json.loads(post(server, "/v1/chat/completions", chat_body("Hi", 4))[1])
    [choice] = whole["choices"]
    assert choice["message"] == {
        "role": "assistant",
        "content": choice["message"]["content"],
        "reasoning_content": None,  # vLLM's field, null for a model that does not reason (tests/test_reasoning.py)
        "refusal": None,
        "annotations": [],
    }
    assert choice["logprobs"] is None and choice["finish_reason"] == "length"
    assert re.fullmatch(r"fp_[0-9a-f]{10}", whole["system_fingerprint"])
    for include_usage in (False, True):
        body = chat_body("Hi", 4, stream=True, stream_options={"include_usage": include_usage})
        chunks = json_frames(post(server, "/v1/chat/completions", body)[1])
        assert {c["system_fingerprint"] for c in chunks} == {whole["system_fingerprint"]}
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
        choices = [c["choices"][0] for c in chunks if c["choices"]]
        assert [c["finish_reason"] for c in choices] == [None] * (len(choices) - 1) + ["length"]
        assert all(c["delta"].keys() == {"content"} for c in choices[1:-1]) and choices[-1]["delta"] == {}
        assert all(c["logprobs"] is None for c in choices)
        if include_usage:
            assert [c["usage"] is None for c in chunks] == [True] * (len(chunks) - 1) + [False]
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
        else:
            assert not any("usage" in c for c in chunks)


def test_an_api_request_tokenizes_its_prompt_once(server, engine, monkeypatch):
    """The API counts the prompt for OpenAI's max_tokens with the engine's own encoding and hands the ids on with the
    request: the runner feeds them as they are (it used to encode the prompt again, and count each message first)."""
    tokenizer = engine.loaded.tokenizer
    original = type(tokenizer).__call__
    calls: list[str] = []

    def counted(self, text, *args, **kwargs):
        if self is tokenizer:
            calls.append(text)
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", counted)
    api = client(server, KEYS[11])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tokenize me once, please."}]
    chat = api.chat.completions.create(model="m", messages=messages, max_tokens=3, temperature=0)
    assert len(calls) == 1 and "Tokenize me once" in calls[0]
    completion = api.completions.create(model="m", prompt="Once upon a time, tokenized once", max_tokens=3)
    assert len(calls) == 2 and calls[1] == "Once upon a time, tokenized once"
    monkeypatch.undo()
    assert chat.usage.prompt_tokens == len(engine.encode_chat(messages))  # the ids fed are the ids counted
    assert completion.usage.prompt_tokens == len(tokenizer("Once upon a time, tokenized once")["input_ids"])


def test_the_system_fingerprint_changes_with_the_configuration(engine):
    from glm_core.api.generation import system_fingerprint

    class Configured:
        def __init__(self, **changes):
            self._card = dataclasses.replace(engine.card(), **changes)

        def card(self):
            return self._card

    same = system_fingerprint(engine)
    assert system_fingerprint(Configured(load_seconds=99.0)) == same  # not configuration
    for change in ({"precision": "INT8"}, {"device": "cuda:0"}, {"source": "/elsewhere"}, {"name": "other"}):
        assert system_fingerprint(Configured(**change)) != same, change


def test_sse_frames_parse_either_line_end():
    lf = b'event: delta\ndata: {"a": 1}\n\n: ping\n\ndata: [DONE]\n\n'
    crlf = lf.replace(b"\n", b"\r\n")
    assert (
        sse_frames(lf)
        == sse_frames(crlf)
        == [{"event": "delta", "data": '{"a": 1}'}, {"event": None, "data": "[DONE]"}]
    )


# ---- stop, limits, concurrency, kept caches ------------------------------------------------------------------


def chat_body(content: str, max_tokens: int, stream: bool = False, **extra) -> bytes:
    return json.dumps(
        {
            "model": "m",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "stream": stream,
            **extra,
        }
    ).encode()


@pytest.fixture
def long_replies(engine, monkeypatch):
    """A server that lets replies run to 3000 tokens, and the backend requests it submitted."""
    submitted = []
    submit = engine.submit

    def recording_submit(*args, **kwargs):
        submitted.append(submit(*args, **kwargs))
        return submitted[-1]

    monkeypatch.setattr(engine, "submit", recording_submit)
    config = ApiConfig(keys=KEYS, limits=ApiLimits(max_tokens=3000))
    with ThreadServer(create_app(lambda: engine, config)) as running:
        yield running, submitted


def open_request(port: int, body: bytes, key=KEYS[4]) -> http.client.HTTPConnection:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request(
        "POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json", **auth(key)}
    )
    return connection


def hang_up(connection: http.client.HTTPConnection) -> None:
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_stops_its_generation(long_replies, stream):
    server, submitted = long_replies
    connection = open_request(server.port, chat_body("Write forever.", 3000, stream))
    if stream:
        response = connection.getresponse()
        for _ in range(6):  # the role chunk, then a few deltas
            assert response.readline().startswith(b"data: ")
            response.readline()
    deadline = time.time() + 30
    while not submitted or not submitted[-1].text_so_far:
        assert time.time() < deadline, "the reply did not start"
        time.sleep(0.05)
    request = submitted[-1]
    hang_up(connection)
    reply = request.wait(60)
    assert reply is not None, "the generation went on after the client left"
    # stopped, and long before the 3000 tokens it would have run to
    assert reply.finish_reason == "stopped" and reply.stats.completion_tokens < 1000


def test_a_full_queue_answers_429_with_retry_after(long_replies, engine, monkeypatch):
    server, submitted = long_replies
    monkeypatch.setattr(engine, "max_waiting_per_owner", 1)  # one running and one waiting per key
    running = open_request(server.port, chat_body("Write forever.", 3000, stream=True), key=KEYS[5])
    running.getresponse().readline()
    waiting = ThreadPoolExecutor(1).submit(
        raw_request, server.port, "POST", "/v1/chat/completions", chat_body("Hi", 4), auth(KEYS[5])
    )
    deadline = time.time() + 30
    while engine.load_report().waiting < 1:
        assert time.time() < deadline, "the second request never waited"
        time.sleep(0.05)
    status, headers, body = raw_request(server.port, "POST", "/v1/chat/completions", chat_body("Hi", 4), auth(KEYS[5]))
    assert status == 429 and headers["retry-after"] == "1"
    assert json.loads(body)["error"]["code"] == "queue_full"
    with pytest.raises(openai.RateLimitError):
        client(server, KEYS[5]).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert raw_request(server.port, "POST", "/v1/chat/completions", chat_body("Hi", 4), auth(KEYS[6]))[0] == 200
    hang_up(running)
    status, _, body = waiting.result(timeout=60)  # the waiting one runs once the first has stopped
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 4


@pytest.mark.slow  # over 4 s here: left out of `make test-fast`
def test_sixteen_concurrent_streams_each_get_their_own_reply(server):
    def ask(i: int, stream: bool) -> str:
        api = client(server, KEYS[i], timeout=120)
        options = dict(
            model="m",
            messages=[{"role": "user", "content": f"Tell me about the number {i}."}],
            max_tokens=12,
            seed=i,
            temperature=1,
        )
        if not stream:
            return api.chat.completions.create(**options).choices[0].message.content
        chunks = api.chat.completions.create(**options, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    alone = [ask(i, stream=False) for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda i: ask(i, stream=True), range(16)))
    assert together == alone and len(set(alone)) == 16


def test_a_later_turn_reuses_the_kept_cache_but_never_another_keys(server):
    history = [{"role": "user", "content": "Tell me a story about Ada, the keeper of the Skerry lighthouse."}]
    first = client(server, KEYS[7]).chat.completions.create(
        model="m", messages=history, max_tokens=12, seed=3, temperature=1
    )
    # At most the template's opening, from this key's earlier conversations: this question was never asked.
    opening = first.usage.prompt_tokens_details.cached_tokens
    assert opening < first.usage.prompt_tokens - 8
    repeat = client(server, KEYS[7]).chat.completions.create(
        model="m", messages=history, max_tokens=12, seed=3, temperature=1
    )  # the same request again: its whole prompt comes from the cache, and so does the first token's distribution
    assert repeat.usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens
    assert repeat.choices[0].message.content == first.choices[0].message.content
    history += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "Go on."},
    ]
    second = client(server, KEYS[7]).chat.completions.create(model="m", messages=history, max_tokens=4)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    # Another key, the same history: nothing of this key's conversation (at most what its own share with it, never
    # the question only this key asked).
    stranger = client(server, KEYS[8]).chat.completions.create(model="m", messages=history, max_tokens=4)
    assert stranger.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens - 8
    # A new conversation of the same key starts from the longest prefix its kept ones share with it.
    other = history[:1] + [{"role": "assistant", "content": "Once"}, {"role": "user", "content": "Go on."}]
    branch = client(server, KEYS[7]).chat.completions.create(model="m", messages=other, max_tokens=4)
    assert branch.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens


# ---- the two doors: `python -m glm_core serve` alone, and the portal's own port ------------------------------


@pytest.fixture
def subprocess_server(tiny_model_dir, tmp_path):
    """Start `serve` or the portal ("serve", "portal") with the tiny model on a free port; return (url, port) once
    /health answers; stop it afterwards."""
    processes = []

    def start(kind: str, **env_vars: str):
        port, log_path = free_port(), tmp_path / f"server-{len(processes)}.log"
        log = open(log_path, "w")
        env_vars.update(GLM_MODEL_PATH=str(tiny_model_dir), GLM_PRECISION="fp32", GLM_DEVICE="cpu")
        process = start_serve(port, log=log, **env_vars) if kind == "serve" else start_portal(port, log, **env_vars)
        processes.append((process, log))
        url = f"http://127.0.0.1:{port}"
        wait_until_up(process, f"{url}/health", 180, describe=lambda: log_path.read_text()[-2000:])
        return url, port

    yield start
    for process, log in processes:
        stop_process(process, timeout=30)
        log.close()


def check_with_the_openai_client(url: str, key: str) -> None:
    api = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "Say something."}]
    whole = api.chat.completions.create(model="m", messages=messages, max_tokens=6, seed=5, temperature=1)
    chunks = list(
        api.chat.completions.create(model="m", messages=messages, max_tokens=6, seed=5, temperature=1, stream=True)
    )
    assert whole.choices[0].message.content
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert whole.usage.completion_tokens == 6 and chunks[-1].choices[0].finish_reason == "length"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()


def check_docs_are_served_here(port: int) -> None:
    """/docs loads Swagger UI from this server, never from a CDN (these machines and many company networks cannot
    reach one): every script and stylesheet the page names is a path here, and it answers."""
    status, _, body = raw_request(port, "GET", "/docs")
    assert status == 200 and b"swagger" in body.lower()
    assets = re.findall(r"""(?:src|href|url)\s*[:=]\s*['"]([^'"]+\.(?:js|css))['"]""", body.decode())
    assert assets and all(a.startswith("/") and not a.startswith("//") for a in assets), assets
    for asset in assets:
        status, _, content = raw_request(port, "GET", asset)
        assert status == 200 and len(content) > 10_000, asset
    assert raw_request(port, "GET", "/openapi.json")[0] == 200


@pytest.mark.server
def test_serve_runs_the_api_alone(subprocess_server):
    url, port = subprocess_server("serve", GLM_API_KEYS="serve-key")
    check_with_the_openai_client(url, "serve-key")
    check_docs_are_served_here(port)


@pytest.mark.server
def test_the_portal_serves_the_api_on_its_own_port(subprocess_server):
    url, port = subprocess_server("portal", GLM_API_KEYS="portal-key")  # /health: up once the model has loaded
    check_with_the_openai_client(url, "portal-key")
    status, headers, body = raw_request(port, "GET", "/")  # GET / is still the portal's page; POST / the seed's
    assert status == 200 and headers["content-type"].startswith("text/html") and b'<div id="root">' in body
    assert raw_request(port, "GET", "/_stcore/health")[0] == 200
    check_docs_are_served_here(port)
    status, _, body = raw_request(
        port,
        "POST",
        "/",
        '{"prompt": "你好", "history": [], "max_length": 60}'.encode(),
        {"Authorization": "Bearer portal-key"},
    )
    assert status == 200 and json.loads(body)["history"][0][0] == "你好"


def test_bench_api_reports_its_figures(tiny_loaded):
    """The benchmark's code path on tiny settings (the figures themselves come from `bench api`, not from tests)."""
    from glm_core.bench.api import format_api_report, run_api_bench

    result = run_api_bench(tiny_loaded, [1, 2], max_new_tokens=4, turn_tokens=4)
    assert [t["turn"] for t in result["turns"]] == list(range(1, 11))
    assert result["turns"][-1]["cached_tokens"] > result["turns"][0]["prompt_tokens"]  # turn 10 reused turn 9's
    assert [r["streams"] for r in result["runs"]] == [1, 2]
    assert [r["completion_tokens"] for r in result["runs"]] == [4, 8]
    assert "goal <= 1.3x" in format_api_report(result)
