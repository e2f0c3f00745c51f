"""`bench api`: the figures through the HTTP API, client side, over a real server and sockets (uvicorn in a thread
of this process, the same app as `serve`).

- Kept caches for stateless clients: one 10-turn conversation that resends its whole history every turn (as
  OpenAI clients do); time to first token at turn 10 against turn 1 (goal <= 1.3x), and turn 10's history sent
  under another key, which may not reuse the cache (the cost without it).
- Aggregate tokens/s at 1, 4 and 16 concurrent streams (one API key each: a key has one request running at a time).

Greedy, and no token ends a reply (bench concurrency's wrapper), so every request does the same work.
"""

from __future__ import annotations

import http.client
import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import uvicorn

from ..api import ApiConfig, create_app
from ..api.config import ApiLimits
from ..engine import Engine
from ..models.loading import LoadedModel
from .concurrency import TOPICS, _NoStop

TURN_PROMPTS = [
    "Tell me a story about {}.",
    "Go on.",
    "What happened next?",
    "Describe the place.",
    "Who else was there?",
    "Go on.",
    "How did it end?",
    "Tell it again, shorter.",
    "Why?",
    "Thank you.",
]


def _stream(port: int, key: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed chat completion: its text, time to first text, wall time and usage."""
    body = json.dumps(
        {
            "model": "bench",
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    started = time.perf_counter()
    connection.request(
        "POST",
        "/v1/chat/completions",
        body=body,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
    text, first, usage = [], None, None
    for line in response:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk.get("choices", []):
            if choice["delta"].get("content"):
                first = first or time.perf_counter()
                text.append(choice["delta"]["content"])
    connection.close()
    return {
        "text": "".join(text),
        "ttft_s": (first or time.perf_counter()) - started,
        "wall_s": time.perf_counter() - started,
        "usage": usage,
    }


def _turns(port: int, max_tokens: int) -> dict:
    messages, turns = [], []
    for number, prompt in enumerate(TURN_PROMPTS, start=1):
        messages.append({"role": "user", "content": prompt.format(TOPICS[0])})
        result = _stream(port, "bench-key-0", messages, max_tokens)
        turns.append(
            {
                "turn": number,
                "ttft_s": result["ttft_s"],
                "prompt_tokens": result["usage"]["prompt_tokens"],
                "cached_tokens": result["usage"]["prompt_tokens_details"]["cached_tokens"],
            }
        )
        if number < len(TURN_PROMPTS):
            messages.append({"role": "assistant", "content": result["text"]})
    cold = _stream(port, "bench-key-1", messages, max_tokens)  # another key: no reuse of bench-key-0's cache
    return {
        "turns": turns,
        "turn10_over_turn1": turns[-1]["ttft_s"] / turns[0]["ttft_s"],
        "turn10_without_cache_ttft_s": cold["ttft_s"],
    }


def _streams(port: int, n: int, max_tokens: int) -> dict:
    jobs = [
        [{"role": "user", "content": f"Write a long story about {TOPICS[i % len(TOPICS)]} (number {i})."}]
        for i in range(n)
    ]
    started = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda i: _stream(port, f"bench-key-{i}", jobs[i], max_tokens), range(n)))
    wall = time.perf_counter() - started
    tokens = sum(r["usage"]["completion_tokens"] for r in results)
    return {
        "streams": n,
        "completion_tokens": tokens,
        "wall_s": wall,
        "aggregate_tokens_per_s": tokens / wall,
        "ttft_median_s": statistics.median(r["ttft_s"] for r in results),
    }


def run_api_bench(loaded: LoadedModel, streams: list[int], max_new_tokens: int = 64, turn_tokens: int = 32) -> dict:
    loaded.chat_format = _NoStop(loaded.chat_format)
    engine = Engine(loaded, max_batch=max(streams + [4]), compile="off")  # bench decode measures compiled
    config = ApiConfig(
        keys=tuple(f"bench-key-{i}" for i in range(max(streams + [2]))),
        limits=ApiLimits(max_tokens=max(max_new_tokens, turn_tokens)),
    )
    server = uvicorn.Server(
        uvicorn.Config(create_app(lambda: engine, config), host="127.0.0.1", port=0, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        _stream(port, "bench-key-0", [{"role": "user", "content": "Hi"}], 4)  # warm-up
        turns = _turns(port, turn_tokens)
        runs = [_streams(port, n, max_new_tokens) for n in streams]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        engine.close()
        loaded.chat_format = loaded.chat_format._format
    return {
        "model": loaded.name,
        "precision": loaded.precision.label,
        "device": str(loaded.device),
        "max_new_tokens": max_new_tokens,
        "turn_tokens": turn_tokens,
        **turns,
        "runs": runs,
    }


def format_api_report(r: dict) -> str:
    first, last = r["turns"][0], r["turns"][-1]
    lines = [
        f"bench api: {r['model']} {r['precision']} on {r['device']}, through the HTTP API (greedy)",
        f"stateless 10-turn chat, {r['turn_tokens']} tokens a reply: time to first token turn 1 "
        f"{first['ttft_s'] * 1000:.0f} ms, turn 10 {last['ttft_s'] * 1000:.0f} ms "
        f"({r['turn10_over_turn1']:.2f}x, goal <= 1.3x; {last['cached_tokens']} of {last['prompt_tokens']} prompt "
        f"tokens from the kept cache); turn 10 under another key (no reuse): "
        f"{r['turn10_without_cache_ttft_s'] * 1000:.0f} ms",
        f"streams  aggregate tok/s  ttft median   ({r['max_new_tokens']} new tokens per stream)",
    ]
    for run in r["runs"]:
        lines.append(f"{run['streams']:>7}  {run['aggregate_tokens_per_s']:>15.1f}  {run['ttft_median_s']:>10.2f}s")
    return "\n".join(lines)
