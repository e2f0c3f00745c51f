"""Helpers for the API tests: a uvicorn server in a thread, `serve` and the portal as processes, raw HTTP (bytes
exactly as given), SSE frames."""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable

import uvicorn
from conftest import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadServer:
    """uvicorn serving `app` on 127.0.0.1 in a thread of this process (a real server, real sockets)."""

    def __init__(self, app):
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", timeout_graceful_shutdown=2)
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "the API server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def start_serve(port: int, *model_options: str, log=subprocess.DEVNULL, **env_vars: str) -> subprocess.Popen:
    """`python -m glm_core serve` on 127.0.0.1:`port`, without API keys (only this machine's clients), with the
    default model unless `model_options` name one (or `env_vars` do); `env_vars` may also set keys. Its stderr goes
    to `log` (a file, or PIPE)."""
    env = {name: value for name, value in os.environ.items() if name != "GLM_API_KEYS"}
    env.update(PYTHONPATH=str(ROOT), **env_vars)
    return subprocess.Popen(
        [sys.executable, "-m", "glm_core", "serve", *model_options, "--port", str(port), "--log-level", "warning"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
        text=True,
    )


def start_portal(port: int, log, address: str | None = "127.0.0.1", **env_vars: str) -> subprocess.Popen:
    """`streamlit run Home.py` on `port`, its output to `log`, with `env_vars` added to this process's environment.
    address None: bound as a plain `streamlit run` binds (every address, IPv4 and IPv6 on one socket, so an IPv4
    client shows as ::ffff:127.0.0.1)."""
    bind = [] if address is None else ["--server.address", address]
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamlit",
            "run",
            "Home.py",
            "--server.port",
            str(port),
            *bind,
            "--server.headless",
            "true",
        ],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env_vars},
    )


def wait_until_up(
    process: subprocess.Popen,
    url: str,
    timeout: float,
    ready: Callable[[bytes], bool] = lambda body: True,
    describe: Callable[[], str] = lambda: "",
) -> None:
    """Poll `url` until it answers 200 with a body `ready` accepts; fail at once (with `describe()`, e.g. the
    server's log) if the process ends, and after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200 and ready(response.read()):
                    return
        except OSError:
            pass
        assert process.poll() is None, f"the server exited ({process.returncode}): {describe()}"
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{url} was not ready within {timeout:.0f} s: {describe()}")
        time.sleep(0.3)


def model_loaded(body: bytes) -> bool:
    """The API's /health once a model is loaded (the portal's says "no model loaded" while it loads)."""
    return json.loads(body).get("status") == "ok"


def raw_request(
    port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 120
) -> tuple[int, dict, bytes]:
    """One request with `body` sent byte for byte; returns (status, headers, body)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        sent = {"Content-Type": "application/json", **(headers or {})}
        connection.request(method, path, body=body, headers=sent)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def sse_frames(raw: bytes) -> list[dict]:
    """Server-sent events from a whole stream, with `\\n\\n`, `\\r\\n\\r\\n` (or `\\r\\r`) between frames:
    [{"event": name or None, "data": text}], comments (pings) left out."""
    text = raw.decode("utf-8")
    frames = []
    for block in re.split(r"\r\n\r\n|\n\n|\r\r", text):
        event, data = None, []
        for line in re.split(r"\r\n|\n|\r", block):
            if not line or line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)
        if data:
            frames.append({"event": event, "data": "\n".join(data)})
    return frames


def json_frames(raw: bytes) -> list:
    return [json.loads(f["data"]) for f in sse_frames(raw) if f["data"] != "[DONE]"]


# A function tool the tool tests share: its schema bounds the arguments, so a forced call's output is checkable.
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}

# The question the tool tests ask, and its history once the model called the tool and the tool answered.
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
ANSWERED_CALL = ASK + [
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 22}'},
]


def start_tiny_serve(model_dir, data_dir, **env_vars: str) -> tuple[subprocess.Popen, int]:
    """`python -m glm_core serve` on `model_dir` at FP32 on the CPU, its store in `data_dir`, with `env_vars`;
    returns (process, port) once /health answers (its stderr is piped: the failure message when it does not)."""
    port = free_port()
    process = start_serve(
        port,
        "--model",
        str(model_dir),
        "--precision",
        "fp32",
        "--device",
        "cpu",
        log=subprocess.PIPE,
        GLM_DATA_DIR=str(data_dir),
        **env_vars,
    )
    wait_until_up(process, f"http://127.0.0.1:{port}/health", 180, describe=lambda: process.stderr.read())
    return process, port
