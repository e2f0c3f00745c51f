"""What our INT4 CPU kernel's int8 activations cost in quality: the embedded model at INT4 through PyTorch's
kernel and through ours (every row through the kernel, as every decode step is), each against FP32 on the bundled
evaluation text (KL divergence of the next-token distributions, top-1 agreement, perplexity).

    .venv/bin/python scripts/probe_int4_kernel_quality.py [tokens, default 512]

About a minute on 2 cores. Prints one line per kernel.
"""

import math
import sys

import torch

from glm_core.bench.quality import read_text
from glm_core.models import cpu_kernels, quant
from glm_core.models.loading import load_model
from glm_core.protocol import ModelSpec

tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 512


@torch.inference_mode()
def logprobs(loaded, ids):
    return torch.log_softmax(loaded.model(input_ids=torch.tensor([ids[:-1]])).logits[0].float(), dim=-1)


reference = load_model(ModelSpec("embedded", "fp32", "cpu"))
ids = reference.tokenizer(read_text(None))["input_ids"][: tokens + 1]
targets = torch.tensor(ids[1:])
want = logprobs(reference, ids)
del reference
for kernel in ("pytorch", "ours"):
    cpu_kernels._chosen = kernel == "pytorch"  # "ours": build, time and choose as a load does
    cpu_kernels.INT4_MM = None
    if kernel == "ours" and not cpu_kernels.load_int4():
        print(f"ours: not used here ({cpu_kernels.INT4_REASON})")
        break
    quant.OUR_INT4_DENSE_MIN_ROWS = 10**9  # every row through the kernel, not the prefill's dense path
    got = logprobs(load_model(ModelSpec("embedded", "int4", "cpu")), ids)
    kld = (want.exp() * (want - got)).sum(-1)
    top1 = (want.argmax(-1) == got.argmax(-1)).float().mean().item()
    ppl = math.exp(-got.gather(1, targets[:, None]).mean().item())
    ref_ppl = math.exp(-want.gather(1, targets[:, None]).mean().item())
    print(
        f"{kernel:8} INT4 g32, {len(targets)} tokens: KLD mean {kld.mean():.5f} p99 {torch.quantile(kld, 0.99):.5f} "
        f"max {kld.max():.5f}  top-1 {100 * top1:.2f} %  perplexity {ppl:.3f} (FP32 {ref_ppl:.3f})"
    )
