"""The compile thread gives the cores back to the engine while the engine has work.

A decode graph compiles in a thread of the serving process, and most of a compile is Python (dynamo's trace,
inductor's lowering) holding the GIL. Each of PyTorch's operators on the engine's thread releases the GIL and
takes it back, and a thread that asks for it back waits up to the switch interval (5 ms) while another computes
in Python: a one-row BF16 step of SmolLM2 went from 49 to 0.4-1.7 tok/s beside a compile (3.1 with a 0.5 ms
switch interval). So while the engine has work, the compile runs a slice at a time (COMPILE_SLICE_S) and then
sleeps (YIELD_S) without the GIL. It still advances (5 % of the time), so nothing waits on it for ever.

The hook is a profile function in C (compile_yield.c, built here with the C compiler, like our kernels). The
engine's thread puts it on the compile's thread when it has work, and it takes itself off once the engine is
idle: profiling makes the interpreter slower (a frame object and a line number per call), so a compile that
nobody waits for runs without it. Where the C hook cannot be built (no compiler, no Python headers), a Python
trace function does the same, on for the whole compile: 2.0x the compile's time, against 1.0x for the C hook
while idle (scripts/bench_compile_contention.py, docs/BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

COMPILE_SLICE_S = 0.001
YIELD_S = 0.02
SOURCE = Path(__file__).with_name("compile_yield.c")

KIND: str | None = None  # which hook: "C", "Python" or "none"; None: C where it builds (the benchmark sets it)

_native: Callable | str | None = None  # glm_yield_on, or why it could not be built (a string); None: not tried


def native_on() -> Callable | str:
    """The C hook's switch, built and loaded once per process; or why not (a string)."""
    global _native
    if _native is None:
        try:
            _native = _load(_build())
        except Exception as exc:  # no compiler or headers: the Python hook serves
            _native = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
            log.warning("the compile's C hook could not be built (%s); a Python one serves", _native)
    return _native


def _build() -> Path:
    from ..models.cpu_kernels import compile_once
    from ..settings import load_settings

    include = sysconfig.get_paths()["include"]
    if not (Path(include) / "Python.h").exists():
        raise FileNotFoundError(f"no Python.h in {include}")
    flags = ["-O2", "-shared", "-fPIC", f"-I{include}"]
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), sys.version.encode(), " ".join(flags).encode()]))
    target = load_settings().cache_dir / "kernels" / f"compile_yield-{key.hexdigest()[:16]}.so"
    return compile_once(target, [os.environ.get("CC", "gcc"), *flags], [SOURCE])


def _load(path: Path) -> Callable:
    on = ctypes.PyDLL(str(path)).glm_yield_on  # PyDLL: called with the GIL held
    on.argtypes = [ctypes.c_ulong, ctypes.py_object, ctypes.c_double, ctypes.c_double]
    on.restype = ctypes.c_int
    return on


class Yielder:
    """One compile thread's hook. The compile runs inside `compiling()`; the engine's thread calls
    `engine_working()` at each of its iterations, and from then on, until the engine is idle again, the compile
    sleeps YIELD_S after each COMPILE_SLICE_S (`busy()` is asked once a slice)."""

    def __init__(self, busy: Callable[[], bool]):
        self.busy = busy
        kind = KIND or "C"
        self.kind = "Python" if kind == "C" and not callable(native_on()) else kind
        self._lock = threading.Lock()
        self._compiling: int | None = None  # the compiling thread's ident, while it compiles (C hook)

    @contextlib.contextmanager
    def compiling(self) -> Iterator[None]:
        if self.kind == "C":
            with self._lock:
                self._compiling = threading.get_ident()
        elif self.kind == "Python":
            sys.settrace(_python_hook(self.busy))
        try:
            yield
        finally:
            with self._lock:
                self._compiling = None
                sys.setprofile(None)
                sys.settrace(None)

    def engine_working(self) -> None:
        if self._compiling is None:  # read without the lock: most iterations run with no compile
            return
        with self._lock:
            on = native_on()
            if self._compiling is not None and callable(on):
                on(self._compiling, self.busy, COMPILE_SLICE_S, YIELD_S)


def _python_hook(busy: Callable[[], bool]):
    """The same as the C hook, as a trace function on for the whole compile: a Python call on each of the
    compile's calls, and the interpreter's line tracing."""
    count, since = 0, time.perf_counter()

    def trace(_frame, _event, _arg):
        nonlocal count, since
        count += 1
        if count & 63 == 0:
            now = time.perf_counter()
            if now - since > COMPILE_SLICE_S:
                since = now
                if busy():
                    time.sleep(YIELD_S)
                    since = time.perf_counter()
        return None  # no line events

    return trace
