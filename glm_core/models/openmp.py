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
"""

from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path

log = logging.getLogger(__name__)

OMP_PAUSE_SOFT = 1
_RUNTIMES = ("libgomp", "libomp", "libiomp5")


@functools.cache
def _pause_functions() -> tuple:
    """`omp_pause_resource_all` of every OpenMP runtime in the process (PyTorch's, and any a library brings along:
    sentencepiece's wheel has its own libgomp), or none (not Linux, or runtimes too old to have it)."""
    import torch  # noqa: F401  # PyTorch loads its OpenMP runtime

    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux: nothing to release (macOS and Windows runtimes are left as they are)
        return ()
    paths = {line.split()[-1] for line in maps.splitlines() if any(f"/{name}" in line for name in _RUNTIMES)}
    functions = []
    for path in sorted(paths):
        try:
            function = ctypes.CDLL(path).omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        function.argtypes, function.restype = [ctypes.c_int], ctypes.c_int
        functions.append(function)
    return tuple(functions)


def release_pool() -> bool:
    """End the calling thread's OpenMP worker pools (call it outside any parallel region). True when released."""
    functions = _pause_functions()
    codes = [pause(OMP_PAUSE_SOFT) for pause in functions]
    if any(codes):
        log.debug("omp_pause_resource_all returned %s", codes)
    return bool(functions) and not any(codes)
