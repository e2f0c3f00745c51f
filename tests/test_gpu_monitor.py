"""glm_core.telemetry.gpu_monitor against a fake NVML module (raising pynvml's real error classes), and the memory helpers
of glm_core.telemetry.memory it uses."""

import os
import time

import pynvml
import pytest
from fake_nvml import UNSEEN_PID, FakeGpu, FakeNvml, GiB, two_busy_gpus

from glm_core.telemetry.gpu_monitor import History, Monitor, NvmlReader
from glm_core.telemetry.memory import Freed, MemoryInUse, format_bytes, free_cached_memory, host_memory


def test_two_gpus_with_their_figures_and_processes():
    reading = NvmlReader(two_busy_gpus()).read()
    assert reading.error is None and [g.index for g in reading.gpus] == [0, 1]
    first, second = reading.gpus
    assert first.name == "NVIDIA H100 80GB HBM3"
    assert (first.memory_used, first.memory_total) == (20 * GiB, 80 * GiB)
    assert (first.utilization_pct, first.temperature_c) == (37, 51)
    assert (first.power_w, first.power_limit_w) == (312.5, 700.0)
    assert first.unavailable == {} and first.error is None
    # Biggest user first; this process is marked and named although the driver does not say what it uses.
    other, mine = first.processes
    assert (other.pid, other.used_bytes, other.name, other.this_process) == (UNSEEN_PID, 12 * GiB, None, False)
    assert (mine.pid, mine.used_bytes, mine.this_process, mine.kind) == (os.getpid(), None, True, "compute")
    assert mine.name  # psutil sees this process
    assert second.name == "NVIDIA A10" and second.processes[0].kind == "graphics"
    assert second.processes[0].used_bytes == 512 * 2**20


def test_a_process_in_both_lists_is_one_row():
    nvml = FakeNvml([FakeGpu(compute=[(UNSEEN_PID, None)], graphics=[(UNSEEN_PID, 3 * GiB)])])
    [row] = NvmlReader(nvml).read().gpus[0].processes
    assert (row.kind, row.used_bytes) == ("compute+graphics", 3 * GiB)


@pytest.mark.parametrize(
    "error, reason",
    [
        (pynvml.NVMLError_LibraryNotFound(), "NVML Shared Library Not Found"),
        (pynvml.NVMLError_DriverNotLoaded(), "Driver Not Loaded"),
    ],
)
def test_no_driver_says_why_and_retries_on_the_next_read(error, reason):
    nvml = FakeNvml([FakeGpu()], init_error=error)
    reader = NvmlReader(nvml)
    reading = reader.read()
    assert reading.gpus == [] and reading.error == reason
    nvml.init_error = None  # the driver came up meanwhile
    assert [g.name for g in reader.read().gpus] == ["NVIDIA H100 80GB HBM3"]
    reader.read()
    assert nvml.init_calls == 2  # initialized once it worked, not on every read


def test_no_gpus():
    assert NvmlReader(FakeNvml([])).read().error == "the NVIDIA driver reports no GPUs"


def test_a_lost_gpu_leaves_the_others():
    nvml = two_busy_gpus()
    nvml.gpus[0].failing["nvmlDeviceGetMemoryInfo"] = pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
    first, second = NvmlReader(nvml).read().gpus
    assert first.error == "GPU is lost" and first.name == "NVIDIA H100 80GB HBM3"
    assert first.memory_used is None and first.processes == []  # nothing more was asked of it
    assert second.error is None and second.memory_used == 3 * GiB


def test_a_gpu_without_a_handle_is_an_error_not_an_exception():
    nvml = two_busy_gpus()
    nvml.gpus[1].failing["nvmlDeviceGetHandleByIndex"] = pynvml.NVMLError_NoPermission()
    first, second = NvmlReader(nvml).read().gpus
    assert first.error is None and second.error == "Insufficient Permissions"


def test_unsupported_figures_are_missing_and_the_rest_stays():
    nvml = two_busy_gpus()
    nvml.gpus[0].failing.update(
        {
            "nvmlDeviceGetPowerUsage": pynvml.NVMLError_NotSupported(),
            "nvmlDeviceGetEnforcedPowerLimit": pynvml.NVMLError_NotSupported(),
            "nvmlDeviceGetGraphicsRunningProcesses": RuntimeError("binding mismatch"),
        }
    )
    gpu = NvmlReader(nvml).read().gpus[0]
    assert gpu.error is None and gpu.power_w is None and gpu.power_limit_w is None
    assert gpu.unavailable == {
        "power": "Not Supported",
        "power limit": "Not Supported",
        "graphics processes": "RuntimeError: binding mismatch",
    }
    assert gpu.memory_used == 20 * GiB and gpu.temperature_c == 51 and len(gpu.processes) == 2


def test_bytes_names_are_decoded():
    nvml = FakeNvml([FakeGpu(name=b"Tesla T4")])  # older pynvml versions return bytes
    assert NvmlReader(nvml).read().gpus[0].name == "Tesla T4"


def test_the_real_binding_never_raises():
    """pynvml itself: with a driver, GPUs and no error; without one (CI), no GPUs and NVML's own reason."""
    import shutil

    reading = NvmlReader().read()
    if shutil.which("nvidia-smi"):
        assert reading.gpus and reading.error is None and all(g.memory_total > 0 for g in reading.gpus)
    else:
        assert reading.gpus == [] and "NVML" in reading.error


def test_sample_has_host_and_process_memory():
    sample = Monitor(FakeNvml(init_error=pynvml.NVMLError_LibraryNotFound())).sample()
    assert 0 < sample.host["used"] < sample.host["total"] and sample.host["available"] > 0
    assert 0 < sample.process["current"] <= sample.process["peak"]
    assert sample.nvml.error == "NVML Shared Library Not Found" and sample.allocator == []  # no CUDA here


def test_history_is_bounded_oldest_dropped_first():
    monitor = Monitor(two_busy_gpus(), interval_s=2, history_s=6)
    assert monitor.history._points.maxlen == 3
    for _ in range(5):
        monitor.record()
    points = monitor.history.points()
    assert len(points) == 3 and [p["time"] for p in points] == sorted(p["time"] for p in points)
    assert points[-1]["GPU 0 memory used"] == 20 * GiB and points[-1]["GPU 1 utilization"] == 0
    assert points[-1]["process RSS"] > 0 and points[-1]["host used"] > 0


def test_history_without_gpus_has_host_columns_only():
    history = History(maxlen=10)
    history.add(Monitor(FakeNvml([])).sample())
    assert set(history.points()[0]) == {"time", "host used", "process RSS"}


def test_sampler_thread_fills_the_history_until_stopped():
    monitor = Monitor(two_busy_gpus(), interval_s=0.05, history_s=60).start()
    deadline = time.time() + 10
    while len(monitor.history) < 3 and time.time() < deadline:
        time.sleep(0.05)
    monitor.stop()
    count = len(monitor.history)
    assert count >= 3
    time.sleep(0.2)
    assert len(monitor.history) == count


def test_free_cached_memory_on_cpu_reports_before_and_after():
    keep = [b"\x01" * (64 * 2**20)]  # written, so resident: something to free
    before = MemoryInUse.now()
    keep.clear()
    freed = free_cached_memory(before)
    assert freed.before is before and freed.after.reserved == {}  # no CUDA devices on CPU
    assert freed.after.rss < before.rss
    assert freed.describe().startswith("process RSS ") and "freed" in freed.describe()


def test_freed_describes_each_device():
    freed = Freed(MemoryInUse(3 * GiB, {"cuda:0": 2 * GiB}), MemoryInUse(3 * GiB, {"cuda:0": GiB // 2}))
    assert freed.describe() == (
        "process RSS 3.00 GiB → 3.00 GiB (nothing freed); cuda:0 reserved 2.00 GiB → 512 MiB (1.50 GiB freed)"
    )


def test_format_bytes():
    assert [format_bytes(n) for n in (None, 0, 2048, 300 * 2**20, 1536 * 2**20, 80 * GiB, 123.4 * GiB)] == [
        "n/a",
        "0 B",
        "2.00 KiB",
        "300 MiB",
        "1.50 GiB",
        "80.0 GiB",
        "123 GiB",
    ]


def test_host_memory():
    memory = host_memory()
    assert memory["total"] >= memory["used"] > 0 and memory["available"] > 0
