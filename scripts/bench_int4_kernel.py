"""Time one INT4 layer through our CPU kernel, PyTorch's int4 kernel and the dense path, at several row counts.

    .venv/bin/python scripts/bench_int4_kernel.py [--repeats 50] [--rows 1,4,16,64,127]

Per weight shape (in x out) and row count: the median microseconds of each, run alternated on the same random
weight (group size 32, BF16 activations as the model sends them), and ours against the better of the others.
"dense" is what a layer does from `quant.OUR_INT4_DENSE_MIN_ROWS` rows: dequantize the weight to the dense dtype
and multiply. Run it alone: another busy process on the same cores changes every figure.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from glm_core.models import cpu_kernels, quant
from glm_core.models.precision import cpu_flags

SHAPES = [(576, 576), (576, 1536), (1536, 576), (4096, 4096), (4096, 13696)]


def contenders(in_features: int, out_features: int, group_size: int, dense_dtype: torch.dtype):
    """A function of the activations giving, per contender, a call that multiplies them by one random weight."""
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0))
    q, scales_and_zeros = quant.quantize_int4(weight, group_size)
    ours_w, ours_so = quant.pack_int4_blocks(q, scales_and_zeros, torch.bfloat16)
    theirs_w = torch._convert_weight_to_int4pack_for_cpu(q, quant.int4_inner_k_tiles(in_features))
    theirs_sz = scales_and_zeros.to(torch.bfloat16)

    def runs(x: torch.Tensor) -> dict:
        return {
            "ours": lambda: cpu_kernels.INT4_MM(x, ours_w, ours_so, group_size),
            "pytorch": lambda: torch._weight_int4pack_mm_for_cpu(x, theirs_w, group_size, theirs_sz),
            "dense": lambda: F.linear(x.to(dense_dtype), quant.unpack_int4_blocks(ours_w, ours_so, dense_dtype)),
        }

    return runs


def median_us(runs: dict, repeats: int) -> list[float]:
    """The median microseconds of each call, the calls alternated, after one warm-up each."""
    times = cpu_kernels.alternated_times(runs, repeats)
    return [1e6 * statistics.median(times[name]) for name in runs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--rows", default="1,4,16,64,127")
    args = parser.parse_args()
    if not cpu_kernels.load_int4():
        raise SystemExit(f"our INT4 kernel is not used here: {cpu_kernels.INT4_REASON}")
    dense_dtype = quant.choose_dense_dtype()
    flags = sorted(cpu_flags() & {"avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_tile"})
    print(f"threads {torch.get_num_threads()}, flags {' '.join(flags)}, dense dtype {dense_dtype}")
    print(f"{'in x out':>12} {'rows':>5} {'ours us':>9} {'pytorch us':>11} {'dense us':>9} {'ours/best other':>16}")
    with torch.inference_mode():
        for in_features, out_features in SHAPES:
            runs = contenders(in_features, out_features, 32, dense_dtype)
            for rows in map(int, args.rows.split(",")):
                x = torch.randn(rows, in_features).to(torch.bfloat16)
                ours, pytorch, dense = median_us(runs(x), args.repeats)
                print(
                    f"{in_features:>5} x {out_features:<5} {rows:>4} {ours:>9.0f} {pytorch:>11.0f} {dense:>9.0f}"
                    f" {min(pytorch, dense) / ours:>15.2f}x"
                )


if __name__ == "__main__":
    main()
