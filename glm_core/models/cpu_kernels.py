"""Our own CPU kernels for decoding, INT4 and INT8 products and attention, built on first use and kept only where
they measure faster.

PyTorch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`) turns every weight into a float and multiplies in
float: at one row (a decode step) that is bound by the core, not by memory. `kernels/int4_cpu.cpp` quantizes the
activations to int8 blocks of 32 and multiplies them with the nibbles by integer dot products (AVX2's maddubs),
as llama.cpp's CPU kernels do. Its weight layout interleaves tiles of 8 output rows so that one vector holds 4
input channels of each, and 4 activation rows go through a tile together: each 32-bit lane sums one output row,
with no horizontal sums, and a prompt's rows share each unpacked weight byte. It needs AVX2 and FMA, a C++
compiler (the one inductor uses) and PyTorch's headers, all of which the compiled decode path needs already.

The choice is made once per process, by measurement (`load_int4`): the kernel is built (g++, about 10 s; the
library is kept under GLM_CACHE_DIR/kernels and reused), then timed against PyTorch's kernel at one row on a
1024 x 1024 weight, on one thread (see `_time_against_pytorch`); it is used only when faster.
GLM_CPU_KERNELS=off keeps PyTorch's kernel. The weight layout follows the choice (see
`glm_core.models.quant.pack_int4`), so a process never mixes the two. Where the CPU has AVX-512 VNNI, the
kernel's VNNI path (one `dpbusd` for each maddubs/add pair, the same integers and then the same float operations:
the same bits) is timed against the AVX2 path at 1, 4 and 16 rows (`_choose_vnni`) and takes the row counts where
it was faster (`int4_op`).

`kernels/int8_cpu.cpp` does the same for an int8 weight kept as stored (a tied output layer shares it with the
embedding): int8 activation blocks times the weight rows by integer dot products. `load_int8` times it against
PyTorch's int8 kernel at 4 rows, then at one row; `quant.int8_matmul` gives it only the INT8 output layer, from
`INT8_MIN_ROWS` rows.

`kernels/dense_cpu.cpp` multiplies a decode step's few activation rows by a BFloat16 or float32 weight kept as
stored: PyTorch's product at one row read a BF16 weight at 8-16 GB/s here, in the cache or not. `load_dense`
chooses its AVX-512 BF16 path (`dpbf16ps`) or its AVX2 one (each weight widened to float) for BF16, its AVX2 path
for FP32, then times it against PyTorch's product at `DENSE_ROWS_TIMED` rows; `models.dense_linear` gives it the
model's linear layers up to the most rows where it was faster (`dense_op`).

The same library holds the decode attention (`kernels/decode_attention_cpu.cpp`: one query a row, each key and
value row read once for the query heads that share it, the masked positions skipped). `load_attention` times it
against PyTorch's SDPA on one decode step of one layer, once per process, and the model's attention
(`engine.fast_decode.grouped_decode_attention`) uses it only when faster.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .openmp import one_thread_here
from .precision import cpu_flags

log = logging.getLogger(__name__)

KERNELS = Path(__file__).with_name("kernels")
SOURCES = [
    KERNELS / "int4_cpu.cpp",
    KERNELS / "int8_cpu.cpp",
    KERNELS / "decode_attention_cpu.cpp",
    KERNELS / "dense_cpu.cpp",
]  # one library, with KERNELS/*.h
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=c++20"]

# The decisions, made by `load_int4` and `load_int8`: the op (or None: PyTorch's kernel) and why. Module globals
# rather than a cached function, so that a compiled decode step reads them without a call it cannot trace.
INT4_MM = None
INT4_REASON = "not chosen yet"
_chosen = False
INT8_MM = None
INT8_REASON = "not chosen yet"
_int8_chosen = False
# Each kernel's AVX-512 VNNI path (the same layout, the same sums), where the CPU has it and it measured faster
# than the AVX2 path: used from *_VNNI_ROWS activation rows on (`int4_op`, `int8_op`).
INT4_MM_VNNI = None
INT4_VNNI_ROWS = 0
INT8_MM_VNNI = None
INT8_VNNI_ROWS = 0
VNNI_ROWS_TIMED = (1, 4, 16)
# The fewest rows the INT8 output layer gives our kernel (`quant.int8_matmul`): 1 where ours (its chosen path)
# measured faster than PyTorch's at one row too, else 2 (PyTorch's kernel keeps a lone conversation's step).
INT8_MIN_ROWS = 2


def load_int4() -> bool:
    """Build, load and time the INT4 kernel once per process; True when it is used (`INT4_MM` is set)."""
    global INT4_MM, INT4_REASON, _chosen, INT4_MM_VNNI, INT4_VNNI_ROWS
    if not _chosen:
        _chosen = True
        weight = functools.cache(_int4_case)  # made (quantized) once, and only where our kernel was built
        INT4_MM, INT4_REASON = _choose(
            "INT4",
            "PyTorch's int4 kernel",
            "int8-activation int4 kernel",
            lambda library: library.int4_mm.default,
            lambda op: _time_against_pytorch(op, weight()),
            "one row, 1024 x 1024, one thread: ours {:.0f} us, PyTorch's {:.0f} us",
        )
        if INT4_MM is not None:
            INT4_MM_VNNI, INT4_VNNI_ROWS, why = _choose_vnni("INT4", INT4_MM, "int4_mm_vnni", weight())
            INT4_REASON += f"; {why}"
    return INT4_MM is not None


def load_int8(weight: torch.Tensor, scales: torch.Tensor) -> bool:
    """The same for the INT8 kernel (`INT8_MM`), which only the INT8 output layer takes (see `quant.int8_matmul`),
    timed on that layer itself (`weight`, `scales`: the first model's of this process): at 4 rows against PyTorch's,
    then its VNNI path, then (with the path chosen) at one row, for `INT8_MIN_ROWS`. A large output layer is read
    from memory, a small stand-in from the cache, and the paths ranked otherwise on the two."""
    global INT8_MM, INT8_REASON, _int8_chosen, INT8_MM_VNNI, INT8_VNNI_ROWS, INT8_MIN_ROWS
    if not _int8_chosen:
        _int8_chosen = True
        rows, columns = weight.shape

        def case(count: int) -> tuple:
            return torch.randn(count, columns, dtype=torch.bfloat16), weight, scales

        def against_pytorch(op, count: int = 4) -> tuple[float, float]:
            return _time_paths(op, torch._weight_int8pack_mm, case(count), 7)

        INT8_MM, INT8_REASON = _choose(
            "INT8",
            "PyTorch's int8 kernel",
            "int8-activation int8 kernel",
            lambda library: library.int8_mm.default,
            against_pytorch,
            f"4 rows, {rows} x {columns}, one thread: ours {{:.0f}} us, PyTorch's {{:.0f}} us",
        )
        if INT8_MM is not None:
            INT8_MM_VNNI, INT8_VNNI_ROWS, why = _choose_vnni("INT8", INT8_MM, "int8_mm_vnni", case, repeats=7)
            ours, theirs = against_pytorch(int8_op(1), 1)
            INT8_MIN_ROWS = 1 if ours < theirs else 2
            INT8_REASON += (
                f"; {why}; from {INT8_MIN_ROWS} rows (one row: ours {ours:.0f} us, PyTorch's {theirs:.0f} us)"
            )
    return INT8_MM is not None


def int4_op(rows: int):
    """Our INT4 op for `rows` activation rows: the VNNI path from INT4_VNNI_ROWS rows where chosen, else the AVX2
    path (None where PyTorch's kernel was chosen)."""
    if INT4_MM is not None and INT4_MM_VNNI is not None and rows >= INT4_VNNI_ROWS:
        return INT4_MM_VNNI
    return INT4_MM


def int8_op(rows: int):
    """The same for INT8 (None: PyTorch's kernel)."""
    if INT8_MM is not None and INT8_MM_VNNI is not None and rows >= INT8_VNNI_ROWS:
        return INT8_MM_VNNI
    return INT8_MM


def _choose_vnni(what: str, avx2, name: str, case, repeats: int = 31) -> tuple[object, int, str]:
    """(the VNNI op `name` or None, the fewest rows it takes, why): timed against the AVX2 path on `case(rows)`'s
    arguments at each of `VNNI_ROWS_TIMED` rows; used from the fewest rows at which it measured faster there and
    at every larger count. On Zen 4, whose AVX-512 units are 256 bits wide, the INT4 path measured 1.1-1.4x the
    AVX2 one; a CPU with full-width AVX-512 has more to gain, one whose 512-bit instructions lower its clock may
    lose."""
    try:
        if not torch.ops.glm_cpu.vnni_supported():
            return None, 0, "no AVX-512 VNNI"
        vnni = getattr(torch.ops.glm_cpu, name).default
        times = {rows: _time_paths(vnni, avx2, case(rows), repeats) for rows in VNNI_ROWS_TIMED}
    except Exception as exc:  # the AVX2 path stays
        log.warning("%s VNNI path: %s", what, exc)
        return None, 0, f"AVX-512 VNNI path failed: {str(exc).strip()[-200:]}"
    figures = ", ".join(f"{rows} rows {ours:.0f} us against {theirs:.0f}" for rows, (ours, theirs) in times.items())
    faster = [rows for rows in VNNI_ROWS_TIMED if all(times[r][0] < times[r][1] for r in VNNI_ROWS_TIMED if r >= rows)]
    if not faster:
        return None, 0, f"AVX2 path (AVX-512 VNNI measured slower: {figures})"
    log.info("%s kernel: AVX-512 VNNI from %d rows (%s)", what, faster[0], figures)
    return vnni, faster[0], f"AVX-512 VNNI from {faster[0]} rows ({figures} us on AVX2)"


# The dense products (`load_dense`), per weight dtype: our op, the most activation rows it takes (0: none, PyTorch's
# product), and why. Module globals, read through `dense_op`, as the INT4 ones.
BF16_MM = None
BF16_MAX_ROWS = 0
BF16_REASON = "not chosen yet"
F32_MM = None
F32_MAX_ROWS = 0
F32_REASON = "not chosen yet"
_dense_chosen: set[torch.dtype] = set()
DENSE_ROWS_TIMED = (1, 4, 16, 32)


def dense_op(dtype: torch.dtype) -> tuple[object, int]:
    """Our product for a `dtype` weight and the most rows it takes, or (None, 0): PyTorch's."""
    if dtype == torch.bfloat16:
        return BF16_MM, BF16_MAX_ROWS
    if dtype == torch.float32:
        return F32_MM, F32_MAX_ROWS
    return None, 0


def load_dense(dtype: torch.dtype) -> bool:
    """Build, load and time our product for `dtype` weights (BF16 or FP32) once per process; True when it is used.
    BF16: its AVX-512 BF16 path where the CPU has it and it measured faster than the AVX2 one (at 4 rows). Then
    the path against PyTorch's product at each of `DENSE_ROWS_TIMED` rows on a 1536 x 576 weight (a SmolLM2 MLP
    layer), one thread: used up to the most rows at which it, and at every smaller count, was faster."""
    global BF16_MM, BF16_MAX_ROWS, BF16_REASON, F32_MM, F32_MAX_ROWS, F32_REASON
    if dtype not in (torch.bfloat16, torch.float32):
        return False
    if dtype not in _dense_chosen:
        _dense_chosen.add(dtype)
        op, rows, reason = _choose_dense(dtype)
        if dtype == torch.bfloat16:
            BF16_MM, BF16_MAX_ROWS, BF16_REASON = op, rows, reason
        else:
            F32_MM, F32_MAX_ROWS, F32_REASON = op, rows, reason
    return dense_op(dtype)[0] is not None


def dense_reason(dtype: torch.dtype) -> str:
    return BF16_REASON if dtype == torch.bfloat16 else F32_REASON


def _choose_dense(dtype: torch.dtype) -> tuple[object, int, str]:
    label = "BF16" if dtype == torch.bfloat16 else "FP32"
    weight = torch.randn(1536, 576, generator=torch.Generator().manual_seed(0)).to(dtype)

    def case(rows: int) -> tuple:
        return torch.randn(rows, 576).to(dtype), weight

    def path(library):
        if dtype == torch.float32:
            return library.f32_mm.default
        avx2 = library.bf16_mm.default
        if not library.avx512_bf16_supported():
            return avx2
        ours, theirs = _time_paths(library.bf16_mm_avx512.default, avx2, case(4), 7)
        return library.bf16_mm_avx512.default if ours < theirs else avx2

    times: dict[int, tuple[float, float]] = {}

    def against_pytorch(op) -> tuple[float, float]:
        for rows in DENSE_ROWS_TIMED:
            times[rows] = _time_paths(op, torch.nn.functional.linear, case(rows), 7)
        return times[1]

    op, reason = _choose(
        label,
        "PyTorch's product",
        f"our {label} product",
        path,
        against_pytorch,
        "one row, 1536 x 576, one thread: ours {:.0f} us, PyTorch's {:.0f} us",
    )
    faster = [rows for rows in DENSE_ROWS_TIMED if all(times[r][0] < times[r][1] for r in times if r <= rows)]
    if op is None or not faster:
        return None, 0, reason
    figures = ", ".join(f"{rows} rows {ours:.0f} us against {theirs:.0f}" for rows, (ours, theirs) in times.items())
    name = "AVX-512 BF16" if op is torch.ops.glm_cpu.bf16_mm_avx512.default else "AVX2"
    return op, faster[-1], f"our {label} product ({name}) up to {faster[-1]} rows ({figures})"


# The same for the decode attention (`load_attention`): our op, or None (transformers' SDPA), and why.
DECODE_ATTENTION = None
ATTENTION_REASON = "not chosen yet"
_attention_chosen = False


def load_attention() -> bool:
    """Build, load and time the decode attention once per process; True when it is used (`DECODE_ATTENTION`)."""
    global DECODE_ATTENTION, ATTENTION_REASON, _attention_chosen
    if not _attention_chosen:
        _attention_chosen = True
        DECODE_ATTENTION, ATTENTION_REASON = _choose(
            "decode attention",
            "PyTorch's SDPA",
            "our decode attention",
            lambda library: library.decode_attention.default,
            _time_attention,
            "BF16, 9 query heads over 3 key/value heads, 200 of 256 positions, one thread: "
            "ours {:.0f} us, SDPA's {:.0f} us",
        )
    return DECODE_ATTENTION is not None


def _choose(what: str, theirs: str, ours: str, pick, time_both, figures: str):
    """(our op, or None for PyTorch's, and why) for one of our kernels: built and loaded (`built_library`), `pick`ed
    from the library, timed against PyTorch's by `time_both(op)` -> (ours us, theirs us), kept only when faster.
    A missing compiler or a failed build leaves PyTorch's, which still works."""
    try:
        built = built_library()
        if isinstance(built, str):
            return None, f"{theirs} ({built})"
        op = pick(built)
        times = time_both(op)
    except Exception as exc:
        reason = f"{theirs} (ours could not be built or loaded: {str(exc).strip()[-300:]})"
        log.warning("%s: %s", what, reason)
        return None, reason
    measured = figures.format(*times)
    if times[0] >= times[1]:
        return None, f"{theirs} (measured faster here; {measured})"
    log.info("%s: %s (%s)", what, ours, measured)
    return op, f"{ours} ({measured})"


def built_library():
    """Our kernels' ops (`torch.ops.glm_cpu`), built and loaded whatever their speed here (the tests check them
    wherever they can run); or why they cannot run here (a string). A failed build raises."""
    why_not = _unsupported()
    return why_not if why_not else _load(_build())


def _unsupported() -> str | None:
    if os.environ.get("GLM_CPU_KERNELS", "auto").lower() == "off":
        return "GLM_CPU_KERNELS=off"
    if not sys.platform.startswith("linux"):
        return "our kernel is built on Linux only"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return "the CPU has no AVX2"
    if not {"avx2", "fma"} <= cpu_flags():
        return "the CPU has no AVX2 and FMA"
    return None


def _library_path() -> Path:
    from torch.utils import cpp_extension

    from ..settings import load_settings

    key = hashlib.sha256(
        b"\0".join(
            [
                *(path.read_bytes() for path in [*SOURCES, *sorted(KERNELS.glob("*.h"))]),
                torch.__version__.encode(),
                " ".join(FLAGS).encode(),
                *map(str.encode, cpp_extension.include_paths()),
            ]
        )
    ).hexdigest()[:16]
    return load_settings().cache_dir / "kernels" / f"glm_cpu-{key}.so"


def _build() -> Path:
    """The kernel's shared library, compiled once per source, PyTorch version and flags."""
    from torch.utils import cpp_extension

    torch_lib = cpp_extension.library_paths()[0]
    compiler = [
        os.environ.get("CXX", "g++"),
        *FLAGS,
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        *(f"-I{p}" for p in cpp_extension.include_paths()),
    ]
    link = [f"-L{torch_lib}", "-ltorch", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{torch_lib}"]
    return compile_once(_library_path(), compiler, SOURCES, link)


def compile_once(target: Path, compiler: list[str], sources: list[Path], link: Sequence[str] = ()) -> Path:
    """`target`, a shared library of `sources` built by `compiler` (its command and flags) unless it exists: each
    source in a process of its own, as many at once as there are cores, then linked with `link`. A lock keeps
    parallel processes from compiling it twice, and the library appears whole or not at all. A failed build
    raises, with the compiler's message."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            return target
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=target.parent) as folder:
            objects = [Path(folder) / f"{i}.o" for i in range(len(sources))]
            commands = [[*compiler, "-c", str(s), "-o", str(o)] for s, o in zip(sources, objects)]
            with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
                failures = [message for message in pool.map(_run, commands) if message]
            partial = Path(folder) / "library.so"
            failures = failures or [_run([*compiler, *map(str, objects), "-o", str(partial), *link])]
            if failures[0]:
                raise RuntimeError(f"{compiler[0]} failed: {failures[0][-2000:]}")
            partial.replace(target)
        log.info("%s built in %.1f s", target, time.perf_counter() - started)
    return target


def _run(command: list[str]) -> str:
    """ "" when it succeeds, or the compiler's message."""
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    return "" if done.returncode == 0 else done.stderr or f"exit status {done.returncode}"


def _load(path: Path):
    """The library's ops (`torch.ops.glm_cpu`), loaded once, with their output shapes for torch.compile."""
    if not hasattr(torch.ops.glm_cpu, "int4_mm"):
        torch.ops.load_library(str(path))

        def products(x, weight, *scales_and_group_size):  # int4_mm*, int8_mm*: [rows, out_features]
            return x.new_empty(x.shape[0], weight.shape[0])

        for name in ("int4_mm", "int4_mm_vnni", "int8_mm", "int8_mm_vnni", "bf16_mm", "bf16_mm_avx512", "f32_mm"):
            torch.library.register_fake(f"glm_cpu::{name}", products)

        @torch.library.register_fake("glm_cpu::decode_attention")
        def _(q, k, v, mask, scale):
            return q.new_empty(q.shape[0], 1, q.shape[1], q.shape[3])

    return torch.ops.glm_cpu


def _int4_case(size: int = 1024, group_size: int = 32):
    """A random size x size weight quantized once, and `case(rows)`: `rows` BF16 rows and that weight in our INT4
    layout (our INT4 op's arguments); `case.pytorch` holds the same weight in PyTorch's layout and its scales."""
    from .quant import pack_int4_blocks, quantize_int4

    q, scales_and_zeros = quantize_int4(torch.randn(size, size, generator=torch.Generator().manual_seed(0)), group_size)
    packed, scales_offsets = pack_int4_blocks(q, scales_and_zeros, torch.bfloat16)

    def case(rows: int) -> tuple:
        return torch.randn(rows, size, dtype=torch.bfloat16), packed, scales_offsets, group_size

    case.pytorch = (torch._convert_weight_to_int4pack_for_cpu(q, 8), scales_and_zeros.to(torch.bfloat16))
    return case


def _time_against_pytorch(op, case, repeats: int = 31) -> tuple[float, float]:
    """Microseconds of one row through each INT4 kernel (`_one_thread_minima`), on `case`'s weight."""
    x, packed, scales_offsets, group_size = case(1)
    theirs_weight, theirs_scales = case.pytorch
    runs = {
        "ours": lambda: op(x, packed, scales_offsets, group_size),
        "theirs": lambda: torch._weight_int4pack_mm_for_cpu(x, theirs_weight, group_size, theirs_scales),
    }
    return _one_thread_minima(runs, repeats)


def _time_paths(ours, theirs, args: tuple, repeats: int = 31) -> tuple[float, float]:
    """Microseconds of two of our ops on the same arguments (`_one_thread_minima`)."""
    return _one_thread_minima({"ours": lambda: ours(*args), "theirs": lambda: theirs(*args)}, repeats)


def _time_attention(op, repeats: int = 31) -> tuple[float, float]:
    """Microseconds of one decode step's attention for one layer (SmolLM2's heads) through ours and through SDPA
    on the grouped query, as the fallback calls it; one thread, the fastest of `repeats`, alternated."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, 9, 1, 64, generator=generator).to(torch.bfloat16)
    k, v = (torch.randn(1, 3, 256, 64, generator=generator).to(torch.bfloat16) for _ in range(2))
    mask = (torch.arange(256) < 200)[None, None, None, :]
    grouped = q.reshape(1, 3, 3, 64)
    runs = {
        "ours": lambda: op(q, k, v, mask, 0.125),
        "theirs": lambda: torch.nn.functional.scaled_dot_product_attention(grouped, k, v, attn_mask=mask, scale=0.125),
    }
    return _one_thread_minima(runs, repeats)


def _one_thread_minima(runs: dict, repeats: int) -> tuple[float, float]:
    """Microseconds of `runs`' "ours" and "theirs" on one thread, the fastest of `repeats` alternated calls. One
    thread: with another process busy on the same cores, each parallel region waited for its descheduled second
    thread, and both kernels took ~4 ms (the scheduler's time slice) instead of 20-40 us, so that the choice was a
    coin toss. The fastest: another process only ever adds time, so minima compare the kernels where medians
    would compare the load (with a suite's two workers, the median chose either)."""
    with one_thread_here(), torch.inference_mode():  # this thread only: see openmp.one_thread_here
        times = alternated_times(runs, repeats)
    return 1e6 * min(times["ours"]), 1e6 * min(times["theirs"])


def alternated_times(runs: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of each call in `runs` (name -> function), `repeats` times each, the calls alternated so that a
    change in the machine's load falls on all of them alike; after one warm-up call each."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    return times
