"""Give back a thread's OpenMP worker threads once it has done its share of PyTorch's work.

PyTorch's CPU operators run on OpenMP, and each thread that starts a parallel region keeps a pool of worker
threads for the rest of its life. When the pools of all threads together hold more threads than the machine has
cores, libgomp (PyTorch's OpenMP on Linux) stops letting idle workers spin and puts them to sleep at once, so
every parallel region of the engine's worker has to wake its helpers through the kernel. Measured here (2 cores,
AVX2): an element-wise op on [64, 576] took 22 us on the engine's thread alone and 46 us once another thread had
run one parallel region; the INT4 model's compiled decode step took 16.1 ms against 19.9 ms.

So the threads that run a model besides the engine's worker (the one that loads it, the one that compiles the
decode step) call `release_pool()` when they are done: OpenMP 5's `omp_pause_resource_all(omp_pause_soft)`
ends the calling thread's pool; a later parallel region in that thread makes a new one.

`one_thread_here()` runs the calling thread's parallel regions on one thread (the kernels' timings at load) without
`torch.set_num_threads`, which sets the count for the whole process: a thread whose first parallel region fell
meanwhile (another engine's worker starting) kept one thread for its life, at half speed on 2 cores.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

OMP_PAUSE_SOFT = 1
_RUNTIMES = ("libgomp", "libomp", "libiomp5")


@functools.cache
def _runtimes() -> tuple:
    """Every OpenMP runtime in the process (PyTorch's, and any a library brings along: sentencepiece's wheel has its
    own libgomp), or none (not Linux: macOS and Windows runtimes are left as they are)."""
    import torch  # noqa: F401  # PyTorch loads its OpenMP runtime

    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return ()
    paths = {line.split()[-1] for line in maps.splitlines() if any(f"/{name}" in line for name in _RUNTIMES)}
    runtimes = []
    for path in sorted(paths):
        try:
            runtimes.append(ctypes.CDLL(path))
        except OSError:
            continue
    return tuple(runtimes)


@functools.cache
def _pause_functions() -> tuple:
    """`omp_pause_resource_all` of every runtime that has it (OpenMP 5)."""
    functions = []
    for runtime in _runtimes():
        function = getattr(runtime, "omp_pause_resource_all", None)
        if function is not None:
            function.argtypes, function.restype = [ctypes.c_int], ctypes.c_int
            functions.append(function)
    return tuple(functions)


@contextlib.contextmanager
def one_thread_here() -> Iterator[None]:
    """The calling thread's parallel regions on one thread, every other thread's as they were: each runtime's
    `omp_set_num_threads`, which sets the calling thread's count only (PyTorch reads it back per thread)."""
    import torch

    torch.get_num_threads()  # PyTorch sets a thread's count at its first use: done here, before ours
    runtimes = [r for r in _runtimes() if hasattr(r, "omp_set_num_threads") and hasattr(r, "omp_get_max_threads")]
    saved = [runtime.omp_get_max_threads() for runtime in runtimes]
    for runtime in runtimes:
        runtime.omp_set_num_threads(1)
    try:
        yield
    finally:
        for runtime, count in zip(runtimes, saved):
            runtime.omp_set_num_threads(count)


def release_pool() -> bool:
    """End the calling thread's OpenMP worker pools (call it outside any parallel region). True when released."""
    functions = _pause_functions()
    codes = [pause(OMP_PAUSE_SOFT) for pause in functions]
    if any(codes):
        log.debug("omp_pause_resource_all returned %s", codes)
    return bool(functions) and not any(codes)
