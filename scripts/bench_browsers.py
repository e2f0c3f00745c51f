"""N browser sessions chatting at once against N API streams on the same portal, in one run.

The portal is started as a user starts it (`streamlit run Home.py`, the embedded model). Three phases, each with
N conversations decoding together; the rate of each is the engine's own (decoded tokens read from the portal's
`/health` at the start and the end of a window in which all N are running), so the clients' views do not count:

  api-greedy    N streams through /v1/chat/completions, temperature 0
  api-defaults  N streams with the model's own sampling defaults (what a browser session gets)
  browsers      N chromium pages, each sending a prompt from the chat page (the model's sampling defaults)

api-defaults against api-greedy is what per-row sampling costs; browsers against api-defaults is what the
sessions' reruns and redraws take from the engine (they run in the portal's process). Prints one line per phase
and the ratios. Run it alone: on 2 cores, anything else running changes every figure.

    .venv/bin/python scripts/bench_browsers.py [--sessions 8] [--window 20]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from openai import OpenAI

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from browser_support import CHROMIUM, CHROMIUM_ARGS, running_portal  # noqa: E402

PROMPTS = [
    "Write a 2000-word essay on the history of the Roman Empire, with a title and sections.",
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in great detail how a steam engine works, step by step.",
    "Describe a journey through every country of South America, one long paragraph each.",
    "Write a detailed guide to growing tomatoes, from seed to harvest.",
    "Tell the whole history of the printing press, century by century.",
    "Explain how the internet works, from cables to web pages, in depth.",
    "Write a long letter from a sailor to his family describing a year at sea.",
]


def health(url: str) -> dict:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:  # 503 while no model is loaded: its body says so
        return json.load(exc)


def loaded_model(url: str, deadline: float = 300) -> str:
    """The model's name once the portal has loaded it (its /health says "no model loaded" until then)."""
    give_up = time.monotonic() + deadline
    while (report := health(url)).get("status") != "ok":
        if time.monotonic() > give_up:
            raise RuntimeError(f"the portal loaded no model: {report}")
        time.sleep(1)
    return report["model"]


def compiled(url: str, deadline: float = 900) -> str:
    """The compiled decode path's state once it no longer compiles: the graphs compile in a thread of the portal
    (minutes, on one of the cores) and would take that core from whichever phase ran meanwhile."""
    give_up = time.monotonic() + deadline
    while str(state := health(url).get("fast_path", "off")).startswith("compiling"):
        if time.monotonic() > give_up:
            raise RuntimeError(f"the decode graphs were still compiling after {deadline:.0f} s: {state}")
        time.sleep(2)
    return state


PORTAL_PID: int | None = None  # set once the portal runs: its CPU time is read beside the engine's rate


def cpu_seconds() -> tuple[dict[str, float], dict[int, float]]:
    """CPU seconds (user + system) so far of the portal process, chromium's processes and this process (the
    clients); and of each of the portal's threads."""
    import psutil

    def total(process) -> float:
        times = process.cpu_times()
        return times.user + times.system

    portal = psutil.Process(PORTAL_PID)
    figures = {"portal": total(portal), "chromium": 0.0, "clients": total(psutil.Process())}
    for process in psutil.process_iter(["name"]):
        if "chrom" in (process.info["name"] or "").lower():
            try:
                figures["chromium"] += total(process)
            except psutil.Error:  # ended meanwhile
                pass
    return figures, {t.id: t.user_time + t.system_time for t in portal.threads()}


def window(url: str, sessions: int, seconds: float, deadline: float = 300) -> dict:
    """Wait until `sessions` conversations are running, then the engine's decoded tokens over `seconds`, and
    how the cores' time was shared meanwhile (CPU seconds per second of the window): the portal, chromium, the
    clients, and the portal's four busiest threads (the engine's worker and its OpenMP helper, unless Streamlit's
    sessions or the API outdo them)."""
    give_up = time.monotonic() + deadline
    while health(url).get("running", 0) < sessions:
        if time.monotonic() > give_up:
            raise RuntimeError(f"{sessions} conversations never ran together: {health(url)}")
        time.sleep(0.2)
    time.sleep(2)  # the last one's prefill is done: decode steps only
    first, (cpu_first, threads_first), started = health(url), cpu_seconds(), time.perf_counter()
    time.sleep(seconds)
    last, (cpu_last, threads_last), elapsed = health(url), cpu_seconds(), time.perf_counter() - started
    per_thread = {tid: busy - threads_first.get(tid, 0.0) for tid, busy in threads_last.items()}
    cores = {name: (cpu_last[name] - cpu_first[name]) / elapsed for name in cpu_first}
    busiest = [busy / elapsed for busy in sorted(per_thread.values(), reverse=True)[:4]]
    return {
        "tokens_per_s": (last["decoded_tokens"] - first["decoded_tokens"]) / elapsed,
        "running_at_end": last["running"],
        "cores": cores,
        "busiest_threads": busiest,  # the portal's: the engine's worker and its OpenMP helper, unless others
    }


def api_phase(url: str, sessions: int, seconds: float, greedy: bool) -> dict:
    stop, model = threading.Event(), loaded_model(url)

    client = OpenAI(base_url=f"{url}/v1", api_key="unused: this machine's clients need no key", max_retries=0)

    def stream(prompt: str) -> None:
        """One conversation after another until the phase ends, so that `sessions` stay running even where a
        reply ends inside the window."""
        controls = {"temperature": 0} if greedy else {}  # left out: the model's own defaults
        while not stop.is_set():
            chunks = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=4000,
                stream=True,
                timeout=600,
                **controls,
            )
            with chunks:  # leaving it closes the stream, which stops the reply
                for _ in chunks:
                    if stop.is_set():
                        break

    threads = [threading.Thread(target=stream, args=(PROMPTS[i % len(PROMPTS)],), daemon=True) for i in range(sessions)]
    for thread in threads:
        thread.start()
    try:
        return window(url, sessions, seconds)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
        while health(url)["running"]:
            time.sleep(0.2)


def browser_phase(url: str, sessions: int, seconds: float) -> dict:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        pages = [browser.new_context(viewport={"width": 1100, "height": 800}).new_page() for _ in range(sessions)]
        try:
            for page in pages:
                page.goto(url)
            boxes = [page.get_by_test_id("stChatInputTextArea") for page in pages]
            for box in boxes:
                expect(box).to_be_enabled(timeout=240_000)
            for i, box in enumerate(boxes):
                box.fill(PROMPTS[i % len(PROMPTS)])
            for box in boxes:
                box.press("Enter")
            return window(url, sessions, seconds)
        finally:
            for page in pages:
                try:
                    page.get_by_test_id("stChatInputStopButton").click(timeout=5000)
                except Exception:
                    pass
            browser.close()


def main() -> int:
    global PORTAL_PID
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--window", type=float, default=20.0, help="seconds measured while all sessions run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="glm-bench-browsers-") as folder:
        env = {"GLM_DATA_DIR": folder, "GLM_MAX_RUNNING_PER_OWNER": str(args.sessions)}
        with running_portal(Path(folder), env) as (url, process, _):
            PORTAL_PID = process.pid
            loaded_model(url)
            results = {}
            for name, phase in (
                ("api-greedy", lambda: api_phase(url, args.sessions, args.window, greedy=True)),
                ("api-defaults", lambda: api_phase(url, args.sessions, args.window, greedy=False)),
                ("browsers", lambda: browser_phase(url, args.sessions, args.window)),
            ):
                print(f"{name}: compiled decode path {compiled(url)}", flush=True)  # no compile beside a phase
                results[name] = phase()
    print(f"bench browsers: {args.sessions} sessions, {args.window:.0f} s windows, {platform.processor() or ''}")
    for name, figures in results.items():
        cores = ", ".join(f"{who} {share:.2f}" for who, share in figures["cores"].items())
        cores += "; the portal's busiest threads " + " + ".join(f"{share:.2f}" for share in figures["busiest_threads"])
        print(
            f"{name:<13} {figures['tokens_per_s']:6.1f} tok/s  (running at the end: {figures['running_at_end']}; "
            f"cores busy: {cores})"
        )
    greedy, defaults, browsers = (results[k]["tokens_per_s"] for k in ("api-greedy", "api-defaults", "browsers"))
    print(f"sampling: api-defaults / api-greedy = {defaults / greedy:.2f}x")
    print(f"sessions: browsers / api-defaults = {browsers / defaults:.2f}x")
    print(f"browsers / api-greedy = {browsers / greedy:.2f}x (goal >= 0.9x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
