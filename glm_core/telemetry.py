"""Memory figures of the device a model runs on: the CUDA allocator on GPUs, the process on CPU."""

from __future__ import annotations

import resource
import sys

import psutil
import torch


def process_memory() -> dict:
    """This process's resident memory now and at its peak (the kernel keeps the high-water mark)."""
    rss = psutil.Process().memory_info().rss
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes
    return {"current": rss, "peak": max(peak, rss)}


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


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Keys and values of one token over all layers (grouped/multi-query attention stores fewer heads)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * text.num_hidden_layers * heads * head_dim * torch.tensor([], dtype=dtype).element_size()


def reset_peak(device: torch.device) -> bool:
    """Start a new peak from the memory held now; False where the platform cannot (the peak then counts from
    the process start)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:  # Linux: "5" resets the resident-set high-water mark that ru_maxrss reports
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


def cuda_context_bytes(device: torch.device) -> int | None:
    """Device memory this process holds outside the caching allocator (CUDA context, kernel images), as NVML
    sees it; None where NVML cannot tell (no driver library, no per-process accounting)."""
    try:
        import os

        import pynvml

        pynvml.nvmlInit()
        try:
            index = device.index if device.index is not None else torch.cuda.current_device()
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if p.pid == os.getpid() and p.usedGpuMemory is not None:
                    return max(p.usedGpuMemory - torch.cuda.memory_reserved(device), 0)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # NVML missing or failing: the caller reports the allocator alone
        return None
    return None
