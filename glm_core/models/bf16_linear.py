"""A BF16 model's linear layers on our BF16 product (`cpu_kernels.load_bf16`) for a decode step's few rows.

`use_bf16_kernel` turns each CPU `nn.Linear` holding a contiguous BFloat16 weight whose input width tiles by 32
into a `KernelBf16Linear`: the same module, the same parameters (a tied output layer keeps sharing the embedding's
table), whose forward gives up to `cpu_kernels.BF16_MAX_ROWS` activation rows to our op and more (a prompt) to
PyTorch's. Under torch.compile the row count is the traced shape's, so each batch bucket takes one path.

Our product sums each output in float and rounds it once to BFloat16, as PyTorch's does; the order of the float
additions differs, so a logit can differ in its last bit (`tests/test_bf16_kernel.py` bounds it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels


class KernelBf16Linear(nn.Linear):
    """nn.Linear whose products of up to `cpu_kernels.BF16_MAX_ROWS` rows go to our BF16 op."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if cpu_kernels.BF16_MM is None or rows > cpu_kernels.BF16_MAX_ROWS or x.dtype != torch.bfloat16:
            return F.linear(x, self.weight, self.bias)
        y = cpu_kernels.BF16_MM(x.reshape(rows, self.in_features), self.weight)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def takes_kernel(module: nn.Module) -> bool:
    """Whether `module` is a plain linear layer our BF16 op can multiply."""
    weight = getattr(module, "weight", None)
    return (
        type(module) in (nn.Linear, KernelBf16Linear)
        and isinstance(weight, torch.Tensor)
        and weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and weight.is_contiguous()
        and module.in_features % 32 == 0
    )


def use_bf16_kernel(model: nn.Module) -> int:
    """Turn every linear layer of `model` that our BF16 op can take into a `KernelBf16Linear`, in place, where
    `cpu_kernels.load_bf16` chose the op. Returns how many."""
    if cpu_kernels.BF16_MM is None:
        return 0
    turned = 0
    for module in model.modules():
        if type(module) is nn.Linear and takes_kernel(module):
            module.__class__ = KernelBf16Linear
            turned += 1
    return turned
