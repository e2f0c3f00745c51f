"""The memory benchmark's child: one level measured in this process (run as a job of glm_core.bench.child, so
each level's peaks are its process's alone).

Phases of one level, each with its own peak (the peak is reset between them):
1. load: a model folder with its real weights, or a preset / config.json with random weights made module by
   module (quantized as they are made, as the loader quantizes while reading);
2. encode: N random token ids through the engine's chunked prefill, then the first token (time to first token);
3. generate: the KV cache is filled to M - DECODE_STEPS positions with random keys and values (memory depends on
   shapes, not values; computing them would take hours on a CPU), then DECODE_STEPS tokens are decoded for real:
   the peak and the decode speed at a context of M tokens;
4. perplexity on glm_core/data/eval_text.txt, where the weights are real.
"""

from __future__ import annotations

import time

import torch

from ...models.checkpoint import build_computed_buffers
from ...models.loading import fix_output_layer_input
from ...models.precision import Precision, parse_precision, resolve_device
from ...models.quant import tie_output_layer
from ...telemetry.memory import trim_c_heap
from ..child import Progress
from ..estimator import model_config, read_config
from .report import LevelReport
from .request import DECODE_STEPS, MemoryBenchRequest, source_kind


def run_level(request: MemoryBenchRequest, progress: Progress, partial=None) -> dict:
    """The child job: the request's one level (request.levels[0]), its report as a dict."""
    return measure_level(request, request.levels[0], progress).to_dict()


def build_random_model(config, precision: Precision, group_size: int, device: torch.device) -> torch.nn.Module:
    """The model of `config` with random weights, made module by module on `device`; quantized modules are
    quantized as each float weight is made, so no full-precision copy of the model ever exists."""
    from ..estimator import meta_model

    model = meta_model(config, precision, group_size)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    head = model.get_output_embeddings()
    generator = torch.Generator(device=device).manual_seed(0)
    dtype = precision.dtype
    with torch.no_grad():
        for module in model.modules():
            if tied and module is head:  # shares the embedding's table, tied again below
                continue
            if hasattr(module, "set_weight"):
                module.to_empty(device=device, recurse=False)
                shape = module.float_shape  # [out, in]; [experts, out, in] for a MoE layer's expert stack
                module.set_weight(torch.randn(*shape, generator=generator, device=device, dtype=dtype) * 0.02)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
                continue
            stored = [(n, b) for n, b in module._buffers.items() if n not in module._non_persistent_buffers_set]
            for name, tensor in list(module._parameters.items()) + stored:  # computed buffers: see below
                if tensor is None or tensor.device.type != "meta":
                    continue
                real = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
                if real.dim() > 1:  # matrices, and a MoE layer's fused expert tensors
                    real.normal_(0, 0.02, generator=generator)
                elif name == "weight":
                    real.fill_(1.0)  # norms
                else:
                    real.zero_()
                if isinstance(tensor, torch.nn.Parameter):
                    module._parameters[name] = torch.nn.Parameter(real, requires_grad=False)
                else:
                    module._buffers[name] = real
    if tied and precision.is_quantized:
        tie_output_layer(model, model.get_input_embeddings(), dtype)
    elif tied:
        model.tie_weights()
    build_computed_buffers(model, device)
    fix_output_layer_input(model)
    trim_c_heap()  # as load_model does: the float temporaries' pages go back to the system
    return model.eval()


def measure_level(request: MemoryBenchRequest, level: str, progress: Progress) -> LevelReport:
    """Load, encode, generate and (real weights) perplexity for one level; the peaks are this process's."""
    from transformers import DynamicCache

    from ...engine.generation import decode_one, prefill
    from ...models.loading import load_model
    from ...models.quant import weight_bytes
    from ...protocol import ModelSpec
    from ...telemetry.memory import held_peak, kv_bytes_per_token, reset_peak
    from ..quant import EVAL_TEXT, perplexity

    device = resolve_device(request.device)
    precision = parse_precision(level, device)
    kind = source_kind(request.source)
    if device.type == "cuda":
        torch.cuda.init()
    runtime = held_peak(device) if device.type != "cuda" else 0
    reset_peak(device)

    progress(0.05, f"{precision.label}: loading")
    started = time.perf_counter()
    loaded = None
    if kind == "real":
        loaded = load_model(ModelSpec(request.source, precision.value, request.device, group_size=request.group_size))
        model, name = loaded.model, loaded.name
    else:
        name, cfg = read_config(request.source)
        config = model_config(cfg)
        model = build_random_model(config, precision, request.group_size, device)
    load_s = time.perf_counter() - started
    weights = weight_bytes(model)
    config = model.config
    vocab = config.get_text_config().vocab_size if hasattr(config, "get_text_config") else config.vocab_size
    load_peak = held_peak(device)

    progress(0.4, f"{precision.label}: encoding {request.encode} tokens")
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (request.encode,), generator=generator).tolist()
    reset_peak(device)
    started = time.perf_counter()
    cache = DynamicCache(config=config)
    if getattr(model, "prefill_whole_prompt", False):  # as the engine feeds it (ChatGLM-6B): one forward
        with torch.inference_mode():
            fed = torch.tensor([ids], device=device)
            logits = model(input_ids=fed, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
    else:
        logits = prefill(model, ids, cache, device)
    int(logits.argmax())
    ttft = time.perf_counter() - started
    encode_peak = held_peak(device)
    del cache, logits
    _release(device)

    steps = min(DECODE_STEPS, request.generate)
    progress(0.7, f"{precision.label}: generating at a context of {request.generate} tokens")
    reset_peak(device)
    cache = DynamicCache(config=config)
    _fill_cache(cache, config, request.generate - steps, precision.dtype, device)
    token = ids[-1]
    started = time.perf_counter()
    for _ in range(steps):
        token = int(decode_one(model, token, cache, device).argmax())
    decode_s = time.perf_counter() - started
    generate_peak = held_peak(device)
    context = _cuda_context_bytes(device) if device.type == "cuda" else None
    del cache
    _release(device)

    ppl = None
    if loaded is not None and request.eval_tokens:
        progress(0.9, f"{precision.label}: perplexity")
        ppl = perplexity(loaded, EVAL_TEXT.read_text(), request.eval_tokens)
    if device.type == "cuda":
        runtime = context or 0
        load_peak, encode_peak, generate_peak = (p + runtime for p in (load_peak, encode_peak, generate_peak))
    return LevelReport(
        level=precision.value,
        model=name,
        weights="real" if kind == "real" else "random",
        device=str(device),
        memory_source="CUDA allocator (reserved) + CUDA context" if device.type == "cuda" else "process RSS",
        runtime_bytes=runtime,
        weights_bytes=weights["total"],
        quantized_weights_bytes=weights["quantized"],
        kv_bytes_per_token=kv_bytes_per_token(config, precision.dtype),
        load_s=load_s,
        load_peak_bytes=load_peak,
        encode_tokens=request.encode,
        encode_peak_bytes=encode_peak,
        ttft_s=ttft,
        generate_tokens=request.generate,
        generate_peak_bytes=generate_peak,
        decode_tokens_per_s=steps / decode_s if decode_s > 0 else None,
        perplexity=ppl,
    )


def _cuda_context_bytes(device: torch.device) -> int | None:
    """What this process holds on the GPU outside the caching allocator (CUDA context, kernel images)."""
    from ...telemetry.gpu_monitor import this_process_gpu_bytes

    index = device.index if device.index is not None else torch.cuda.current_device()
    used = this_process_gpu_bytes(index)
    return max(used - torch.cuda.memory_reserved(device), 0) if used is not None else None


def _fill_cache(cache, config, positions: int, dtype: torch.dtype, device: torch.device) -> None:
    """Hold `positions` random keys and values in every layer, as a generation that far would."""
    if positions <= 0:
        return
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    for layer in range(text.num_hidden_layers):
        keys = torch.randn(1, heads, positions, head_dim, dtype=dtype, device=device)
        cache.update(keys, torch.randn_like(keys), layer)


def _release(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
