"""`bench accounting`: what keys, quotas and usage records cost a request.

Two parts. (1) The calls one chat request makes, each timed alone over many repeats (median of 5 runs, in
microseconds): identifying a personal key (a digest lookup in admin.sqlite3) beside a configured key, admitting the
request under a default quota (its quota row, today's tokens from a usage table of `history` rows, the minute's
count) and recording its usage (an append for the writer thread). (2) The same short chat requests through the
HTTP API on a real server, alternating (in both orders) between a server with accounting (a personal key, a
default quota) and one without (a configured key, no accounting), over the same engine: the median wall time of each and their ratio.
"""

from __future__ import annotations

import http.client
import json
import statistics
import tempfile
import threading
import time

import uvicorn

from ..admin import Admin
from ..admin.quotas import Quota
from ..admin.usage import UsageRecord
from ..api import ApiConfig, create_app
from ..api.access import Access
from ..api.config import ApiLimits
from ..engine import Engine
from ..models.loading import LoadedModel
from ..protocol import ModelCard, Reply, ReplyStats


def _per_call_us(call, repeats: int = 2000, runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        for _ in range(repeats):
            call()
        times.append((time.perf_counter() - started) / repeats * 1e6)
    return round(statistics.median(times), 2)


def measure_calls(history: int = 100_000) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        admin = Admin(folder)
        now = time.time()
        rows = [
            UsageRecord(
                now - i * 30, f"person-{i % 50}", "person", "api", "local", "m", "bf16", 200, 50, 100, 0.2, 1.0, "eos"
            )
            for i in range(history)
        ]
        for start in range(0, history, 10_000):
            admin.usage._write(rows[start : start + 10_000])
        _, key = admin.keys.create("bench")
        admin.quotas.set("*", Quota(tokens_per_day=10**12, requests_per_minute=10**9, running=10**6))
        access = Access(ApiConfig(keys=("configured-key",)), admin)
        card = ModelCard(name="m", family="test", precision="bf16", device="cpu", source="m")
        reply = Reply("x", "eos", ReplyStats(prompt_tokens=200, completion_tokens=100, ttft_s=0.1))

        def admit_and_settle():
            admin.quotas.admit("person-7", "person", "api").finish(card, reply)

        record = rows[0]
        result = {
            "usage_rows": history,
            "identify_configured_key_us": _per_call_us(lambda: access.identify("Bearer configured-key", "127.0.0.1")),
            "identify_personal_key_us": _per_call_us(lambda: access.identify(f"Bearer {key}", "127.0.0.1")),
            "admit_and_settle_us": _per_call_us(admit_and_settle, repeats=500),
            "record_only_us": _per_call_us(lambda: admin.usage.record(record), repeats=20_000),
        }
        admin.usage.flush(timeout=60)
        admin.close()
    result["accounting_per_request_us"] = round(
        result["identify_personal_key_us"] - result["identify_configured_key_us"] + result["admit_and_settle_us"], 1
    )
    return result


def _ask(port: int, key: str, max_tokens: int) -> float:
    body = json.dumps(
        {"model": "bench", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": max_tokens}
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
    answer = response.read()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {answer[:300]!r}")
    connection.close()
    return time.perf_counter() - started


class _Server:
    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> int:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        return self.server.servers[0].sockets[0].getsockname()[1]

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def measure_requests(loaded: LoadedModel, requests: int = 30, max_tokens: int = 8) -> dict:
    engine = Engine(loaded, compile="off")
    limits = ApiLimits(max_tokens=max_tokens)
    with tempfile.TemporaryDirectory() as folder:
        admin = Admin(folder)
        _, key = admin.keys.create("bench")
        admin.quotas.set("*", Quota(tokens_per_day=10**12, requests_per_minute=10**9, running=10**6))
        with_app = create_app(lambda: engine, ApiConfig(limits=limits), admin)
        without_app = create_app(lambda: engine, ApiConfig(keys=("plain",), limits=limits), accounting=False)
        try:
            with _Server(with_app) as with_port, _Server(without_app) as without_port:
                _ask(with_port, key, max_tokens), _ask(without_port, "plain", max_tokens)  # warm both
                on, off = [], []
                for round_ in range(requests):  # which goes first alternates: neither gains from the other
                    if round_ % 2:
                        off.append(_ask(without_port, "plain", max_tokens))
                        on.append(_ask(with_port, key, max_tokens))
                    else:
                        on.append(_ask(with_port, key, max_tokens))
                        off.append(_ask(without_port, "plain", max_tokens))
            admin.usage.flush()
            with admin.db.connect() as db:
                (recorded,) = db.execute("SELECT COUNT(*) FROM usage").fetchone()
        finally:
            engine.close()
            admin.close()
    on_ms, off_ms = statistics.median(on) * 1e3, statistics.median(off) * 1e3
    # On a shared machine the spread of one request's time is far wider than accounting's cost: the fastest of
    # each (the least disturbed) is reported beside the medians.
    return {
        "requests": requests,
        "max_tokens": max_tokens,
        "with_accounting_median_ms": round(on_ms, 2),
        "without_accounting_median_ms": round(off_ms, 2),
        "with_over_without": round(on_ms / off_ms, 4),
        "with_accounting_min_ms": round(min(on) * 1e3, 2),
        "without_accounting_min_ms": round(min(off) * 1e3, 2),
        "min_with_over_without": round(min(on) / min(off), 4),
        "usage_rows_written": recorded,
    }


def format_accounting_report(result: dict) -> str:
    calls, requests = result["calls"], result.get("requests")
    lines = [
        f"per call, usage table of {calls['usage_rows']:,} rows (median of 5 runs):",
        f"  identify a configured key      {calls['identify_configured_key_us']:8.1f} us",
        f"  identify a personal key        {calls['identify_personal_key_us']:8.1f} us",
        f"  admit under quotas + settle    {calls['admit_and_settle_us']:8.1f} us",
        f"  record usage (the append)      {calls['record_only_us']:8.2f} us",
        f"  accounting per request         {calls['accounting_per_request_us']:8.1f} us",
    ]
    if requests:
        lines += [
            f"through the API, {requests['requests']} requests of {requests['max_tokens']} tokens each way (medians):",
            f"  with accounting    {requests['with_accounting_median_ms']:8.2f} ms",
            f"  without            {requests['without_accounting_median_ms']:8.2f} ms",
            f"  ratio              {requests['with_over_without']:8.4f}",
            f"  fastest of each    {requests['with_accounting_min_ms']:8.2f} ms with, "
            f"{requests['without_accounting_min_ms']:.2f} ms without (ratio {requests['min_with_over_without']:.4f})",
        ]
    return "\n".join(lines)
