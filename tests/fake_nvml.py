"""A stand-in for the `pynvml` module with the functions the GPU monitor uses, raising pynvml's real error classes,
so tests cover the handling of no driver, a lost GPU and unsupported figures on a machine without a GPU."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from types import SimpleNamespace

import pynvml

GiB = 2**30


@dataclass
class FakeGpu:
    name: str = "NVIDIA H100 80GB HBM3"
    total: int = 80 * GiB
    used: int = 20 * GiB
    utilization: int = 37
    temperature: int = 51
    power_mw: int = 312_500
    power_limit_mw: int = 700_000
    compute: list[tuple[int, int | None]] = field(default_factory=list)  # (pid, used bytes or None)
    graphics: list[tuple[int, int | None]] = field(default_factory=list)
    failing: dict[str, Exception] = field(default_factory=dict)  # pynvml function name -> what it raises


class FakeNvml:
    NVMLError = pynvml.NVMLError
    NVMLError_GpuIsLost = pynvml.NVMLError_GpuIsLost
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU

    def __init__(self, gpus: list[FakeGpu] | None = None, init_error: Exception | None = None):
        self.gpus = gpus or []
        self.init_error = init_error
        self.init_calls = 0

    def _gpu(self, handle: int, function: str) -> FakeGpu:
        gpu = self.gpus[handle]
        if function in gpu.failing:
            raise gpu.failing[function]
        return gpu

    def nvmlInit(self):
        self.init_calls += 1
        if self.init_error is not None:
            raise self.init_error

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index):
        self._gpu(index, "nvmlDeviceGetHandleByIndex")
        return index

    def nvmlDeviceGetName(self, handle):
        return self._gpu(handle, "nvmlDeviceGetName").name  # a str, as pynvml returns on Python 3

    def nvmlDeviceGetMemoryInfo(self, handle):
        gpu = self._gpu(handle, "nvmlDeviceGetMemoryInfo")
        return SimpleNamespace(total=gpu.total, used=gpu.used, free=gpu.total - gpu.used)

    def nvmlDeviceGetUtilizationRates(self, handle):
        return SimpleNamespace(gpu=self._gpu(handle, "nvmlDeviceGetUtilizationRates").utilization, memory=10)

    def nvmlDeviceGetTemperature(self, handle, sensor):
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return self._gpu(handle, "nvmlDeviceGetTemperature").temperature

    def nvmlDeviceGetPowerUsage(self, handle):
        return self._gpu(handle, "nvmlDeviceGetPowerUsage").power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, handle):
        return self._gpu(handle, "nvmlDeviceGetEnforcedPowerLimit").power_limit_mw

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        gpu = self._gpu(handle, "nvmlDeviceGetComputeRunningProcesses")
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in gpu.compute]

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle):
        gpu = self._gpu(handle, "nvmlDeviceGetGraphicsRunningProcesses")
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in gpu.graphics]


UNSEEN_PID = 4_000_000  # above Linux's pid_max limit: never a visible process


def two_busy_gpus() -> FakeNvml:
    """GPU 0 runs this process (memory not reported, as on WDDM) and another one; GPU 1 a graphics process."""
    return FakeNvml(
        [
            FakeGpu(compute=[(os.getpid(), None), (UNSEEN_PID, 12 * GiB)]),
            FakeGpu(
                name="NVIDIA A10",
                total=24 * GiB,
                used=3 * GiB,
                utilization=0,
                temperature=33,
                power_mw=21_000,
                power_limit_mw=150_000,
                graphics=[(UNSEEN_PID + 1, 512 * 2**20)],
            ),
        ]
    )
