"""Precision levels and devices: parsing user input and resolving "auto"."""

from __future__ import annotations

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
    """Parse a user's precision name; "auto" (or None) picks the best default for the device."""
    if isinstance(text, Precision):
        return text
    key = (text or "auto").strip().lower()
    if key == "auto":
        # bf16 halves memory and, on current CPUs, runs about twice as fast as fp32 for one token.
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
