"""Memory figures of this process and its host: the CUDA allocator on GPUs, the process's RSS, host memory;
freeing what the allocators keep cached; one way to write a byte count for people."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource
import sys
from dataclasses import dataclass

import psutil
import torch

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def format_bytes(count: int | float | None) -> str:
    """1536 * 2**20 -> '1.50 GiB', 300 * 2**20 -> '300 MiB' (about three significant digits); None -> 'n/a'."""
    if count is None:
        return "n/a"
    value, unit = float(count), 0
    while abs(value) >= 1024 and unit < len(_UNITS) - 1:
        value, unit = value / 1024, unit + 1
    if unit == 0:
        return f"{int(value)} B"
    decimals = 2 if abs(value) < 10 else 1 if abs(value) < 100 else 0
    return f"{value:,.{decimals}f} {_UNITS[unit]}"


def host_memory() -> dict:
    """The machine's memory: total, used (by processes, without the page cache) and available, in bytes."""
    memory = psutil.virtual_memory()
    return {"total": memory.total, "used": memory.used, "available": memory.available}


def free_memory_bytes(device: torch.device) -> int:
    """What a new allocation on `device` can still get: the GPU's free memory, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def process_memory() -> dict:
    """This process's resident memory now and at its peak (the kernel keeps the high-water mark)."""
    rss = psutil.Process().memory_info().rss
    return {"current": rss, "peak": max(_peak_rss(), rss)}


def _peak_rss() -> int:
    # Linux: VmHWM is this address space's own high-water mark (reset_peak can reset it). ru_maxrss is not: it
    # keeps the peak of the image before execve, i.e. of the forked copy of the parent, so a benchmark started by
    # a 3 GB portal process would report 3 GB.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


def device_memory(device: torch.device) -> dict:
    """{"source", "current", "peak"} in bytes for `device`."""
    if device.type == "cuda" and torch.cuda.is_available():
        return {
            "source": "CUDA allocator",
            "current": torch.cuda.memory_allocated(device),
            "peak": torch.cuda.max_memory_allocated(device),
            "reserved": torch.cuda.memory_reserved(device),
        }
    return {"source": "process RSS", **process_memory()}


def cuda_in_use() -> bool:
    """CUDA is there and this process has started using it (asking before that would create a context per GPU,
    hundreds of MiB each, just to report zeros)."""
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def cuda_allocator() -> list[dict]:
    """This process's PyTorch CUDA allocator per device: allocated (held by tensors), reserved (held by the
    allocator, including its cache) and peak allocated, in bytes. Empty when CUDA is not in use."""
    if not cuda_in_use():
        return []
    return [
        {
            "device": f"cuda:{index}",
            "allocated": torch.cuda.memory_allocated(index),
            "reserved": torch.cuda.memory_reserved(index),
            "peak_allocated": torch.cuda.max_memory_allocated(index),
        }
        for index in range(torch.cuda.device_count())
    ]


@dataclass
class MemoryInUse:
    rss: int  # this process's resident memory
    reserved: dict[str, int]  # CUDA allocator reserved bytes per device

    @classmethod
    def now(cls) -> MemoryInUse:
        return cls(process_memory()["current"], {a["device"]: a["reserved"] for a in cuda_allocator()})


@dataclass
class Freed:
    before: MemoryInUse
    after: MemoryInUse

    def describe(self) -> str:
        """'process RSS 1.20 GiB -> 1.10 GiB (100 MiB freed); cuda:0 reserved 3.00 GiB -> 2.00 GiB (...)'"""
        parts = [_change("process RSS", self.before.rss, self.after.rss)]
        parts += [
            _change(f"{device} reserved", before, self.after.reserved.get(device, 0))
            for device, before in self.before.reserved.items()
        ]
        return "; ".join(parts)


def _change(label: str, before: int, after: int) -> str:
    freed = before - after
    outcome = f"{format_bytes(freed)} freed" if freed > 0 else "nothing freed"
    return f"{label} {format_bytes(before)} → {format_bytes(after)} ({outcome})"


def free_cached_memory(before: MemoryInUse | None = None) -> Freed:
    """What the seeds' torch_gc did: collect garbage, then hand the CUDA allocator's cached blocks back to the
    driver (empty_cache) and release memory shared with other processes (ipc_collect); on glibc also hand
    the C heap's free pages back to the system, without which RSS rarely drops. Tensors still referenced stay."""
    before = before or MemoryInUse.now()
    gc.collect()
    if cuda_in_use():
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()
    trim_c_heap()
    return Freed(before, MemoryInUse.now())


def trim_c_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc keeps them otherwise, and RSS stays high)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (e.g. musl has no malloc_trim)
        pass


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def pin_mmap_threshold(size: int = 128 * 1024) -> None:
    """Keep glibc's mmap threshold at `size`: allocations from there up are mapped and unmapped on their own.
    Left dynamic, one freed temporary of several MiB (a kernel's timing, a dense block) raises it, and the float
    temporaries of quantizing while reading then land between the quantized weights on the heap: the INT4 load's
    peak varied from 0.77x to 1.33x the BF16 weights over runs, and stays at 0.74-0.76x pinned."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, size)
    except (OSError, AttributeError):  # not glibc
        pass


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Keys and values of one token over all layers (grouped/multi-query attention stores fewer heads; multi-head
    latent attention, GLM-4.7-Flash's, stores one compressed latent and one shared rotary key per token)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "kv_lora_rank", None):
        per_layer = text.kv_lora_rank + text.qk_rope_head_dim
        return text.num_hidden_layers * per_layer * torch.tensor([], dtype=dtype).element_size()
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * text.num_hidden_layers * heads * head_dim * torch.tensor([], dtype=dtype).element_size()


def reset_peak(device: torch.device) -> bool:
    """Start a new peak from the memory held now; False where the platform cannot (the peak then counts from
    the process start)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:  # Linux: "5" resets the resident-set high-water mark, VmHWM (see _peak_rss)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def held_peak(device: torch.device) -> int:
    """Peak since the last reset_peak of the memory the process holds on `device`: on CUDA what the caching
    allocator reserved (the context comes on top, see estimator.RUNTIME_OVERHEAD); elsewhere the process RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device)
    return process_memory()["peak"]
