"""Time one decode step's worth of dense products (SmolLM2-135M's: 30 layers of q, k, v, o, gate, up and down, and
the 49,152-row output layer; 211 weights, 270 MB at BF16) through PyTorch's product and each of our dense paths,
the weights read from memory as a step reads them, at several row counts.

    .venv/bin/python scripts/bench_dense_products.py [--dtypes bf16,fp32] [--rows 1,4,16] [--repeats 5]

Per dtype and row count: the median milliseconds of the whole step through each, run alternated, the bandwidth
that is (weight bytes over time), and each of ours against PyTorch's. The memory's read rate, a 2-thread
`torch.sum` over the same weights, is printed first as the roof. Run it alone: another busy process on the same
cores changes every figure, and so does another tenant of the machine's memory.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from glm_core.models import cpu_kernels
from glm_core.models.precision import cpu_flags

LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # (out, in)
HEAD = (49152, 576)


def weights(dtype: torch.dtype) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shapes = LAYER * 30 + [HEAD]
    return [torch.randn(*shape, generator=generator).to(dtype) for shape in shapes]


def step(product, ws: list[torch.Tensor], inputs: dict[int, torch.Tensor]) -> None:
    for w in ws:
        product(inputs[w.shape[1]], w)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--rows", default="1,4,16")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    library = cpu_kernels.built_library()
    if isinstance(library, str):
        raise SystemExit(f"our kernels cannot run here: {library}")
    flags = ", ".join(sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma", "f16c"))))
    print(f"CPU flags: {flags}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.dtypes.split(","):
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[name]
        ws = weights(dtype)
        total = sum(w.numel() * w.element_size() for w in ws)
        paths = {"pytorch": F.linear}
        if dtype == torch.float32:
            paths["ours avx2"] = library.f32_mm
        else:
            paths["ours avx2"] = library.bf16_mm
            if library.avx512_bf16_supported():
                paths["ours avx512-bf16"] = library.bf16_mm_avx512
        with torch.inference_mode():
            sums = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                for w in ws:
                    w.sum()
                sums.append(time.perf_counter() - started)
            roof = total / statistics.median(sums) / 1e9
            print(f"\n{name}: {len(ws)} weights, {total / 1e6:.0f} MB; memory read (torch.sum) {roof:.1f} GB/s")
            for rows in map(int, args.rows.split(",")):
                inputs = {k: torch.randn(rows, k).to(dtype) for k in {w.shape[1] for w in ws}}
                times: dict[str, list[float]] = {path: [] for path in paths}
                for product in paths.values():  # warm-up
                    step(product, ws, inputs)
                for _ in range(args.repeats):
                    for path, product in paths.items():
                        started = time.perf_counter()
                        step(product, ws, inputs)
                        times[path].append(time.perf_counter() - started)
                base = statistics.median(times["pytorch"])
                for path, taken in times.items():
                    ms = statistics.median(taken)
                    print(
                        f"  {rows:>3} rows  {path:<17} {1e3 * ms:7.1f} ms  {total / ms / 1e9:5.1f} GB/s  "
                        f"{base / ms:5.2f}x PyTorch's"
                    )


if __name__ == "__main__":
    main()
