"""Helpers for the API tests: a uvicorn server in a thread, raw HTTP (bytes exactly as given), SSE frames."""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time

import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadServer:
    """uvicorn serving `app` on 127.0.0.1 in a thread of this process (a real server, real sockets)."""

    def __init__(self, app):
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=2))
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


def raw_request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                timeout: float = 120) -> tuple[int, dict, bytes]:
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
