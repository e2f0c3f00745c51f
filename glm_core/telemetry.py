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
