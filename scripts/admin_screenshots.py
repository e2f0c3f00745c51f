"""Screenshots of the Admin page for docs/ADMIN.md: the portal started as a user starts it (`streamlit run
Home.py`, no secrets file: this machine's browser is admin) on a fresh data folder, driven by Debian's chromium.

The keys, quotas and audit entries are made through the same calls the CLI makes; the usage rows are written by
this script for the picture (a week of four example people on two models), through the recorder the portal uses.
Only remote backends are configured (a port nothing listens on), so no model is loaded for the pictures.

    .venv/bin/python scripts/admin_screenshots.py [--out docs]
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from glm_core.admin import Admin  # noqa: E402
from glm_core.admin.quotas import DEFAULT, Quota  # noqa: E402
from glm_core.admin.usage import UsageRecord  # noqa: E402

PEOPLE = ["alice@example.com", "bob@example.com", "ci-bot", "carol@example.com"]
MODELS = [("local", "SmolLM2-135M-Instruct", "bf16"), ("glm4", "THUDM/glm-4-9b-chat", "bf16")]


def seed(data: Path) -> None:
    admin = Admin(data)
    for name, options in (("ci-bot", {"expires_days": 90}), ("ops", {"admin": True}), ("bob-laptop", {})):
        record, _ = admin.keys.create(
            name, created_by="cli:ops", owner=None if name != "bob-laptop" else PEOPLE[1], **options
        )
        admin.audit.record("cli:ops", "key.create", record.name, {"admin": record.admin}, "cli@portal")
    admin.keys.revoke("bob-laptop")
    admin.audit.record("alice@example.com", "key.revoke", "bob-laptop", {}, "10.0.0.12")
    admin.quotas.set(DEFAULT, Quota(tokens_per_day=200_000, requests_per_minute=30, running=2), by="alice@example.com")
    admin.quotas.set(
        "ci-bot", Quota(tokens_per_day=1_000_000, requests_per_minute=120, running=4), by="alice@example.com"
    )
    admin.audit.record("alice@example.com", "quota.set", DEFAULT, {"tokens_per_day": 200_000}, "10.0.0.12")
    admin.audit.record("alice@example.com", "model.load", "embedded", {"precision": "bf16"}, "10.0.0.12")
    admin.audit.record("alice@example.com", "backend.add", "glm4", {"server": "http://gpu1:8000/v1"}, "10.0.0.12")
    admin.audit.record("bob@example.com", "share.create", "c-3f9a2b", {}, "10.0.0.31")
    rng = random.Random(0)
    now = time.time()
    records = []
    for day in range(7):
        for person in PEOPLE:
            for _ in range(rng.randint(3, 25)):
                backend, model, level = rng.choice(MODELS)
                prompt = rng.randint(50, 3000)
                records.append(
                    UsageRecord(
                        now - day * 86400 - rng.random() * 3600,
                        person,
                        "key" if person == "ci-bot" else "person",
                        "api" if person == "ci-bot" else "browser",
                        backend,
                        model,
                        level,
                        prompt,
                        rng.randint(0, prompt),
                        rng.randint(20, 600),
                        round(rng.uniform(0.05, 0.8), 3),
                        round(rng.uniform(1, 20), 2),
                        "eos",
                    )
                )
    admin.usage._write(records)
    admin.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "docs"))
    args = parser.parse_args()
    from playwright.sync_api import expect, sync_playwright

    out = Path(args.out)
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "data"
        seed(data)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "GLM_DATA_DIR": str(data),
            "GLM_BACKENDS": "glm4=http://127.0.0.1:9/v1#THUDM/glm-4-9b-chat",
        }
        command = [sys.executable, "-m", "streamlit", "run", "Home.py", "--server.port", str(port)]
        command += ["--server.address", "127.0.0.1", "--server.headless", "true"]
        server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(240):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2)
                    break
                except OSError:
                    time.sleep(0.5)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--headless", "--no-sandbox"])
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(f"http://127.0.0.1:{port}/Admin")
                for tab, name in (
                    ("API keys", "keys"),
                    ("Usage", "usage"),
                    ("Quotas", "quotas"),
                    ("Audit log", "audit"),
                    ("Backends", "backends"),
                ):
                    button = page.get_by_role("tab", name=tab)
                    expect(button).to_be_visible(timeout=120_000)
                    button.click()
                    page.wait_for_timeout(2500)  # charts and tables draw
                    page.screenshot(path=str(out / f"admin-{name}.png"), full_page=True)
                    print(out / f"admin-{name}.png")
                browser.close()
        finally:
            server.terminate()
            server.wait(timeout=20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
