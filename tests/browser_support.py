"""What the browser tests share: Debian's chromium, and `streamlit run Home.py` started as a user starts it."""

import contextlib
import os
from pathlib import Path

import pytest
from api_helpers import free_port, start_portal, wait_until_up
from conftest import stop_process

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def need_chromium() -> None:
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail("Debian's chromium is missing: `make test` installs it")
        pytest.skip("Debian's chromium is not installed (make test installs it)")


@contextlib.contextmanager
def running_portal(
    output_dir: Path, env: dict | None = None, log_name: str = "streamlit-server.log", address: str | None = "127.0.0.1"
):
    """`streamlit run Home.py` on a free port (with `env` added to this environment, bound to `address`; None: as a
    plain `streamlit run` binds); yields (its URL at 127.0.0.1, the process, its log file) once healthy."""
    port = free_port()
    log_path = output_dir / log_name
    log = open(log_path, "w")
    process = start_portal(port, log, address=address, **(env or {}))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(process, f"{url}/_stcore/health", 120, describe=log_path.read_text)
        yield url, process, log_path
    finally:
        stop_process(process, timeout=20)
        log.close()


@contextlib.contextmanager
def portal(output_dir: Path, env: dict | None = None, log_name: str = "streamlit-server.log"):
    """`streamlit run Home.py` on a free port; yields its URL once healthy."""
    with running_portal(output_dir, env, log_name) as (url, _, _):
        yield url
