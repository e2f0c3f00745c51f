"""The compiled decode step against the eager one on static buffers, with or without inductor freezing, with or
without the decode step's query heads grouped by key/value head (what the engine's compiled path uses).

    .venv/bin/python scripts/probe_compiled_step.py fp32 default 1,8 25
    .venv/bin/python scripts/probe_compiled_step.py fp32 freeze 1,8 25
    .venv/bin/python scripts/probe_compiled_step.py int4 repeat-kv 1,8 25

Arguments: level, mode (default | freeze | repeat-kv: transformers' sdpa as it is, repeating keys and values per
query head under a compile), row counts, repeats (leave out: compile only). One process per mode (inductor's
configuration is process-wide), each with its own inductor cache under /tmp; run it alone.
"""

import os
import statistics
import sys
import time

import torch

prec, mode = sys.argv[1], sys.argv[2]
rows_list = [int(r) for r in sys.argv[3].split(",")]
os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"/tmp/glm-probe-inductor-{mode}-{prec}"
import torch._inductor.config as inductor_config  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from glm_core.engine import fast_decode as fd  # noqa: E402
from glm_core.models.loading import load_model  # noqa: E402
from glm_core.protocol import ModelSpec  # noqa: E402

inductor_config.freezing = mode == "freeze"
model = load_model(ModelSpec("embedded", prec, "cpu")).model
if mode != "repeat-kv":
    fd.group_decode_attention(model)
cache = DynamicCache(config=model.config)
with torch.inference_mode():
    model(input_ids=torch.zeros(1, 1, dtype=torch.long), past_key_values=cache, use_cache=True)
layers, first = len(cache.layers), cache.layers[0]
kv_heads, head_dim, dtype = first.keys.shape[1], first.keys.shape[3], first.keys.dtype
capacity = 256
compiled = torch.compile(fd.decode_step, fullgraph=True, dynamic=False)
setups = {}
for rows in rows_list:
    keys = [torch.zeros(16, kv_heads, capacity, head_dim, dtype=dtype) for _ in range(layers)]
    values = [torch.zeros(16, kv_heads, capacity, head_dim, dtype=dtype) for _ in range(layers)]
    ids, positions, mask = fd.step_inputs(list(range(1, rows + 1)), [5] * rows, rows, capacity, "cpu")
    args = (model, ids, positions, mask, [k[:rows] for k in keys], [v[:rows] for v in values])
    started = time.perf_counter()
    with torch.inference_mode(), fd.math_attention():
        out, ref = compiled(*args), fd.decode_step(*args)
    diff = (out.float() - ref.float()).abs().max().item()
    print(f"{prec} {mode} rows {rows}: compile {time.perf_counter() - started:.1f}s  max|compiled - eager| {diff:.2e}")
    setups[rows] = args
if len(sys.argv) > 4:
    for rows, args in setups.items():
        times = {"eager": [], "compiled": []}
        with torch.inference_mode(), fd.math_attention():
            for _ in range(int(sys.argv[4])):
                for name, step in (("eager", fd.decode_step), ("compiled", compiled)):
                    started = time.perf_counter()
                    step(*args)
                    times[name].append(time.perf_counter() - started)
        eager, fast = (1000 * statistics.median(times[k]) for k in ("eager", "compiled"))
        print(f"{prec} {mode} rows {rows}: eager {eager:.1f} ms  compiled {fast:.1f} ms  speed {eager / fast:.2f}x")
