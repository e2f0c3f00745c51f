"""Work outside the batch is bounded and never freezes the replies being streamed: /tokenize and embeddings take
bounded inputs, count against the caller's share, and embeddings run a slice at a time between decode steps.
The reproductions of the security review, on a real server with the tiny model."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
import torch
from api_helpers import ThreadServer, raw_request

from glm_core import SamplingParams
from glm_core.api import ApiConfig, create_app
from glm_core.api.config import ApiLimits
from glm_core.api.embeddings import embed
from glm_core.api.errors import ApiError
from glm_core.models.embedding import SLICE_TOKENS, EmbeddingJob

HELLO = [{"role": "user", "content": "Tell me a long story."}]


@pytest.fixture(scope="module")
def keyless(engine):
    with ThreadServer(create_app(lambda: engine, ApiConfig())) as running:  # the default limits
        yield running


def test_tokenize_and_embeddings_refuse_unbounded_inputs(keyless):
    """The reproduction: 3.9 MB to /tokenize (under the 4 MB body limit) was 1.95 M ids and a 20 MB answer, holding
    the tokenizer lock the decode loop needs for seconds."""
    huge = "hello " * 650_000
    status, _, body = raw_request(keyless.port, "POST", "/tokenize", json.dumps({"prompt": huge}).encode())
    error = json.loads(body)["error"]
    assert status == 400 and error["code"] == "input_too_long" and "100,000" in error["message"]
    status, _, body = raw_request(
        keyless.port, "POST", "/v1/embeddings", json.dumps({"input": ["hello " * 20_000], "model": "m"}).encode()
    )
    assert status == 400 and json.loads(body)["error"]["code"] == "input_too_long"
    many = [[5] * 2000] * 17  # 34,000 tokens: past the 32,768 a request may hold
    status, _, body = raw_request(keyless.port, "POST", "/v1/embeddings", json.dumps({"input": many}).encode())
    assert status == 400 and "32,768 tokens" in json.loads(body)["error"]["message"]
    ok = raw_request(keyless.port, "POST", "/tokenize", json.dumps({"prompt": "hello world"}).encode())
    assert ok[0] == 200 and json.loads(ok[2])["tokenIds"]


def test_token_ids_outside_the_vocabulary_are_refused_before_any_forward(keyless, engine, tiny_loaded):
    vocab = tiny_loaded.model.get_input_embeddings().num_embeddings
    for ids in ([vocab], [1, 2, -1], [10**12]):
        status, _, body = raw_request(keyless.port, "POST", "/v1/embeddings", json.dumps({"input": ids}).encode())
        assert status == 400 and "vocabulary" in json.loads(body)["error"]["message"], ids
    assert engine.load_report().running == 0


def test_a_long_input_read_in_slices_equals_one_whole_forward(tiny_loaded):
    """The independent expectation: transformers' own forward over the whole text at once, mean-pooled."""
    ids = [(7 * i) % 400 + 3 for i in range(3 * SLICE_TOKENS + 17)]
    job = EmbeddingJob([ids, ids[:40], ids[:9]])
    steps = 1
    while not job.step(tiny_loaded):
        steps += 1
    assert steps == 4 + 1  # four chunks of the long one, then both short ones together
    with torch.inference_mode():
        for row, vector in zip((ids, ids[:40], ids[:9]), job.vectors):
            hidden = tiny_loaded.model(input_ids=torch.tensor([row]), output_hidden_states=True).hidden_states[-1]
            expected = torch.nn.functional.normalize(hidden[0].float().mean(dim=0), dim=-1)
            torch.testing.assert_close(torch.tensor(vector), expected, atol=2e-5, rtol=1e-4)


def test_a_stream_keeps_decoding_while_embeddings_run(engine):
    """The reproduction: 8 x 1,024 tokens of embeddings paused a running stream for 8 s. Counted, not timed: the
    stream must get a decode step between two slices of the embeddings."""
    stream = engine.submit(
        "stream-beside-embeddings", HELLO, SamplingParams(max_new_tokens=3000, max_length=4096, temperature=1.0, seed=3)
    )
    tokens = []
    started = threading.Event()

    def read() -> None:
        for event in stream.events():
            if type(event).__name__ == "Delta":
                tokens.append(1)
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert started.wait(60)
    inputs = [[(3 * i + j) % 400 + 3 for i in range(1024)] for j in range(8)]
    before = len(tokens)
    vectors, total = asyncio.run(embed(engine, inputs, ApiLimits()))
    during = len(tokens) - before
    stream.stop()
    reader.join(60)
    slices = 8 * 1024 // SLICE_TOKENS
    assert len(vectors) == 8 and total == 8 * 1024
    assert during >= slices - 1, f"{during} deltas while {slices} slices ran"


def test_embeddings_count_against_the_callers_share(engine):
    """An API key with a reply running (one at a time by default) gets 429 for embeddings meanwhile."""
    running = engine.submit("share", HELLO, SamplingParams(max_new_tokens=3000, max_length=4096), owner="key-a")
    try:
        deadline = threading.Event()
        while engine.load_report().running == 0 and not deadline.wait(0.05):
            pass
        with pytest.raises(ApiError) as refused:
            asyncio.run(embed(engine, ["hello"], ApiLimits(), owner="key-a"))
        assert refused.value.status == 429
        assert asyncio.run(embed(engine, ["hello"], ApiLimits(), owner="key-b"))[1] > 0  # another key is served
    finally:
        running.stop()
        running.wait(60)
