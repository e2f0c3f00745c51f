"""A small, deliberately faulty OpenAI-compatible server for the remote backend's failure paths (the project's own
`serve` covers the normal ones). The model id picks the behaviour:

  words   streams "word0 word1 ..." (max_tokens words, `delay` s apart), then usage when asked for it
  slow    the same, 0.1 s per word: long enough to stop, or to kill the server, in the middle
  cut     three words, then the connection is dropped without the end of the stream
  broken  a 500 error;  busy: a 429 error;  anything else: 404
`owned_by` is what /v1/models says serves them ("llamacpp": llama.cpp's sampling names are sent). With `key` set,
a request without `Authorization: Bearer <key>` gets 401. `running` counts streams being written
and `disconnects` the ones whose client went away; /metrics reports them as vLLM does.

Run alone (`python faulty_openai_server.py PORT`) to be killed by a test.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODELS = ("words", "slow", "cut", "broken", "busy")


class FaultyServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int = 0, key: str | None = None, delay: float = 0.0, owned_by: str = "faulty"):
        super().__init__(("127.0.0.1", port), Handler)
        self.key, self.delay, self.owned_by = key, delay, owned_by
        self.running = 0
        self.disconnects = 0
        self.requests: list[dict] = []
        self.authorizations: list[str | None] = []  # the Authorization header of every request, in order
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def start(self) -> FaultyServer:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class Handler(BaseHTTPRequestHandler):
    server: FaultyServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": {"message": message, "type": "test", "code": status}})

    def _authorized(self) -> bool:
        self.server.authorizations.append(self.headers.get("Authorization"))
        if self.server.key and self.headers.get("Authorization") != f"Bearer {self.server.key}":
            self._error(401, "invalid api key")
            return False
        return True

    def do_GET(self):
        if self.path == "/metrics":
            with self.server.lock:
                running = self.server.running
            text = (
                "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
                "# TYPE vllm:num_requests_running gauge\n"
                f'vllm:num_requests_running{{engine="0",model_name="slow"}} {float(running)}\n'
                f'vllm:num_requests_waiting{{engine="0",model_name="slow"}} 0.0\n'
                f'vllm:kv_cache_usage_perc{{engine="0",model_name="slow"}} 0.25\n'
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(text)))
            self.end_headers()
            self.wfile.write(text)
        elif self.path == "/v1/models":
            if self._authorized():
                self._json(
                    200,
                    {
                        "object": "list",
                        "data": [
                            {
                                "id": m,
                                "object": "model",
                                "created": 0,
                                "owned_by": self.server.owned_by,
                                "max_model_len": 4096,
                            }
                            for m in MODELS
                        ],
                    },
                )
        else:
            self._error(404, "no such route")

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        if self.path != "/v1/chat/completions":
            return self._error(404, "no such route")
        if not self._authorized():
            return
        self.server.requests.append(body)
        model = body.get("model")
        if model == "broken":
            return self._error(500, "the engine crashed")
        if model == "busy":
            return self._error(429, "too many requests")
        if model not in ("words", "slow", "cut"):
            return self._error(404, f"The model `{model}` does not exist.")
        count = 3 if model == "cut" else int(body.get("max_tokens") or 16)
        delay = 0.1 if model == "slow" else self.server.delay
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()

        def event(payload: dict | str) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload)
            self.wfile.write(f"data: {data}\n\n".encode())
            self.wfile.flush()

        def chunk(content: str | None, finish: str | None = None) -> dict:
            return {
                "id": "c1",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": model,
                "choices": [
                    {"index": 0, "delta": {"content": content} if content is not None else {}, "finish_reason": finish}
                ],
            }

        with self.server.lock:
            self.server.running += 1
        try:
            event(
                chunk("", None)
                | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
            )
            for i in range(count):
                time.sleep(delay)
                event(chunk(f"word{i} " if i < count - 1 else f"word{i}"))
            if model == "cut":
                self.close_connection = True
                self.connection.shutdown(2)  # the server goes away mid-reply: no finish, no [DONE]
                return
            event(chunk(None, "length"))
            if (body.get("stream_options") or {}).get("include_usage"):
                event(
                    {
                        "id": "c1",
                        "object": "chat.completion.chunk",
                        "created": 0,
                        "model": model,
                        "choices": [],
                        "usage": {"prompt_tokens": 7, "completion_tokens": count, "total_tokens": 7 + count},
                    }
                )
            event("[DONE]")
        except (BrokenPipeError, ConnectionResetError):
            with self.server.lock:
                self.server.disconnects += 1
        finally:
            with self.server.lock:
                self.server.running -= 1


if __name__ == "__main__":
    server = FaultyServer(int(sys.argv[1]))
    print(server.url, flush=True)
    server.serve_forever()
