"""One product where a layer makes several of the same input: query, key and value, and the MLP's gate and up.

A decode step of SmolLM2-135M made 210 INT4 products, 7 a layer; each is a call through the compiled graph's
wrapper, an OpenMP region and a rounding of the activations to int8, whatever its size. Fused, a layer makes 4:
the three attention inputs in one [q + k + v, hidden] product, the gate and up in one [2 x intermediate, hidden],
then split. Each output row is computed exactly as before (our kernel sums a tile of 8 rows the same way wherever
the tile sits), so replies do not change; `tests/test_fused.py` checks that the logits are equal.

Only where it is exactly the same function: the INT4 layers on our CPU kernel (`cpu_kernels.INT4_MM`), whose
packed rows and scales are stored by tiles of 8 rows, so that the parts concatenate when each has a multiple of 8
rows; the BF16 and FP32 layers on our dense product (`dense_linear.KernelLinear`), which sums every output row alike
wherever it sits; and the transformers classes whose forward is the one rewritten here (`ATTENTION`, `MLP`).
Other layers are left alone.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import nn

from . import cpu_kernels
from .dense_linear import KernelLinear
from .quant import TILE_ROWS, WeightOnlyInt4Linear

# transformers classes whose attention forward is LlamaAttention's line for line (glm4's: identical source; its
# own partial rotary is the `apply_rotary_pos_emb` of its module), and whose MLP is down(act(gate(x)) * up(x)).
ATTENTION = {"LlamaAttention", "Glm4Attention"}
MLP = {"LlamaMLP", "Qwen2MLP", "Qwen3MLP", "MistralMLP"}


def _fused_linear(parts: list[nn.Module]) -> nn.Module | None:
    """One layer holding `parts`' rows one after the other, or None where they cannot be joined exactly."""
    if all(type(p) is KernelLinear for p in parts):
        return _fused_dense(parts)
    if cpu_kernels.INT4_MM is None or not all(
        type(p) is WeightOnlyInt4Linear and p.weight.device.type == "cpu" for p in parts
    ):
        return None
    first = parts[0]
    same = all(p.in_features == first.in_features and p.group_size == first.group_size for p in parts)
    if not same or any(p.out_features % TILE_ROWS for p in parts) or len({p.bias is None for p in parts}) != 1:
        return None
    fused = WeightOnlyInt4Linear(
        first.in_features,
        sum(p.out_features for p in parts),
        first.bias is not None,
        first.dtype,
        "meta",
        first.group_size,
    )
    fused.weight = torch.cat([p.weight for p in parts])
    fused.scales_and_zeros = torch.cat([p.scales_and_zeros for p in parts])
    if first.bias is not None:
        fused.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
    return fused


def _fused_dense(parts: list[nn.Module]) -> KernelLinear | None:
    first = parts[0]
    same = all(p.in_features == first.in_features and p.weight.dtype == first.weight.dtype for p in parts)
    if not same or len({p.bias is None for p in parts}) != 1:
        return None
    fused = KernelLinear(first.in_features, 1, first.bias is not None, device="meta", dtype=first.weight.dtype)
    fused.out_features = sum(p.out_features for p in parts)
    fused.weight = nn.Parameter(torch.cat([p.weight for p in parts]), requires_grad=False)
    if first.bias is not None:
        fused.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
    return fused


class FusedQKVAttention(nn.Module):
    """LlamaAttention's forward with the query, key and value made by one product (`qkv`)."""

    def __init__(self, original: nn.Module, qkv: nn.Module):
        super().__init__()
        self.config, self.layer_idx = original.config, original.layer_idx
        self.head_dim, self.scaling = original.head_dim, original.scaling
        self.num_key_value_groups = original.num_key_value_groups
        self.attention_dropout, self.is_causal = original.attention_dropout, original.is_causal
        self.sizes = [original.q_proj.out_features, original.k_proj.out_features, original.v_proj.out_features]
        self.qkv, self.o_proj = qkv, original.o_proj
        self.rotary: Callable = sys.modules[type(original).__module__].apply_rotary_pos_emb
        self.eager_attention: Callable = sys.modules[type(original).__module__].eager_attention_forward
        self.train(original.training)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query, key, value = self.qkv(hidden_states).split(self.sizes, dim=-1)
        query_states = query.view(hidden_shape).transpose(1, 2)
        key_states = key.view(hidden_shape).transpose(1, 2)
        value_states = value.view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query_states, key_states = self.rotary(query_states, key_states, cos, sin)
        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, self.eager_attention
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class FusedGateUpMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with the gate and up made by one product (`gate_up`)."""

    def __init__(self, original: nn.Module, gate_up: nn.Module):
        super().__init__()
        self.intermediate = original.gate_proj.out_features
        self.gate_up, self.down_proj, self.act_fn = gate_up, original.down_proj, original.act_fn
        self.train(original.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split(self.intermediate, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


def fuse_projections(model: nn.Module) -> int:
    """Fuse every whitelisted attention's q/k/v and MLP's gate/up layers of `model` in place (on our CPU kernels
    only; see the module docstring). Returns the number of modules fused."""
    fused = 0
    for name, module in list(model.named_modules()):
        replacement: nn.Module | None = None
        kind = type(module).__name__
        if kind in ATTENTION:
            qkv = _fused_linear([module.q_proj, module.k_proj, module.v_proj])
            replacement = FusedQKVAttention(module, qkv) if qkv is not None else None
        elif kind in MLP:
            gate_up = _fused_linear([module.gate_proj, module.up_proj])
            replacement = FusedGateUpMLP(module, gate_up) if gate_up is not None else None
        if replacement is not None:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, replacement)
            fused += 1
    return fused
