"""The threads that run a model besides the engine's worker give back their OpenMP worker threads."""

import os
import sys
import threading
import time

import pytest
import torch

from glm_core.models.openmp import release_pool


def threads_now() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not sys.platform.startswith("linux") or torch.get_num_threads() < 2, reason="Linux, 2+ threads")
def test_a_thread_that_ran_parallel_work_gives_its_workers_back():
    seen = {}

    def job():
        seen["before"] = threads_now()
        torch.ones(4096, 4096).mul_(2).sum()  # a parallel region: this thread now keeps a pool of workers
        seen["with pool"] = threads_now()
        seen["released"] = release_pool()
        deadline = time.monotonic() + 5
        while threads_now() >= seen["with pool"] and time.monotonic() < deadline:
            time.sleep(0.01)
        seen["after"] = threads_now()

    worker = threading.Thread(target=job)
    worker.start()
    worker.join()
    assert seen["released"] is True
    assert seen["with pool"] > seen["before"]  # the pool's workers were started ...
    assert seen["after"] < seen["with pool"]  # ... and have ended


@pytest.mark.skipif(not sys.platform.startswith("linux") or torch.get_num_threads() < 2, reason="Linux, 2+ threads")
def test_an_idle_engine_gives_its_workers_back(tiny_loaded):
    """Another engine (Compare mode, a second model) decodes at full speed only if an idle one holds no pool."""
    from glm_core.engine import Engine

    def parallel_work(_loaded):  # the process's threads just before and just after the worker's parallel region
        before = threads_now()
        torch.ones(4096, 4096).mul_(2).sum()
        return before, threads_now()

    engine = Engine(tiny_loaded)
    try:
        # Counted on the worker, around the region: a thread of an earlier test (this process runs many) that ends
        # between two counts taken further apart hid the pool's one helper thread from the comparison.
        idle, during = engine.run_on_worker(parallel_work)
        assert during > idle  # the worker's parallel region started its pool ...
        deadline = time.monotonic() + 5
        while threads_now() >= during and time.monotonic() < deadline:
            time.sleep(0.01)
        assert threads_now() < during  # ... and the idle worker gave it back
    finally:
        engine.close()


@pytest.mark.skipif(not sys.platform.startswith("linux") or torch.get_num_threads() < 2, reason="Linux, 2+ threads")
def test_timing_on_one_thread_leaves_the_other_threads_theirs():
    """The kernels' timings at load run their thread on one thread; another thread whose first parallel work falls
    meanwhile (an engine's worker starting) still gets them all: with torch.set_num_threads it kept one for good."""
    from glm_core.models.openmp import one_thread_here

    threads = torch.get_num_threads()
    seen = {}
    with one_thread_here():
        seen["here"] = torch.get_num_threads()
        other = threading.Thread(target=lambda: seen.setdefault("other", torch.get_num_threads()))
        other.start()
        other.join()
    assert seen == {"here": 1, "other": threads}
    assert torch.get_num_threads() == threads  # and this thread's count is back
