"""What the GPU monitor page shows: each NVIDIA GPU through NVML, this process's allocator and memory, host
memory, and a bounded history of the last minutes that a background thread fills.

NVML is read through a module given to NvmlReader (pynvml by default, see default_nvml), so tests hand in a fake.
A machine without a driver, a GPU lost mid-way or a figure a GPU does not support become messages in the reading,
never exceptions: one failing figure leaves the others.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import psutil

from .memory import cuda_allocator, host_memory, process_memory

log = logging.getLogger(__name__)


def default_nvml():
    """The NVML binding: `pynvml`, from the nvidia-ml-py package. Tests replace this function to inject a fake."""
    import pynvml

    return pynvml


@dataclass
class GpuProcess:
    pid: int
    kind: str  # "compute", "graphics" or "compute+graphics"
    used_bytes: int | None  # None: the driver does not say (e.g. Windows WDDM, some containers)
    name: str | None  # None: the pid is not visible here (another container) or not ours to inspect
    this_process: bool


@dataclass
class GpuReading:
    index: int
    name: str | None = None
    memory_used: int | None = None
    memory_total: int | None = None
    utilization_pct: int | None = None
    temperature_c: int | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    processes: list[GpuProcess] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)  # figure -> why it could not be read
    error: str | None = None  # the device could not be read at all (e.g. "GPU is lost")


@dataclass
class NvmlReading:
    gpus: list[GpuReading]
    error: str | None = None  # why no GPU could be read at all (no driver, no NVML library, no GPU)


def _reason(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text if type(exc).__name__.startswith("NVMLError") else f"{type(exc).__name__}: {text}"


def _text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class NvmlReader:
    """Reads every GPU's figures. NVML is initialized on the first read and kept; after a failure it is
    initialized again on the next read (a driver loaded later, or one that came back)."""

    def __init__(self, nvml=None):
        self._nvml = nvml
        self._lock = threading.Lock()  # the page and the sampler thread read through the same reader
        self._initialized = False

    def read(self) -> NvmlReading:
        with self._lock:
            try:
                nvml = self._nvml = self._nvml or default_nvml()
            except ImportError as exc:
                return NvmlReading([], f"the NVML binding is not installed (nvidia-ml-py): {exc}")
            try:
                if not self._initialized:
                    nvml.nvmlInit()
                    self._initialized = True
                count = nvml.nvmlDeviceGetCount()
            except Exception as exc:  # NVMLError_LibraryNotFound, _DriverNotLoaded, _NoPermission, ...
                self._initialized = False
                return NvmlReading([], _reason(exc))
            if count == 0:
                return NvmlReading([], "the NVIDIA driver reports no GPUs")
            return NvmlReading([self._read_device(nvml, index) for index in range(count)])

    def _read_device(self, nvml, index: int) -> GpuReading:
        gpu = GpuReading(index)
        lost_error = getattr(nvml, "NVMLError_GpuIsLost", ())

        def figure(name: str, call):
            if gpu.error is not None:
                return None
            try:
                return call()
            except lost_error as exc:  # asking a lost GPU anything more only fails again, slowly
                gpu.error = _reason(exc)
            except Exception as exc:
                gpu.unavailable[name] = _reason(exc)
            return None

        handle = figure("handle", lambda: nvml.nvmlDeviceGetHandleByIndex(index))
        if "handle" in gpu.unavailable:
            gpu.error = gpu.unavailable.pop("handle")
        if gpu.error is not None:
            return gpu
        name = figure("name", lambda: nvml.nvmlDeviceGetName(handle))
        gpu.name = _text(name) if name is not None else None
        memory = figure("memory", lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
        if memory is not None:
            gpu.memory_used, gpu.memory_total = memory.used, memory.total
        utilization = figure("utilization", lambda: nvml.nvmlDeviceGetUtilizationRates(handle))
        gpu.utilization_pct = utilization.gpu if utilization is not None else None
        gpu.temperature_c = figure(
            "temperature", lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)
        )
        milliwatts = figure("power", lambda: nvml.nvmlDeviceGetPowerUsage(handle))
        gpu.power_w = milliwatts / 1000 if milliwatts is not None else None
        limit = figure("power limit", lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle))
        gpu.power_limit_w = limit / 1000 if limit is not None else None
        compute = figure("compute processes", lambda: nvml.nvmlDeviceGetComputeRunningProcesses(handle)) or []
        graphics = figure("graphics processes", lambda: nvml.nvmlDeviceGetGraphicsRunningProcesses(handle)) or []
        if gpu.error is None:
            gpu.processes = _processes(compute, graphics)
        return gpu


def this_process_gpu_bytes(index: int, nvml=None) -> int | None:
    """Device memory NVML counts for this process on GPU `index` (allocator, CUDA context and kernel images:
    what nvidia-smi shows); None where NVML cannot tell."""
    reading = NvmlReader(nvml).read()
    gpu = next((g for g in reading.gpus if g.index == index), None)
    mine = next((p for p in gpu.processes if p.this_process), None) if gpu is not None else None
    return mine.used_bytes if mine is not None else None


def _processes(compute: list, graphics: list) -> list[GpuProcess]:
    """One row per pid (a process can be in both lists), biggest user first."""
    rows: dict[int, GpuProcess] = {}
    for kind, infos in (("compute", compute), ("graphics", graphics)):
        for info in infos:
            used = getattr(info, "usedGpuMemory", None)
            row = rows.get(info.pid)
            if row is None:
                rows[info.pid] = GpuProcess(info.pid, kind, used, _process_name(info.pid), info.pid == os.getpid())
            else:
                row.kind = "compute+graphics"
                row.used_bytes = max((b for b in (row.used_bytes, used) if b is not None), default=None)
    return sorted(rows.values(), key=lambda row: -(row.used_bytes or 0))


def _process_name(pid: int) -> str | None:
    try:
        return psutil.Process(pid).name()
    except (psutil.Error, ValueError):  # gone, another pid namespace, or not ours to inspect
        return None


# ---- one sample of everything, and the history ---------------------------------------------------------------


@dataclass
class Sample:
    time: float  # time.time()
    host: dict  # host_memory(): total, used, available
    process: dict  # process_memory(): current (RSS), peak
    nvml: NvmlReading
    allocator: list[dict]  # cuda_allocator(): per CUDA device this process uses


class History:
    """The last `maxlen` samples, reduced to what the chart draws; safe to add to and read from any thread."""

    def __init__(self, maxlen: int):
        self._points: deque[dict] = deque(maxlen=maxlen)
        self._lock = threading.Lock()

    def add(self, sample: Sample) -> None:
        point = {"time": sample.time, "host used": sample.host["used"], "process RSS": sample.process["current"]}
        for gpu in sample.nvml.gpus:
            point[f"GPU {gpu.index} memory used"] = gpu.memory_used
            point[f"GPU {gpu.index} utilization"] = gpu.utilization_pct
        with self._lock:
            self._points.append(point)

    def points(self) -> list[dict]:
        """Oldest first: {"time", "host used", "process RSS", "GPU i memory used" (bytes), "GPU i utilization" (%)}."""
        with self._lock:
            return list(self._points)

    def __len__(self) -> int:
        with self._lock:
            return len(self._points)


class Monitor:
    """Takes samples on demand (the page's live figures) and, once started, every `interval_s` seconds in a
    daemon thread into the history, so whoever opens the page sees the last minutes, including while nobody
    watched (say, the memory of a reply generated on the chat page)."""

    def __init__(self, nvml=None, interval_s: float = 2.0, history_s: float = 600.0):
        self.interval_s = interval_s
        self.history_s = history_s
        self.reader = NvmlReader(nvml)
        self.history = History(maxlen=max(1, round(history_s / interval_s)))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> Sample:
        return Sample(time.time(), host_memory(), process_memory(), self.reader.read(), cuda_allocator())

    def record(self) -> Sample:
        sample = self.sample()
        self.history.add(sample)
        return sample

    def start(self) -> Monitor:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="gpu-monitor", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.record()
            except Exception:  # a sampler that dies silently would freeze the chart: log and go on
                log.exception("GPU monitor sample failed")
            self._stop.wait(self.interval_s)
