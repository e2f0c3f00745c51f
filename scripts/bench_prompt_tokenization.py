"""Tokenizer work per API chat request (issue 22, one way in), before and after the API hands its encoded ids to
the runner: the embedded SmolLM2 tokenizer, a 40-turn conversation (~21k characters). Before: the API encodes the
prompt to count it for max_tokens, then the runner counts each message and encodes again while fitting the context.
After: one encode; the runner feeds those ids. `PYTHONPATH=$PWD .venv/bin/python scripts/bench_prompt_tokenization.py`
(about 10 s); prints the median of 7 of each and their ratio, measured in one run."""

import statistics
import time

from glm_core import ModelSpec
from glm_core.engine.context import fit_to_context
from glm_core.engine.runner import prompt_encoder
from glm_core.models import load_model
from glm_core.protocol import OutputSpec

loaded = load_model(ModelSpec("embedded", "fp32", "cpu"))
turn = "Tell me about the history of the printing press and its effect on literacy in Europe. " * 3
messages = []
for i in range(40):
    messages += [{"role": "user", "content": f"{i}: {turn}"}, {"role": "assistant", "content": turn}]
messages.append({"role": "user", "content": "And then?"})
encode = prompt_encoder(loaded, OutputSpec(), None)


def count(text: str) -> int:  # the runner's _count
    return len(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])


ids = encode(messages)


def before():
    encode(messages)  # the API's count
    fit_to_context(encode, messages, 8192 - 16, count=count)  # the runner's fitting: counts, then encode


def after():
    encode(messages)  # the API's encode; the runner feeds these ids


for warm_up in (before, after):
    warm_up()
results = {}
for _ in range(7):
    for name, work in (("before", before), ("after", after)):
        start = time.perf_counter()
        work()
        results.setdefault(name, []).append(time.perf_counter() - start)
b, a = statistics.median(results["before"]), statistics.median(results["after"])
print(
    f"{len(ids)} prompt tokens, {sum(len(m['content']) for m in messages)} chars: before {b * 1e3:.1f} ms, after {a * 1e3:.1f} ms, ratio {b / a:.2f}x"
)
