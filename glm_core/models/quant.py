"""Weight-only INT8 and INT4 linear layers (one class per scheme, as gpt-fast), and the quantization policy.

Policy: every nn.Linear inside the decoder layers gets the level's scheme (INT4 layers whose input width the
kernel cannot tile stay in float). The token embedding and the output layer get INT8 per row at both levels (a
tied output layer keeps sharing the embedding's table). The norms stay in the activation dtype (BF16).

Kernels: PyTorch's fused weight-only matmuls, `_weight_int8pack_mm` (CPU, CUDA) and `_weight_int4pack_mm`
(CUDA) / `_weight_int4pack_mm_for_cpu` (CPU) with their packing twins; elsewhere (MPS) the weight is
dequantized inside forward. Quantization happens per layer as its float weight arrives, so a model never
exists in full precision (see `set_weight`).

Prefill on CPU: the fused kernels are built for one token; their time grows with the rows almost as if each row
were a separate call (4096 -> 13696 at one thread: INT8 3.9 ms for 1 row, 129 ms for 128; INT4 2.0 and 89 ms),
while dequantizing the weight and using the dense BF16 kernel costs a fixed ~5 ms (INT8: int8 -> bf16 is exact
and the per-row scale moves to the output) or ~65-80 ms (INT4: unpacking the CPU layout and applying per-group
scales) plus the dense product (37 ms for 128 rows). So from `INT8_DENSE_MIN_ROWS` (16) and `INT4_DENSE_MIN_ROWS`
(192) rows up a layer dequantizes `DENSE_BLOCK_BYTES` (16 MiB) of output rows at a time and multiplies them
densely (`dense_in_blocks`). That block is the only transient: 16 MiB of BF16 rows, plus for INT4 about 1.5 times
as much again in unpacked uint8 temporaries, whatever the layer's size; no float copy of a whole weight is kept or
made. Decoding (one row) always uses the fused kernels. Figures: docs/BENCHMARKS.md, "Prefill at INT8/INT4".

Those figures are from a CPU with native BF16. Where BF16's dense product is emulated (AVX2: 5x slower than
float32), the dense path multiplies in float32 instead (`choose_dense_dtype` measures which, once per process),
and INT8 keeps the fused kernel up to `INT8_DENSE_MIN_ROWS_FP32` rows. Our own INT4 CPU kernel (`cpu_kernels`,
int8 activations) goes dense from `OUR_INT4_DENSE_MIN_ROWS`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..settings import DEFAULT_GROUP_SIZE
from . import cpu_kernels
from .precision import Precision, measured_bf16_speedup


def int4_inner_k_tiles(in_features: int) -> int:
    """The CUDA int4 layout packs 16 * tiles input channels per tile (tiles 8, 4 or 2): the widest that fits."""
    return next(t for t in (8, 4, 2) if in_features % (16 * t) == 0)


ROW_CHUNK = 2048  # rows quantized at a time: float temporaries stay small even for a 65k x 4k output layer

# Many rows at once on CPU (a prompt's prefill): at and above these row counts the weight is dequantized block by
# block and multiplied with the dense kernel instead of the fused weight-only one (see the module docstring).
INT8_DENSE_MIN_ROWS = 16
INT4_DENSE_MIN_ROWS = 192
# Where the dense product runs in float32 (a CPU without native BF16, whose BF16 product is emulated: 5x slower
# than float32 on AVX2), PyTorch's int8 kernel stays faster far longer: on 576 -> 49,152 (the output layer) 14 ms
# at 16 rows against 56 ms dense, 57 against 81 ms at 64 (AVX2, 2 cores; docs/BENCHMARKS.md).
INT8_DENSE_MIN_ROWS_FP32 = 96
# The dtype of the dense product, measured once per process by `choose_dense_dtype` (a model load on the CPU
# calls it): BF16 where it multiplies faster than float32 (native BF16: AVX-512 BF16, AMX), else float32.
DENSE_DTYPE: torch.dtype | None = None
# Our INT4 kernel (cpu_kernels) takes 4 activation rows through each tile of 8 weight rows: 12 us a row on a
# 576 x 1536 layer and 190 us on 4096 x 4096 at every row count up to 512 (2 cores of an Intel Xeon with AVX-512;
# 8 us a row on 576 x 1536 with 2 AVX2 cores). Dequantizing to float32 and the dense product: 1.2 ms plus 11 us
# a row, 60 ms plus 75 us (AVX-512); 0.9 ms plus 13 us (AVX2). Level at about 500 and 1,000 rows where the dense
# product has AVX-512, never with AVX2: so a prompt's prefill (chunks of at most 512 rows) always takes the kernel.
OUR_INT4_DENSE_MIN_ROWS = 1024
# Our INT8 kernel (cpu_kernels.load_int8) on the 576 -> 49,152 output layer, 2 cores of a Zen 4 (AVX-512 VNNI and
# BF16), VNNI path: 0.9 ms at one row (PyTorch's 1.9), 1.3 ms at 4 rows (2.8), 4.7 ms at 16 rows (PyTorch's 11.6,
# dense 7.6), 16.2 ms at 64 (dense 16.0). It rounds the activations to int8 blocks of 32, as llama.cpp does: on
# 1,024 tokens, perplexity +0.1 % at INT4 and +0.3 % at INT8 with the output layer on it, +1 % at INT8 where every
# INT8 layer on it. So only the output layer takes it, from `cpu_kernels.INT8_MIN_ROWS` rows (1 where it measured
# faster at one row, else 2) up to 31: dense from 32 where the dense product is BF16 (else as PyTorch's).
OUR_INT8_DENSE_MIN_ROWS = 32
DENSE_BLOCK_BYTES = 16 * 2**20  # one block of dequantized rows, the dense path's transient


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: weight ~ q * scale[:, None]."""
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], ROW_CHUNK):
        w = weight[start : start + ROW_CHUNK].float()
        # One float temporary per chunk, reused in place: every extra one is a few MiB of heap that malloc keeps
        # (interleaved with the int8 rows allocated meanwhile) while a checkpoint is quantized as it is read.
        t = w.abs()
        s = (t.amax(dim=1) / 127.0).clamp(min=1e-10)
        torch.div(w, s[:, None], out=t)
        q[start : start + ROW_CHUNK] = t.round_().clamp_(-128, 127)
        scales[start : start + ROW_CHUNK] = s
    return q, scales


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise int4 as the int4 kernels expect: weight ~ (q - 8) * scale + zero per group.

    Returns q (int32 in 0..15, [out, in]) and scales_and_zeros ([in / group_size, out, 2], float32).
    """
    out_features, in_features = weight.shape
    q = torch.empty(weight.shape, dtype=torch.int32, device=weight.device)
    scales_and_zeros = torch.empty(in_features // group_size, out_features, 2, device=weight.device)
    for start in range(0, out_features, ROW_CHUNK):
        rows = slice(start, start + ROW_CHUNK)
        groups = weight[rows].float().reshape(-1, in_features // group_size, group_size)
        high, low = groups.amax(dim=-1, keepdim=True), groups.amin(dim=-1, keepdim=True)
        scales = ((high - low) / 15).clamp(min=1e-6)
        q[rows] = torch.round((groups - low) / scales).clamp(0, 15).reshape(-1, in_features)
        scales_and_zeros[:, rows, 0] = scales.squeeze(-1).transpose(0, 1)
        scales_and_zeros[:, rows, 1] = (low + scales * 8).squeeze(-1).transpose(0, 1)
    return q, scales_and_zeros


def dequantize_int4(
    q: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(q - 8) * scale + zero per group, computed in `dtype` (q: [out, in] values 0..15)."""
    out_features, in_features = q.shape
    scales, zeros = scales_and_zeros.to(dtype).transpose(0, 1).unbind(-1)  # [out, groups] each
    offsets = zeros - 8 * scales  # q * scale + (zero - 8 * scale): one pass over the weight fewer
    groups = q.to(dtype).reshape(out_features, in_features // group_size, group_size)
    return groups.mul_(scales[..., None]).add_(offsets[..., None]).reshape(out_features, in_features)


def unpack_int4_for_cpu(packed: torch.Tensor, in_features: int, block_rows: int | None = None) -> torch.Tensor:
    """q ([rows, in], uint8 0..15) back from `_convert_weight_to_int4pack_for_cpu`'s layout: per `block_rows`
    output rows, [in, block_rows / 2] bytes whose low nibble is row j and high nibble row j + block_rows / 2.
    The block is 64 rows where PyTorch's kernel uses AVX-512 and 32 where it uses AVX2; the layout is
    PyTorch-internal, so `cpu_int4_block_rows` finds it once against the packing function."""
    block_rows = block_rows or cpu_int4_block_rows()
    rows = packed.shape[0]
    blocks = packed.view(rows // block_rows, in_features, block_rows // 2)
    return torch.cat([blocks & 0x0F, blocks >> 4], dim=-1).transpose(1, 2).reshape(rows, in_features)


@functools.cache
def cpu_int4_block_rows() -> int | None:
    """Output rows per block of the CPU int4 packing on this machine, or None if the layout is not understood
    (INT4 prefill then stays on the fused kernel)."""
    q = torch.randint(0, 16, (128, 256), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    try:
        packed = torch._convert_weight_to_int4pack_for_cpu(q, 8)
    except (RuntimeError, AttributeError):
        return None
    for block_rows in (64, 32):
        if packed.shape == (128, 128) and torch.equal(unpack_int4_for_cpu(packed, 256, block_rows).int(), q):
            return block_rows
    return None


def choose_dense_dtype() -> torch.dtype:
    """Set `DENSE_DTYPE` once per process: BF16 where it multiplies [128, 1024] x [1024, 1024] faster than float32
    here (median of 5; about 0.3 s on AVX2), else float32."""
    global DENSE_DTYPE
    if DENSE_DTYPE is None:
        faster = measured_bf16_speedup(width=1024, repeats=5, rows=128, out_factor=1) > 1
        DENSE_DTYPE = torch.bfloat16 if faster else torch.float32
    return DENSE_DTYPE


def dense_in_blocks(x: torch.Tensor, out_features: int, dequantize_rows, row_multiple: int = 1) -> torch.Tensor:
    """x @ W.T with W dequantized `DENSE_BLOCK_BYTES` of output rows at a time: the dense kernel's speed on many
    rows, and a transient of one block, never a float copy of the whole weight.
    `dequantize_rows(start, stop)` returns rows start..stop of W in x's dtype; `row_multiple` aligns blocks."""
    block = max(row_multiple, DENSE_BLOCK_BYTES // (x.shape[1] * x.element_size()) // row_multiple * row_multiple)
    out = torch.empty(x.shape[0], out_features, dtype=x.dtype, device=x.device)
    for start in range(0, out_features, block):
        stop = min(start + block, out_features)
        out[:, start:stop] = F.linear(x, dequantize_rows(start, stop))
    return out


def int8_matmul(
    x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, int8_activations: bool = False
) -> torch.Tensor:
    """x @ W.T for W = int8 rows `weight` [out, in] times `scales` [out]: the fused kernel for few rows, the dense
    one block by block for many on CPU (see the module docstring). With `int8_activations` (the output layer) and
    our INT8 kernel chosen, from `cpu_kernels.INT8_MIN_ROWS` rows: ours, which rounds the activations to int8
    blocks."""
    dtype = (DENSE_DTYPE or x.dtype) if x.device.type == "cpu" else x.dtype
    ours = int8_activations and x.device.type == "cpu" and cpu_kernels.INT8_MM is not None and x.shape[1] % 32 == 0
    if dtype == torch.float32:
        min_rows = INT8_DENSE_MIN_ROWS_FP32
    else:
        min_rows = OUR_INT8_DENSE_MIN_ROWS if ours else INT8_DENSE_MIN_ROWS
    dense = x.device.type == "cpu" and x.shape[0] >= min_rows
    if ours and not dense and x.shape[0] >= cpu_kernels.INT8_MIN_ROWS:
        return cpu_kernels.int8_op(x.shape[0])(x, weight, scales)
    if x.device.type in ("cpu", "cuda") and not dense:
        return torch._weight_int8pack_mm(x, weight, scales)
    # int8 values are exact in BF16/FP16/FP32, and the per-row scale moves to the output, as the kernel applies it.
    return (dense_in_blocks(x.to(dtype), weight.shape[0], lambda a, b: weight[a:b].to(dtype)) * scales).to(x.dtype)


def pack_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed weight in the device's int4 kernel layout, scales) of a float [out, in] weight.

    On CPU the layout is our kernel's where it was chosen (`cpu_kernels.load_int4`: nibbles by blocks of 32 input
    channels, scales [out, groups, 2] as (scale, offset)), else PyTorch's; elsewhere scales_and_zeros is
    [groups, out, 2] as (scale, zero) in float32."""
    q, scales_and_zeros = quantize_int4(weight, group_size)
    in_features = weight.shape[1]
    if weight.device.type == "cpu":
        if cpu_kernels.load_int4():
            return pack_int4_blocks(q, scales_and_zeros, torch.float32)
        return torch._convert_weight_to_int4pack_for_cpu(q, int4_inner_k_tiles(in_features)), scales_and_zeros
    packed = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)
    if weight.device.type == "cuda":
        return torch._convert_weight_to_int4pack(packed, int4_inner_k_tiles(in_features)), scales_and_zeros
    return packed, scales_and_zeros  # no kernel: keep the nibbles two a byte and dequantize in forward


TILE_ROWS = 8  # output rows a tile of our CPU kernel's layout


def pack_int4_blocks(
    q: torch.Tensor, scales_and_zeros: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Our CPU kernel's layout (kernels/int4_cpu.cpp) of `quantize_int4`'s output: [out, in / 2] bytes and
    [out, groups, 2] scales and offsets in `dtype` (w = q * scale + offset), by tiles of `TILE_ROWS` rows whose
    nibbles interleave 4 input channels of each row, and whose scales hold the tile's 8 scales, then its 8
    offsets, per group. The last out % 8 rows are single rows: per block of 32 channels, byte j = channel j (low
    nibble) and 16 + j (high); (scale, offset) pairs."""
    out_features, in_features = q.shape
    full = out_features - out_features % TILE_ROWS
    scales, zeros = scales_and_zeros.unbind(-1)  # [groups, out] each
    pairs = torch.stack([scales, zeros - 8 * scales], dim=-1).transpose(0, 1).to(dtype)  # [out, groups, 2]
    # tile, row, block, half, chunk, channel -> tile, block, chunk, row, channel; low nibble the first half
    tiles = q[:full].reshape(full // TILE_ROWS, TILE_ROWS, in_features // 32, 2, 4, 4).to(torch.uint8)
    tiles = (tiles[:, :, :, 0] | (tiles[:, :, :, 1] << 4)).permute(0, 2, 3, 1, 4)
    halves = q[full:].reshape(out_features - full, in_features // 32, 2, 16).to(torch.uint8)
    singles = halves[:, :, 0] | (halves[:, :, 1] << 4)
    packed = torch.cat([tiles.reshape(full, in_features // 2), singles.reshape(out_features - full, in_features // 2)])
    groups = pairs.shape[1]
    tile_pairs = (
        pairs[:full].reshape(full // TILE_ROWS, TILE_ROWS, groups, 2).permute(0, 2, 3, 1).reshape(full, groups, 2)
    )
    return packed, torch.cat([tile_pairs, pairs[full:]]).contiguous()


def unpack_int4_blocks(packed: torch.Tensor, scales_offsets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float rows back from `pack_int4_blocks`' layout: rows [r, in / 2] and their [r, groups, 2] scales, cut
    at a tile's start (the last r % 8 rows are single rows)."""
    rows, groups = scales_offsets.shape[:2]
    full = rows - rows % TILE_ROWS
    in_features = 2 * packed.shape[1]
    tiles = packed[:full].reshape(full // TILE_ROWS, in_features // 32, 4, TILE_ROWS, 4)  # tile, block, chunk, row, ch.
    tiles = torch.stack([tiles & 0x0F, tiles >> 4], dim=2).permute(0, 4, 1, 2, 3, 5).reshape(full, in_features)
    blocks = packed[full:].reshape(rows - full, in_features // 32, 16)
    q = torch.cat([tiles, torch.cat([blocks & 0x0F, blocks >> 4], dim=-1).view(rows - full, in_features)])
    scales, offsets = scales_offsets_by_row(scales_offsets).to(dtype).unbind(-1)
    weight = q.to(dtype).view(rows, groups, in_features // groups)
    return weight.mul_(scales[..., None]).add_(offsets[..., None]).view(rows, in_features)


def scales_offsets_by_row(scales_offsets: torch.Tensor) -> torch.Tensor:
    """[rows, groups, 2] (scale, offset) per row, from `pack_int4_blocks`' tiled order (cut at a tile's start)."""
    rows, groups = scales_offsets.shape[:2]
    full = rows - rows % TILE_ROWS
    pairs = scales_offsets[:full].reshape(full // TILE_ROWS, groups, 2, TILE_ROWS).permute(0, 3, 1, 2)
    return torch.cat([pairs.reshape(full, groups, 2), scales_offsets[full:]])


def int4_matmul(
    x: torch.Tensor, weight: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, in_features: int
) -> torch.Tensor:
    """x @ W.T for W packed by `pack_int4`."""
    if x.device.type == "cpu" and cpu_kernels.INT4_MM is not None:  # our layout (see pack_int4)
        if x.shape[0] < OUR_INT4_DENSE_MIN_ROWS:
            return cpu_kernels.int4_op(x.shape[0])(x, weight, scales_and_zeros, group_size)
        dtype = DENSE_DTYPE or x.dtype  # float32 where BF16's dense kernel is emulated (5x slower on AVX2)

        def float_rows(start: int, stop: int) -> torch.Tensor:
            return unpack_int4_blocks(weight[start:stop], scales_and_zeros[start:stop], dtype)

        return dense_in_blocks(x.to(dtype), weight.shape[0], float_rows, TILE_ROWS).to(x.dtype)
    out_features = scales_and_zeros.shape[1]
    if x.device.type == "cpu":
        # Few rows (every decode step) never ask for the block layout: that probe is a cached Python call
        # which torch.compile cannot trace, and the compiled decode step must stay one graph.
        block_rows = None if x.shape[0] < INT4_DENSE_MIN_ROWS else cpu_int4_block_rows()
        if not block_rows or out_features % block_rows:
            return torch._weight_int4pack_mm_for_cpu(x, weight, group_size, scales_and_zeros)
        unpack, row_multiple = lambda rows: unpack_int4_for_cpu(rows, in_features, block_rows), block_rows
    elif x.device.type == "cuda":
        return torch._weight_int4pack_mm(x, weight, group_size, scales_and_zeros)
    else:  # no kernel: nibbles two a byte, even element high
        unpack, row_multiple = lambda rows: torch.stack([rows >> 4, rows & 0x0F], dim=-1).flatten(1), 1

    def dequantize_rows(start: int, stop: int) -> torch.Tensor:
        q = unpack(weight[start:stop])
        return dequantize_int4(q, scales_and_zeros[:, start:stop], group_size, x.dtype)

    return dense_in_blocks(x, out_features, dequantize_rows, row_multiple)


class _WeightOnlyLinear(nn.Module):
    """Shared shape/bias handling; subclasses hold the quantized weight and implement `_matmul`."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        y = self._matmul(x.reshape(-1, self.in_features).to(self.dtype))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape, self.out_features).to(x.dtype)

    @property
    def float_shape(self) -> tuple[int, int]:
        """Shape of the float weight that `set_weight` takes."""
        return self.out_features, self.in_features

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class _Int8Rows:
    """int8 rows with one scale per row: the storage of the int8 linear and of the int8 embedding."""

    def _register_int8_rows(self, rows: int, columns: int, dtype: torch.dtype, device) -> None:
        self.register_buffer("weight", torch.empty(rows, columns, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(rows, dtype=dtype, device=device))

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        q, scales = quantize_int8(weight)
        self.weight, self.scales = q, scales.to(self.dtype)


class WeightOnlyInt8Linear(_Int8Rows, _WeightOnlyLinear):
    int8_activations = False  # the output layer's: our INT8 kernel where chosen (see int8_matmul)

    def __init__(self, in_features, out_features, bias, dtype, device=None):
        super().__init__(in_features, out_features, bias, dtype, device)
        self._register_int8_rows(out_features, in_features, dtype, device)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return int8_matmul(x, self.weight, self.scales, self.int8_activations)


class WeightOnlyInt4Linear(_WeightOnlyLinear):
    def __init__(self, in_features, out_features, bias, dtype, device=None, group_size: int = DEFAULT_GROUP_SIZE):
        super().__init__(in_features, out_features, bias, dtype, device)
        self.group_size = group_size
        # Two values a byte in every layout (the packed CPU and CUDA layouts too): its shape gives the bytes.
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer(
            "scales_and_zeros", torch.empty(in_features // group_size, out_features, 2, dtype=dtype, device=device)
        )

    @staticmethod
    def supports(in_features: int, group_size: int) -> bool:
        return in_features % group_size == 0 and in_features % 32 == 0

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        self.weight, scales_and_zeros = pack_int4(weight, self.group_size)
        self.scales_and_zeros = scales_and_zeros.to(self.dtype)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return int4_matmul(x, self.weight, self.scales_and_zeros, self.group_size, self.in_features)


def _replacement(linear: nn.Linear, precision: Precision, dtype, group_size: int, device):
    if precision is Precision.INT8:
        return WeightOnlyInt8Linear(linear.in_features, linear.out_features, linear.bias is not None, dtype, device)
    if WeightOnlyInt4Linear.supports(linear.in_features, group_size):
        return WeightOnlyInt4Linear(
            linear.in_features, linear.out_features, linear.bias is not None, dtype, device, group_size
        )
    return None  # INT4 layer shapes the kernel cannot tile stay in float (documented policy)


class WeightOnlyInt8Embedding(_Int8Rows, nn.Module):
    """Token embedding as int8 rows with one scale per row; a lookup dequantizes only the rows it reads.
    A tied output layer reads the same table through a WeightOnlyInt8Linear (see `tie_output_layer`)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype, device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.dtype = num_embeddings, embedding_dim, dtype
        self._register_int8_rows(num_embeddings, embedding_dim, dtype, device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).to(self.dtype) * self.scales[ids].unsqueeze(-1)

    @property
    def float_shape(self) -> tuple[int, int]:
        return self.num_embeddings, self.embedding_dim

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class _ExpertStack(nn.Module):
    """One fused expert tensor ([experts, out, in], e.g. transformers' `gate_up_proj` or `down_proj`) as one
    weight-only matrix per expert, packed side by side; `matmul(x, e)` is expert e's x @ W_e.T."""

    def __init__(self, experts: int, out_features: int, in_features: int, dtype: torch.dtype):
        super().__init__()
        self.experts, self.out_features, self.in_features, self.dtype = experts, out_features, in_features, dtype

    @property
    def float_shape(self) -> tuple[int, int, int]:
        return self.experts, self.out_features, self.in_features

    def extra_repr(self) -> str:
        return f"experts={self.experts}, in_features={self.in_features}, out_features={self.out_features}"


class Int8ExpertStack(_ExpertStack):
    def __init__(self, experts, out_features, in_features, dtype, device=None):
        super().__init__(experts, out_features, in_features, dtype)
        self.register_buffer("weight", torch.empty(experts, out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(experts, out_features, dtype=dtype, device=device))

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
        scales = torch.empty(weight.shape[:2], dtype=self.dtype, device=weight.device)
        for e in range(self.experts):  # one expert's float temporaries at a time
            q[e], s = quantize_int8(weight[e])
            scales[e] = s.to(self.dtype)
        self.weight, self.scales = q, scales

    @torch.no_grad()
    def set_expert(self, expert: int, weight: torch.Tensor) -> None:
        """One expert's float [out, in] weight, as a checkpoint stores it (one tensor per expert)."""
        if self.weight.is_meta:
            self.weight = torch.empty(self.float_shape, dtype=torch.int8, device=weight.device)
            self.scales = torch.empty(self.float_shape[:2], dtype=self.dtype, device=weight.device)
        q, scales = quantize_int8(weight)
        self.weight[expert], self.scales[expert] = q, scales.to(self.dtype)

    def matmul(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        return int8_matmul(x, self.weight[expert], self.scales[expert])


class Int4ExpertStack(_ExpertStack):
    def __init__(self, experts, out_features, in_features, dtype, device=None, group_size: int = DEFAULT_GROUP_SIZE):
        super().__init__(experts, out_features, in_features, dtype)
        self.group_size = group_size
        self.register_buffer(
            "weight", torch.empty(experts, out_features, in_features // 2, dtype=torch.uint8, device=device)
        )
        self.register_buffer(
            "scales_and_zeros",
            torch.empty(experts, in_features // group_size, out_features, 2, dtype=dtype, device=device),
        )

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        packed = scales_and_zeros = None
        for e in range(self.experts):
            w, sz = pack_int4(weight[e], self.group_size)
            if packed is None:  # the packed layout's shape depends on the device: known after the first expert
                packed = torch.empty((self.experts, *w.shape), dtype=w.dtype, device=w.device)
                scales_and_zeros = torch.empty((self.experts, *sz.shape), dtype=self.dtype, device=w.device)
            packed[e], scales_and_zeros[e] = w, sz.to(self.dtype)
        self.weight, self.scales_and_zeros = packed, scales_and_zeros

    @torch.no_grad()
    def set_expert(self, expert: int, weight: torch.Tensor) -> None:
        """One expert's float [out, in] weight, as a checkpoint stores it (one tensor per expert)."""
        w, sz = pack_int4(weight, self.group_size)
        if self.weight.is_meta:  # the packed layout's shape depends on the device: known from the first expert
            self.weight = torch.empty((self.experts, *w.shape), dtype=w.dtype, device=w.device)
            self.scales_and_zeros = torch.empty((self.experts, *sz.shape), dtype=self.dtype, device=w.device)
        self.weight[expert], self.scales_and_zeros[expert] = w, sz.to(self.dtype)

    def matmul(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        return int4_matmul(x, self.weight[expert], self.scales_and_zeros[expert], self.group_size, self.in_features)


def _expert_stack(experts: int, out_features: int, in_features: int, precision: Precision, dtype, group_size, device):
    """INT4 where the kernel can tile the input width, else INT8: the experts are most of a MoE model's weights,
    so unlike a dense layer they never stay in float."""
    if precision is Precision.INT4 and WeightOnlyInt4Linear.supports(in_features, group_size):
        return Int4ExpertStack(experts, out_features, in_features, dtype, device, group_size)
    return Int8ExpertStack(experts, out_features, in_features, dtype, device)


def is_fused_experts(module: nn.Module) -> bool:
    """transformers' fused routed experts (GLM-4.5's Glm4MoeExperts, GLM-4.7-Flash's, Qwen3-MoE's ...): 3-D
    `gate_up_proj` [experts, 2 * intermediate, hidden] and `down_proj` [experts, hidden, intermediate], gate and up
    concatenated, not transposed, without biases."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (
        isinstance(gate_up, torch.Tensor)
        and isinstance(down, torch.Tensor)
        and gate_up.dim() == 3
        and down.dim() == 3
        and getattr(module, "is_concatenated", True)
        and not getattr(module, "is_transposed", False)
        and not getattr(module, "has_bias", False)
        and getattr(module, "has_gate", True)
    )


class WeightOnlyExperts(nn.Module):
    """The routed experts of a MoE layer with weight-only INT8/INT4 matrices per expert. Forward takes what
    transformers' experts take (the tokens' hidden states, each token's top-k expert ids and weights) and runs,
    for each expert some token chose, its two products on those tokens only, as transformers' eager loop does."""

    def __init__(self, experts: int, hidden: int, intermediate: int, act_fn, precision, dtype, group_size, device=None):
        super().__init__()
        self.num_experts, self.hidden_dim, self.intermediate_dim, self.dtype = experts, hidden, intermediate, dtype
        self.act_fn = act_fn
        self.gate_up_proj = _expert_stack(experts, 2 * intermediate, hidden, precision, dtype, group_size, device)
        self.down_proj = _expert_stack(experts, hidden, intermediate, precision, dtype, group_size, device)

    @property
    def float_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"gate_up_proj": self.gate_up_proj.float_shape, "down_proj": self.down_proj.float_shape}

    def set_tensor(self, name: str, value: torch.Tensor) -> None:
        getattr(self, name).set_weight(value)

    def set_expert(self, name: str, expert: int, value: torch.Tensor) -> None:
        """One expert's slice of `name` ([2I, H] gate and up concatenated, or [H, I] down), quantized now."""
        getattr(self, name).set_expert(expert, value)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        x = hidden_states.to(self.dtype)
        top_k = top_k_index.shape[-1]
        chosen = top_k_index.reshape(-1)
        order = torch.argsort(chosen, stable=True)  # (token, slot) pairs grouped by expert
        counts = torch.bincount(chosen, minlength=self.num_experts).tolist()
        tokens, weights = order // top_k, top_k_weights.reshape(-1)[order]
        start = 0
        for expert, count in enumerate(counts):
            if not count:
                continue
            rows, row_weights = tokens[start : start + count], weights[start : start + count]
            start += count
            gate, up = self.gate_up_proj.matmul(x[rows], expert).chunk(2, dim=-1)
            h = self.down_proj.matmul(self.act_fn(gate) * up, expert) * row_weights[:, None]
            out.index_add_(0, rows, h.to(out.dtype))
        return out

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}"


def quantized_tensor_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """{checkpoint tensor name within the module: its float shape} for a quantized module of the policy."""
    if isinstance(module, WeightOnlyExperts):
        return module.float_shapes
    return {"weight": module.float_shape}


def set_quantized_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Quantize a float checkpoint tensor into the module's quantized storage."""
    if isinstance(module, WeightOnlyExperts):
        module.set_tensor(name, value)
    else:
        module.set_weight(value)


def _policy(model: nn.Module, precision: Precision, dtype, group_size: int, device=None):
    """(module name, empty quantized replacement) for every module the policy quantizes.

    Decoder-layer linears get the level's scheme, and so do a MoE layer's fused routed experts (one packed matrix
    per expert; INT8 where INT4 cannot tile them, never float: they hold most of the weights). The token embedding and the output layer get INT8 per row at
    both levels: they are a large share of a small model (a fifth of SmolLM2-135M, 0.53 B of ChatGLM2-6B's 6.2 B),
    the output layer is read in full for every token, and int8 rows keep them accurate. A tied output layer
    keeps sharing the embedding's (now int8) table. The norms stay in the activation dtype.
    """
    embedding, head = _embedding_and_output_layer(model)
    for name, module in list(model.named_modules()):
        if is_fused_experts(module) and ".layers." in f".{name}":
            experts, double_intermediate, hidden = module.gate_up_proj.shape
            yield (
                name,
                WeightOnlyExperts(
                    experts, hidden, double_intermediate // 2, module.act_fn, precision, dtype, group_size, device
                ),
            )
        elif module is embedding and isinstance(module, nn.Embedding):
            yield name, WeightOnlyInt8Embedding(module.num_embeddings, module.embedding_dim, dtype, device)
        elif not isinstance(module, nn.Linear):
            continue
        elif ".layers." in f".{name}":
            replacement = _replacement(module, precision, dtype, group_size, device)
            if replacement is not None:
                yield name, replacement
        elif module is head and not (embedding is not None and module.weight is embedding.weight):
            yield name, _output_layer(_replacement(module, Precision.INT8, dtype, group_size, device))


def _embedding_and_output_layer(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """The token embedding and the output layer, whatever a model calls them (GPT-NeoX: embed_in, embed_out)."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if hasattr(model, "get_output_embeddings"):
        return embedding, model.get_output_embeddings()
    return embedding, getattr(model, "lm_head", None)


def _install(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _output_layer(head: WeightOnlyInt8Linear) -> WeightOnlyInt8Linear:
    head.int8_activations = True  # our INT8 kernel where chosen (see int8_matmul)
    return head


def tie_output_layer(model: nn.Module, embedding: WeightOnlyInt8Embedding, dtype) -> None:
    """Make the output layer read the int8 embedding's table (call it once the table is final: `set_weight`
    replaces the tensors, which would undo the sharing)."""
    head = _output_layer(WeightOnlyInt8Linear(embedding.embedding_dim, embedding.num_embeddings, False, dtype, "meta"))
    head.weight, head.scales = embedding.weight, embedding.scales  # the same tensors, no copy
    if hasattr(model, "set_output_embeddings"):  # transformers models: whatever their output layer is called
        model.set_output_embeddings(head)
    else:
        model.lm_head = head


def swap_in_quantized_linears(
    model: nn.Module, precision: Precision, dtype: torch.dtype, group_size: int = DEFAULT_GROUP_SIZE
) -> dict[str, nn.Module]:
    """Replace the policy's modules by empty quantized ones (on the meta device, before loading; a tied output
    layer is left alone and tied to the int8 embedding after loading, see `tie_output_layer`).

    Returns {module name: quantized module}; their float weights are given later through `set_weight`.
    """
    swapped = dict(_policy(model, precision, dtype, group_size, device="meta"))
    for name, module in swapped.items():
        _install(model, name, module)
    return swapped


@torch.no_grad()
def quantize_loaded_model(model: nn.Module, precision: Precision, dtype: torch.dtype, group_size: int) -> int:
    """Quantize an already-loaded float model module by module (each float weight is freed as soon as its
    quantized twin replaces it). Returns the number of modules quantized."""
    embedding, head = _embedding_and_output_layer(model)
    tied = embedding is not None and head is not None and head.weight is embedding.weight
    count = 0
    for name, replacement in _policy(model, precision, dtype, group_size):
        original = model.get_submodule(name)
        if isinstance(replacement, WeightOnlyExperts):
            replacement = replacement.to_empty(device=original.gate_up_proj.device)
            for tensor_name in replacement.float_shapes:
                replacement.set_tensor(tensor_name, getattr(original, tensor_name))
                setattr(original, tensor_name, None)  # the float experts go as their quantized twins arrive
            _install(model, name, replacement)
            count += 1
            continue
        replacement = replacement.to_empty(device=original.weight.device)
        replacement.set_weight(original.weight)
        if getattr(original, "bias", None) is not None:
            replacement.bias.copy_(original.bias)
        _install(model, name, replacement)
        if tied and isinstance(replacement, WeightOnlyInt8Embedding):
            tie_output_layer(model, replacement, dtype)
        count += 1
    return count


def weight_bytes(model: nn.Module, include_meta: bool = False) -> dict:
    """Bytes of the weights, split into quantized layers and everything kept in float. With `include_meta`,
    tensors on the meta device count too: the estimator sizes a model that holds no memory."""
    quantized = other = 0
    seen = set()
    for module in model.modules():
        # Persistent buffers are checkpoint tensors too (GLM-4.5's router bias e_score_correction_bias); computed
        # ones (rotary frequencies) are not weights.
        stored = [
            b for name, b in module._buffers.items() if b is not None and name not in module._non_persistent_buffers_set
        ]
        for t in list(module.parameters(recurse=False)) + stored:
            if id(t) in seen or (t.device.type == "meta" and not include_meta):
                continue
            seen.add(id(t))
            size = t.numel() * t.element_size()
            if isinstance(module, (_WeightOnlyLinear, WeightOnlyInt8Embedding, _ExpertStack)):
                quantized += size
            else:
                other += size
    return {"quantized": quantized, "float": other, "total": quantized + other}


def parameter_counts(model: nn.Module, experts_per_token: int = 0) -> dict:
    """{"total", "active"} parameters of the model as its float checkpoint counts them (a quantized module counts
    its float shape, a tied table once); "active" counts only `experts_per_token` of each MoE layer's routed
    experts, what one token's forward reads (GLM-4.5-Air: 106 B total, 12 B active)."""
    total = expert_total = expert_active = 0
    seen = set()
    for module in model.modules():
        if isinstance(module, WeightOnlyExperts) or is_fused_experts(module):
            experts = module.num_experts
            count = sum(_numel(getattr(module, name)) for name in ("gate_up_proj", "down_proj"))
            expert_total += count
            expert_active += count * min(experts_per_token or experts, experts) // experts
            continue
        if isinstance(module, _ExpertStack):
            continue  # counted with its WeightOnlyExperts
        if isinstance(module, (_WeightOnlyLinear, WeightOnlyInt8Embedding)):
            if id(module.weight) not in seen:
                seen.add(id(module.weight))
                total += _numel(module)
            if getattr(module, "bias", None) is not None:
                total += module.bias.numel()
            continue
        for parameter in module.parameters(recurse=False):
            if id(parameter) not in seen:
                seen.add(id(parameter))
                total += parameter.numel()
    return {"total": total + expert_total, "active": total + expert_active}


def _numel(tensor_or_module) -> int:
    shape = getattr(tensor_or_module, "float_shape", None) or tuple(tensor_or_module.shape)
    count = 1
    for n in shape:
        count *= n
    return count


def experts_per_token(config) -> int:
    """Routed experts each token uses in a MoE config (0 for a dense model)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text, "num_experts_per_tok", None)
    return value if isinstance(value, int) and value > 0 else 0
