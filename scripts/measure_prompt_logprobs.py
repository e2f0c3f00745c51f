"""What `echo` with `logprobs` on /v1/completions adds: scoring a prompt (PromptLogprobsJob: every position's logits,
log-softmax, top-k) against the plain prefill the engine does anyway (logits of the last position only), on the
same model and prompt, interleaved, median of the repeats.

    PYTHONPATH=. .venv/bin/python scripts/measure_prompt_logprobs.py [--tokens 512] [--repeats 5] [--top 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache

from glm_core.engine.generation import prefill
from glm_core.models import load_model
from glm_core.models.prompt_logprobs import SLICE_TOKENS, prompt_logprobs
from glm_core.protocol import ModelSpec


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()
    loaded = load_model(ModelSpec("embedded", args.precision, "cpu"))
    text = "The sea was calm that morning, and the fishermen went out before the sun rose over the hills. " * 64
    ids = loaded.tokenizer(text)["input_ids"][: args.tokens]
    plain, scored = [], []
    for _ in range(args.repeats):
        started = time.perf_counter()
        with torch.inference_mode():
            prefill(loaded.model, ids, DynamicCache(config=loaded.model.config), loaded.device, chunk_size=SLICE_TOKENS)
        plain.append(time.perf_counter() - started)
        started = time.perf_counter()
        prompt_logprobs(loaded, ids, args.top)
        scored.append(time.perf_counter() - started)
    p, s = statistics.median(plain), statistics.median(scored)
    print(
        f"{loaded.card().get('name')} {loaded.card().get('precision')}, {len(ids)} prompt tokens, top {args.top}, "
        f"median of {args.repeats}: prefill {p * 1000:.0f} ms ({p / len(ids) * 1000:.2f} ms/token), "
        f"scored {s * 1000:.0f} ms ({s / len(ids) * 1000:.2f} ms/token), ratio {s / p:.2f}"
    )


if __name__ == "__main__":
    main()
