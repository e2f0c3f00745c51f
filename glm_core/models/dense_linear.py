"""A BF16 or FP32 model's linear layers on our dense product (`cpu_kernels.load_dense`) for a decode step's rows.

`use_dense_kernel` turns each CPU `nn.Linear` holding a contiguous BFloat16 or float32 weight whose input width
tiles by 32 into a `KernelLinear`: the same module, the same parameters (a tied output layer keeps sharing the
embedding's table), whose forward gives up to the measured most rows (`cpu_kernels.dense_op`) to our op and more
(a prompt) to PyTorch's. Under torch.compile the row count is the traced shape's, so each batch bucket takes one
path.

Our product sums each output in float (BF16: and rounds it once), as PyTorch's does; the order of the float
additions differs, so a logit can differ in its last bits (`tests/test_dense_kernel.py` bounds it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels

DTYPES = (torch.bfloat16, torch.float32)


class KernelLinear(nn.Linear):
    """nn.Linear whose products of up to the measured most rows go to our dense op."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        op, most = cpu_kernels.dense_op(self.weight.dtype)
        if op is None or rows > most or x.dtype != self.weight.dtype:
            return F.linear(x, self.weight, self.bias)
        y = op(x.reshape(rows, self.in_features), self.weight)  # type: ignore[operator]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def takes_kernel(module: nn.Module) -> bool:
    """Whether `module` is a plain linear layer our dense op can multiply."""
    weight = getattr(module, "weight", None)
    return (
        type(module) in (nn.Linear, KernelLinear)
        and isinstance(weight, torch.Tensor)
        and weight.device.type == "cpu"
        and weight.dtype in DTYPES
        and weight.is_contiguous()
        and module.in_features % 32 == 0
    )


def use_dense_kernel(model: nn.Module) -> int:
    """Turn every linear layer of `model` that our dense op takes, where `cpu_kernels.load_dense` chose it for the
    layer's dtype, into a `KernelLinear`, in place. Returns how many."""
    turned = 0
    for module in model.modules():
        if type(module) is nn.Linear and takes_kernel(module) and cpu_kernels.dense_op(module.weight.dtype)[0]:
            module.__class__ = KernelLinear
            turned += 1
    return turned
