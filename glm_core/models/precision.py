"""Precision levels and devices: parsing user input and resolving "auto"."""

from __future__ import annotations

import functools
import statistics
import time
from enum import Enum

import torch


class Precision(str, Enum):  # noqa: UP042 - str() and format() of a StrEnum member differ
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"
    INT8 = "int8"
    INT4 = "int4"

    @property
    def label(self) -> str:
        return self.value.upper()

    @property
    def is_quantized(self) -> bool:
        return self in (Precision.INT8, Precision.INT4)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the unquantized tensors (for INT8/INT4: of activations, embeddings and norms)."""
        return {Precision.FP32: torch.float32, Precision.FP16: torch.float16}.get(self, torch.bfloat16)


_ALIASES = {
    "fp32": Precision.FP32,
    "float32": Precision.FP32,
    "float": Precision.FP32,
    "bf16": Precision.BF16,
    "bfloat16": Precision.BF16,
    "fp16": Precision.FP16,
    "float16": Precision.FP16,
    "half": Precision.FP16,
    "int8": Precision.INT8,
    "int4": Precision.INT4,
}


def parse_precision(text: str | Precision | None, device: torch.device) -> Precision:
    """Parse a user's precision name; "auto" (or None) picks the device's default (a CPU: see auto_cpu_precision,
    which the loader asks with the model's size)."""
    if isinstance(text, Precision):
        return text
    key = (text or "auto").strip().lower()
    if key == "auto":
        return Precision.FP16 if device.type == "mps" else Precision.BF16
    try:
        return _ALIASES[key]
    except KeyError:
        raise ValueError(f"unknown precision {text!r}; choose one of auto, fp32, bf16, fp16, int8, int4") from None


def resolve_device(name: str | None) -> torch.device:
    """Turn "auto"/"cpu"/"cuda"/"cuda:1"/"mps" into a device this machine really has, or explain why not."""
    key = (name or "auto").strip().lower()
    if key == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(key)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' asked for, but this PyTorch build sees no CUDA GPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {key!r} asked for, but only {torch.cuda.device_count()} CUDA GPU(s) exist")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' asked for, but Apple's Metal backend is not available here")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


# ---- "auto" on a CPU: BF16 only where the CPU computes it natively and it measures faster ----------------------

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo: AVX-512 BF16 dot products, AMX tiles


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.cache
def measured_bf16_speedup(width: int = 2048, repeats: int = 20, rows: int = 1, out_factor: int = 2) -> float:
    """FP32 time / BF16 time of one product [rows, width] x [width, out_factor * width] on this CPU (by default
    decode-shaped: one row), the median of `repeats` (above 1: BF16 is faster). About 50 ms, once per process
    and shape."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, width, generator=generator)
    w = torch.randn(out_factor * width, width, generator=generator)
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        xd, wd = x.to(dtype), w.to(dtype)
        torch.nn.functional.linear(xd, wd)  # warm-up
        samples = []
        for _ in range(repeats):
            started = time.perf_counter()
            torch.nn.functional.linear(xd, wd)
            samples.append(time.perf_counter() - started)
        times[dtype] = statistics.median(samples)
    return times[torch.float32] / times[torch.bfloat16]


def auto_cpu_precision(fp32_bytes: int, available_bytes: int, flags: set[str] | None = None, speedup=None):
    """What "auto" means on this CPU for a model of `fp32_bytes` at FP32, and why (the card shows it): BF16 where
    the CPU has native BF16 and BF16 measures faster; otherwise FP32, which such a CPU decodes faster (BF16 is
    converted in software there), unless FP32 would not fit in 60 % of the available memory."""
    flags = cpu_flags() if flags is None else flags
    native = [flag for flag in NATIVE_BF16_FLAGS if flag in flags]
    ratio = measured_bf16_speedup() if speedup is None else speedup
    if native and ratio > 1.0:
        return Precision.BF16, f"auto: BF16, native here ({', '.join(native)}), measured {ratio:.1f}x FP32's speed"
    why = "no native BF16 on this CPU" if not native else f"BF16 measured {ratio:.2f}x FP32's speed here"
    if fp32_bytes > 0.6 * available_bytes:
        return Precision.BF16, (
            f"auto: BF16 ({why}, but FP32 would take {fp32_bytes / 2**30:.1f} GiB of the "
            f"{available_bytes / 2**30:.1f} GiB available)"
        )
    return Precision.FP32, f"auto: FP32 ({why}: BF16 measured {ratio:.2f}x FP32's speed)"
