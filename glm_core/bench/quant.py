"""`bench quant`: per precision level, weights bytes, peak memory, time to first token, decode tokens/s and
perplexity on a fixed text. Each level runs in its own process, so every peak is that level's alone."""

from __future__ import annotations

import io
import json
import math
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..models.loading import LoadedModel, load_model
from ..models.precision import resolve_device
from ..protocol import ModelSpec, SamplingParams
from ..settings import DEFAULT_GROUP_SIZE, load_settings
from ..telemetry.memory import device_memory

EVAL_TEXT = Path(__file__).parent / "data" / "eval_text.txt"
QUANT_LEVEL_TIME_LIMIT_S = 60 * 60  # one level's process is killed past it
Progress = Callable[[float, str], None]
RANDOM_GLM = "random-glm-1b"
PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle, with many details."

# ChatGLM2-6B's shapes with 4 of its 28 layers: 1.35 B parameters, of which 0.53 B in embedding and output layer.
RANDOM_GLM_CONFIG = {
    "_name_or_path": "THUDM/chatglm2-6b (4-layer random-weight stand-in)",
    "model_type": "chatglm",
    "add_bias_linear": False,
    "add_qkv_bias": True,
    "ffn_hidden_size": 13696,
    "hidden_size": 4096,
    "kv_channels": 128,
    "layernorm_epsilon": 1e-05,
    "multi_query_attention": True,
    "multi_query_group_num": 2,
    "num_attention_heads": 32,
    "num_layers": 4,
    "padded_vocab_size": 65024,
    "post_layer_norm": True,
    "rmsnorm": True,
    "seq_length": 32768,
    "torch_dtype": "float16",
}


def ensure_random_glm(cache_dir: Path) -> Path:
    """A ChatGLM2-shaped checkpoint with random weights (memory and speed depend on shapes, not values), in the
    original THUDM layout, with a SentencePiece tokenizer trained on the evaluation text. Built once, then reused."""
    import sentencepiece as spm
    from safetensors.torch import save_file

    folder = cache_dir / "random" / RANDOM_GLM
    if (folder / "model.safetensors").is_file():
        return folder
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(EVAL_TEXT.read_text().splitlines()),
        model_writer=model,
        vocab_size=1000,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    (tmp / "tokenizer.model").write_bytes(model.getvalue())
    c = RANDOM_GLM_CONFIG
    h, hn, ffn = c["hidden_size"], c["kv_channels"], c["ffn_hidden_size"]
    qkv = c["num_attention_heads"] * hn + 2 * c["multi_query_group_num"] * hn
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).half()

    sd = {"transformer.embedding.word_embeddings.weight": rand(c["padded_vocab_size"], h)}
    for i in range(c["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        sd[p + "input_layernorm.weight"] = torch.ones(h).half()
        sd[p + "self_attention.query_key_value.weight"] = rand(qkv, h)
        sd[p + "self_attention.query_key_value.bias"] = rand(qkv)
        sd[p + "self_attention.dense.weight"] = rand(h, h)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(h).half()
        sd[p + "mlp.dense_h_to_4h.weight"] = rand(2 * ffn, h)
        sd[p + "mlp.dense_4h_to_h.weight"] = rand(h, ffn)
    sd["transformer.encoder.final_layernorm.weight"] = torch.ones(h).half()
    sd["transformer.output_layer.weight"] = rand(c["padded_vocab_size"], h)
    save_file(sd, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps(c, indent=2))
    tmp.rename(folder)
    return folder


def resolve_bench_model(path: str) -> tuple[str, bool]:
    """(model path, whether its weights are real); "random-glm-1b" builds the random stand-in."""
    if path == RANDOM_GLM:
        return str(ensure_random_glm(load_settings().cache_dir)), False
    return path, True


def _windows(loaded: LoadedModel, text: str, max_tokens: int, window: int) -> list[list[int]]:
    """The first `max_tokens` tokens of `text` in windows of `window` inputs, each with the next token to predict
    (windows overlap by that one token)."""
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    chunks = [ids[start : start + window + 1] for start in range(0, len(ids) - 1, window)]
    return [chunk for chunk in chunks if len(chunk) >= 2]


@torch.inference_mode()
def perplexity(loaded: LoadedModel, text: str, max_tokens: int, window: int = 512) -> float:
    """exp(mean next-token negative log-likelihood) over the first `max_tokens` tokens, in windows."""
    total_nll, count = 0.0, 0
    for window_ids in _windows(loaded, text, max_tokens, window):
        chunk = torch.tensor([window_ids], device=loaded.device)
        logits = loaded.model(input_ids=chunk[:, :-1]).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum")
        total_nll, count = total_nll + nll.item(), count + chunk.shape[1] - 1
    return math.exp(total_nll / count)


@torch.inference_mode()
def perplexity_compiled(loaded: LoadedModel, text: str, max_tokens: int, window: int = 512) -> float:
    """`perplexity` through the engine's compiled decode step (what GLM_COMPILE=on replies are drawn from): the
    same tokens and windows, teacher-forced one token at a time over a one-row slot cache. Compiles the graphs it
    needs first (inductor's on-disk cache under GLM_CACHE_DIR makes a rerun quick)."""
    from transformers import DynamicCache

    from ..engine.fast_decode import MIN_CAPACITY, FastDecode, capacity_bucket, configure_compile_cache
    from ..engine.kv_slots import SlotCache

    windows = _windows(loaded, text, max_tokens, window)
    configure_compile_cache(load_settings().cache_dir)
    largest = capacity_bucket(max(map(len, windows)) - 1)  # a window of n tokens feeds n - 1 positions
    capacities = tuple(MIN_CAPACITY << i for i in range((largest // MIN_CAPACITY).bit_length()))
    fast = FastDecode(loaded.model, loaded.device, max_batch=1, capacities=capacities)
    try:
        status = fast.wait_ready()
        if status != "ready":
            raise RuntimeError(f"the compiled decode step is not available: {status}")
        layers, kv_heads, head_dim, dtype = fast.layout
        slots = SlotCache(layers, kv_heads, head_dim, dtype, loaded.device, slots=1)
        total_nll, count = 0.0, 0
        for chunk in windows:
            slots.clear()
            slots.add(DynamicCache(config=loaded.model.config))
            for token, target in zip(chunk[:-1], chunk[1:]):
                logits = fast.try_decode([token], slots)
                if logits is None:
                    raise RuntimeError("the compiled decode step declined a shape it had compiled")
                slots.advance()
                target_t = torch.tensor([target], device=loaded.device)
                total_nll += torch.nn.functional.cross_entropy(logits.float(), target_t, reduction="sum").item()
                count += 1
    finally:
        fast.close()
    return math.exp(total_nll / count)


def measure_level(spec: ModelSpec, decode_tokens: int, eval_tokens: int, real: bool, compiled: bool = False) -> dict:
    """One level, in this process: the peaks are only meaningful in a fresh process (see run_quant_bench)."""
    from ..engine.scheduler import Engine

    device_obj = resolve_device(spec.device)
    if device_obj.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = device_memory(device_obj)["current"]
    started = time.perf_counter()
    loaded = load_model(spec)
    load_s = time.perf_counter() - started
    load_peak = device_memory(device_obj)["peak"] - before  # what quantizing while reading saves shows here
    weights = loaded.weights
    engine = Engine(loaded, compile="off")  # the eager engine: bench decode measures the compiled path
    try:
        messages = [{"role": "user", "content": PROMPT}]
        engine.submit(uuid.uuid4().hex, messages, SamplingParams(temperature=0, max_new_tokens=4)).wait()  # warm-up
        reply = engine.submit(  # recomputed: the warm-up's kept prompt would answer it without a prefill
            uuid.uuid4().hex, messages, SamplingParams(temperature=0, max_new_tokens=decode_tokens), recompute=True
        ).wait()
        if reply.error:
            raise RuntimeError(reply.error)
    finally:
        engine.close()
    ppl = perplexity(loaded, EVAL_TEXT.read_text(), eval_tokens) if real and eval_tokens else None
    ppl_compiled = (
        perplexity_compiled(loaded, EVAL_TEXT.read_text(), eval_tokens) if compiled and real and eval_tokens else None
    )
    memory = device_memory(loaded.device)
    return {
        "level": spec.precision,
        "group_size": spec.group_size,
        "model": loaded.name,
        "device": str(loaded.device),
        "memory_source": memory["source"],
        "weights_bytes": weights["total"],
        "quantized_weights_bytes": weights["quantized"],
        "load_peak_bytes": load_peak,
        "peak_bytes": memory["peak"] - before,
        "load_s": load_s,
        "ttft_s": reply.stats.ttft_s,
        "prompt_tokens": reply.stats.prompt_tokens,
        "decode_tokens": reply.stats.completion_tokens,
        "decode_tokens_per_s": reply.stats.decode_tokens_per_s,
        "perplexity": ppl,
        "perplexity_compiled": ppl_compiled,
    }


@dataclass(frozen=True)
class QuantLevelRequest:
    """One level of `bench quant`, measured in a child process of its own (glm_core/bench/child.py)."""

    path: str  # a model folder or .gguf file (resolve_bench_model has built the random stand-in)
    level: str
    device: str = "auto"
    group_size: int = DEFAULT_GROUP_SIZE
    decode_tokens: int = 64
    eval_tokens: int = 1024
    real: bool = True  # real weights: perplexity is measured
    compiled: bool = False
    family: str = "auto"

    def spec(self) -> ModelSpec:
        return ModelSpec(self.path, self.level, self.device, self.family, self.group_size)


def run_level(request: QuantLevelRequest, progress: Progress, partial=None) -> dict:
    """The child job: one level's figures."""
    progress(0.0, f"{request.level.upper()}: measuring")
    return measure_level(request.spec(), request.decode_tokens, request.eval_tokens, request.real, request.compiled)


def run_quant_bench(
    model: str,
    levels: list[str],
    device: str = "auto",
    decode_tokens: int = 64,
    eval_tokens: int = 1024,
    group_size: int = DEFAULT_GROUP_SIZE,
    compiled: bool = False,
    family: str = "auto",
) -> list[dict]:
    """Every level in a fresh process of its own; the results in level order (a level that failed: its error)."""
    from .child import run_child

    path, real = resolve_bench_model(model)
    results = []
    for level in levels:
        request = QuantLevelRequest(path, level, device, group_size, decode_tokens, eval_tokens if real else 0, real)
        request = replace(request, compiled=compiled, family=family)
        outcome = run_child(request, time_limit_s=QUANT_LEVEL_TIME_LIMIT_S)
        if outcome.error is not None:
            results.append({"level": level, "error": outcome.error.message, "error_kind": outcome.error.kind.value})
        else:
            results.append(outcome.result)
    return results


def format_quant_report(results: list[dict]) -> str:
    ok = [r for r in results if "error" not in r]
    base = next((r for r in ok if r["level"] == "bf16"), None)
    head = ok[0] if ok else {}
    lines = [
        f"bench quant: {head.get('model', '?')} on {head.get('device', '?')} "
        f"(peaks = {head.get('memory_source', '?')} growth: while loading; while loading and generating)",
        "level  weights MiB  load peak MiB  peak MiB  ttft ms  decode tok/s  perplexity  vs BF16: weights  decode"
        + ("  compiled perplexity" if any(r.get("perplexity_compiled") is not None for r in ok) else ""),
    ]
    for r in results:
        if "error" in r:
            lines.append(f"{r['level']:<5}  error: {r['error']}")
            continue
        ppl = f"{r['perplexity']:.2f}" if r["perplexity"] is not None else "n/a"
        ratio_w = f"{r['weights_bytes'] / base['weights_bytes']:.2f}" if base else "-"
        ratio_d = f"{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}" if base else "-"
        lines.append(
            f"{r['level']:<5}  {r['weights_bytes'] / 2**20:>11,.0f}  {r['load_peak_bytes'] / 2**20:>13,.0f}  "
            f"{r['peak_bytes'] / 2**20:>8,.0f}  "
            f"{r['ttft_s'] * 1000:>7.0f}  {r['decode_tokens_per_s']:>12.1f}  {ppl:>10}  "
            f"{ratio_w:>15}  {ratio_d:>6}"
            + (f"  {r['perplexity_compiled']:>19.2f}" if r.get("perplexity_compiled") is not None else "")
        )
    return "\n".join(lines)
