"""`bench peer`: our server against llama.cpp's `llama-server` on the same GGUF file, measured by one load client
(bench concurrency's, client side, through the OpenAI API) at 1, 4 and 16 streams: aggregate tokens/s and time to
first token of each, and ours / theirs. One server runs at a time, so neither takes the other's cores."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from ..settings import PROJECT_ROOT
from .concurrency import run_remote_concurrency_bench
from .llama_server import cpu_flags, default_threads, free_port, running_process, running_server


@contextlib.contextmanager
def our_server(model: Path, precision: str, log_file: Path | None = None, timeout_s: float = 300) -> Iterator[str]:
    """`python -m glm_core serve` on `model` at `precision`, on a free local port; its base URL once loaded."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("GLM_API_KEYS", None)  # a local client, no key
    command = [sys.executable, "-m", "glm_core", "serve", "--model", str(model), "--precision", precision]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    with running_process(command, f"http://127.0.0.1:{port}", "serve", log_file, timeout_s, env) as url:
        yield url


def wait_for_fast_path(url: str, timeout_s: float) -> str:
    """Wait while the server compiles its decode step (a portal that has run a while has it ready; measuring
    meanwhile would measure the compiler on the same cores). Returns the fast path's state."""
    deadline = time.monotonic() + timeout_s
    while True:
        with urllib.request.urlopen(url + "/health", timeout=5) as response:
            state = json.load(response).get("fast_path", "off")
        if state != "compiling":
            return state
        if time.monotonic() > deadline:
            raise TimeoutError(f"the server's compiled decode step was not ready after {timeout_s:.0f} s")
        time.sleep(1)


def run_peer_bench(
    model: Path,
    streams: list[int],
    max_new_tokens: int = 64,
    repeats: int = 1,
    precisions: tuple[str, ...] = ("auto", "int4"),
    threads: tuple[int, ...] = (),
    llama_model: Path | None = None,
    log_dir: Path | None = None,
    compile_timeout_s: float = 900,
    fresh_prompts: bool = False,
) -> dict:
    """llama-server on `llama_model` (default: the same file) at each of `threads` (default: one core fewer than
    the machine has, and all of them), then our server on `model` at each of `precisions` once its compiled decode
    step is ready (GLM_COMPILE as the environment says); each measured alone by the same client. Ratios are ours /
    llama.cpp's best per stream count (the thread count that gave the most tokens/s there). `fresh_prompts`: each
    run's prompts are new, so neither server answers one from a prompt it kept (both keep them: the same prompts
    again measure that)."""
    threads = tuple(dict.fromkeys(threads or (default_threads(), os.cpu_count() or 1)))
    if log_dir:
        log_dir.mkdir(parents=True, exist_ok=True)
    logs = (lambda name: log_dir / name) if log_dir else (lambda name: None)
    by_threads: dict[int, dict] = {}
    for count in threads:
        with running_server(
            llama_model or model,
            threads=count,
            parallel=max(streams),
            context=max(streams) * (max_new_tokens + 256),
            extra=("--cont-batching",),
            log_file=logs("llama-server.log" if count == threads[0] else f"llama-server-t{count}.log"),
        ) as url:
            by_threads[count] = run_remote_concurrency_bench(
                f"{url}/v1", streams, max_new_tokens, repeats, fresh_prompts=fresh_prompts
            )
    runs = [{**run, "threads": count} for count, result in by_threads.items() for run in result["runs"]]
    best = []
    for n in streams:
        best.append(max((run for run in runs if run["streams"] == n), key=lambda run: run["aggregate_tokens_per_s"]))
    theirs = {"runs": best}
    ours, fast_paths = {}, {}
    for precision in precisions:
        with our_server(model, precision, log_file=logs(f"serve-{precision}.log")) as url:
            fast_paths[precision] = wait_for_fast_path(url, compile_timeout_s)
            ours[precision] = run_remote_concurrency_bench(
                f"{url}/v1", streams, max_new_tokens, repeats, fresh_prompts=fresh_prompts
            )
    by_streams = {run["streams"]: run for run in theirs["runs"]}
    ratios = {
        precision: [
            {
                "streams": run["streams"],
                "tokens_per_s": run["aggregate_tokens_per_s"] / by_streams[run["streams"]]["aggregate_tokens_per_s"],
                "ttft": run["ttft_median_s"] / by_streams[run["streams"]]["ttft_median_s"],
            }
            for run in result["runs"]
        ]
        for precision, result in ours.items()
    }
    flags = sorted(cpu_flags() & {"avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"})
    return {
        "model": str(model),
        "llama_model": str(llama_model or model),
        "cpu_flags": flags,
        "cores": os.cpu_count(),
        "llama_threads": list(threads),
        "max_new_tokens": max_new_tokens,
        "fresh_prompts": fresh_prompts,
        "llama_cpp": theirs,
        "llama_cpp_by_threads": {str(count): result for count, result in by_threads.items()},
        "ours": ours,
        "fast_path": fast_paths,
        "ratios": ratios,
    }


def format_peer_report(r: dict) -> str:
    lines = [
        f"bench peer: {r['model']} ({', '.join(r['cpu_flags'])}; {r['cores']} cores; llama-server -t "
        f"{' and -t '.join(map(str, r['llama_threads']))}), {r['max_new_tokens']} new tokens per stream, greedy, "
        f"{'new prompts every run' if r.get('fresh_prompts') else 'the same prompts every run'}, "
        "client side; ratios against llama.cpp's best (*) per stream count",
        "server                 streams  aggregate tok/s  ttft median  ours/llama tok/s  ours/llama ttft",
    ]
    best = {(run["threads"], run["streams"]) for run in r["llama_cpp"]["runs"]}
    for count, result in r["llama_cpp_by_threads"].items():
        for run in result["runs"]:
            mark = "*" if (int(count), run["streams"]) in best else " "
            lines.append(
                f"{'llama.cpp -t ' + count:<21}{mark} {run['streams']:>7}  "
                f"{run['aggregate_tokens_per_s']:>15.1f}  {run['ttft_median_s']:>10.2f}s"
            )
    for precision, result in r["ours"].items():
        for run, ratio in zip(result["runs"], r["ratios"][precision]):
            lines.append(
                f"{'ours ' + precision + ' (' + r['fast_path'][precision] + ')':<22} {run['streams']:>7}  "
                f"{run['aggregate_tokens_per_s']:>15.1f}  {run['ttft_median_s']:>10.2f}s  "
                f"{ratio['tokens_per_s']:>15.2f}x  {ratio['ttft']:>14.2f}x"
            )
    return "\n".join(lines)
