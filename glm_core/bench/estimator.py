"""Memory per precision level from a config.json alone: weights, KV cache, activation peaks, runtime overhead.

It predicts this project's own memory (what `bench memory` measures), so it follows this project's choices:
- weights: the model is built on the meta device (no memory, no values) from the config, the quantization policy
  of quant.py is applied to it, and the bytes of every tensor are counted, scales and zero points included;
- KV cache: keys and values of every layer, as many heads as the config's grouped/multi-query attention keeps
  (multi-head latent attention, GLM-4.7-Flash's: the compressed latent and the shared rotary key);
- MoE (GLM-4.5, GLM-4.7-Flash): the routed experts are weights like any other (quantized per expert at INT8/INT4),
  all of them resident; "active parameters" counts what one token reads (its chosen experts only);
- activations: the engine prefills in chunks of PREFILL_CHUNK tokens, so encoding N tokens peaks inside one
  chunk's layer (see `_activation_bytes`); decoding feeds one token at a time;
- runtime: a fixed overhead per device type (RUNTIME_OVERHEAD).

ChatGLM-6B (first generation) is estimated, and benchmarked with random weights, through the module that runs it
(models/chatglm/glm6b.py: its output layer is tied to the embedding, so it counts once); that module feeds the
whole prompt in one forward (`prefill_whole_prompt`), so its encode peak holds the whole prompt, not one chunk.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..engine.generation import PREFILL_CHUNK
from ..models.checkpoint import CheckpointError, read_json_object
from ..models.precision import Precision, parse_precision, resolve_device
from ..models.quant import (
    experts_per_token,
    parameter_counts,
    swap_in_quantized_linears,
    tie_output_layer,
    weight_bytes,
)
from ..settings import DEFAULT_GROUP_SIZE
from ..telemetry.memory import kv_bytes_per_token

PRESETS_DIR = Path(__file__).parent / "presets"
PRESETS = {  # name -> label; the configs are the published config.json files of these models
    "chatglm-6b": "ChatGLM-6B",
    "chatglm2-6b": "ChatGLM2-6B",
    "chatglm3-6b": "ChatGLM3-6B",
    "glm-4-9b": "GLM-4-9B",
    "glm-4-9b-0414": "GLM-4-9B-0414 / GLM-Z1-9B",
    "glm-4.5-air": "GLM-4.5-Air (MoE)",
    "glm-4.7-flash": "GLM-4.7-Flash (MoE, MLA)",
}

GB = 10**9  # the published tables count in GB; so do the comparisons with them

# THUDM/ChatGLM2-6B README, "minimum GPU memory to encode 2048 tokens / to generate 8192 tokens" per level.
# Their sums fit weights + KV cache + their fp32 attention scores, i.e. tensors on the device, to about 1 %.
PUBLISHED = {
    ("chatglm2-6b", 2048, 8192): {
        "source": "THUDM/ChatGLM2-6B README (original implementation, CUDA)",
        "fp16": (13.1 * GB, 12.8 * GB),
        "bf16": (13.1 * GB, 12.8 * GB),
        "int8": (8.2 * GB, 8.1 * GB),
        "int4": (5.5 * GB, 5.1 * GB),
    },
}

MiB = 2**20
# Fixed overhead per device type, on top of the tensors.
# - cpu: resident memory of a Python process that has imported torch and transformers (247 MiB here with torch
#   2.13, the `runtime_bytes` that bench memory reports before loading), then the model's code (transformers
#   imports a model class lazily: about 105 MiB more) and run a model once (oneDNN kernels, thread pools, code
#   pages). Measured 2026-12-06 on an AVX2 CPU as the peak minus the tensors of a model too small to count
#   (`bench memory` on a 1-layer, 512-token-vocabulary config, encode 600 / generate 3000): 394-400 MiB at every
#   level. The INT4 kernels hold about 35 MiB more at 100 M parameters; a fresh CI machine held about 26 MiB more
#   than this one in the same INT4 run.
# - cuda: the CUDA context and kernel images (CUDA 12 with lazy loading: about 500 MiB on an H100 per NVIDIA's
#   and PyTorch's reports; not measured here, no GPU was lent), plus the caching allocator's slack, modelled as
#   ALLOCATOR_SLACK of the tensors.
RUNTIME_OVERHEAD = {"cpu": 400 * MiB, "cuda": 500 * MiB, "mps": 0}
ALLOCATOR_SLACK = {"cpu": 0.0, "cuda": 0.02, "mps": 0.0}


class ConfigError(ValueError):
    """The config cannot be estimated; the message says why in one line."""


# ---- configs --------------------------------------------------------------------------------------------------


def read_config(source: str) -> tuple[str, dict]:
    """(display name, config dict) for a preset name, a config.json file or a model folder."""
    key = source.strip().lower()
    if key in PRESETS:
        return PRESETS[key], json.loads((PRESETS_DIR / f"{key}.json").read_text())
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"{source!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json or model folder")
    try:
        cfg = read_json_object(path)
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from None
    name = cfg.get("_name_or_path") or (path.parent.name if path.name == "config.json" else path.stem)
    return str(name), cfg


def model_config(cfg: dict):
    """The config of the module that runs `cfg`."""
    from transformers import AutoConfig

    from ..models.chatglm.checkpoint import glm_config, is_first_generation
    from ..models.chatglm.glm6b import glm6b_config

    try:
        if cfg.get("model_type") in ("chatglm", "chatglm6b"):
            return glm6b_config(cfg) if is_first_generation(cfg) else glm_config(cfg)
        fields = {k: v for k, v in cfg.items() if k not in ("model_type", "quantization_config")}
        return AutoConfig.for_model(cfg.get("model_type", ""), **fields)
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from None
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"config.json cannot be read as a model config: {exc}") from None


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def meta_model(config, precision: Precision, group_size: int = DEFAULT_GROUP_SIZE) -> torch.nn.Module:
    """The model with the level's quantized modules, on the meta device: shapes without memory.

    The class is instantiated directly and cast afterwards: `from_config(dtype=...)` sets torch's process-wide
    default dtype for a moment, and the portal estimates in several threads at once (pages, a running benchmark),
    whose interleaved set/restore left the whole process at BF16."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from ..models.chatglm.glm6b import ChatGLM6BConfig, ChatGLM6BForCausalLM

    try:
        model_class = (
            ChatGLM6BForCausalLM if isinstance(config, ChatGLM6BConfig) else MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
        )
    except KeyError:
        raise ConfigError(f"no causal language model class for a {type(config).__name__}") from None
    with torch.device("meta"):
        model = model_class(config).to(precision.dtype)
    # What from_pretrained keeps in FP32 whatever the level (GLM-4.5's router bias), as loading does.
    kept = [
        *(getattr(model, "_keep_in_fp32_modules", None) or ()),
        *(getattr(model, "_keep_in_fp32_modules_strict", None) or ()),
    ]
    if kept and precision.dtype != torch.float32:
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if any(k in name.split(".") for k in kept) and tensor.is_floating_point():
                module, _, leaf = name.rpartition(".")
                owner = model.get_submodule(module)
                if leaf in owner._parameters:
                    owner._parameters[leaf] = torch.nn.Parameter(tensor.float(), requires_grad=False)
                else:
                    owner._buffers[leaf] = tensor.float()
    if precision.is_quantized:
        tied = getattr(config, "tie_word_embeddings", False)
        swap_in_quantized_linears(model, precision, precision.dtype, group_size)
        if tied:  # the output layer reads the int8 embedding's table
            tie_output_layer(model, model.get_input_embeddings(), precision.dtype)
    return model


# ---- activations ---------------------------------------------------------------------------------------------


NOT_GATED = ("gpt_neox", "chatglm6b")  # plain 4h MLPs: one wide activation fewer than gate/up


def _activation_bytes(config, tokens: int, context: int, dtype: torch.dtype) -> int:
    """Peak of the temporaries of one forward of `tokens` tokens over `context` cached+new positions.

    Inside the layer that holds the peak: the residual stream and its normed copy, the attention scores in
    float32 (tokens x heads x context; the sdpa math path materialises them), the MLP's widest pair
    (gate/up output and the activated product), the copy of one layer's keys and values that the cache's
    concatenation makes, and the float32 logits of the last position (logits_to_keep=1).
    """
    t = text_config(config)
    size = torch.tensor([], dtype=dtype).element_size()
    hidden, heads = t.hidden_size, t.num_attention_heads
    kv_heads = getattr(t, "num_key_value_heads", None) or heads
    head_dim = getattr(t, "head_dim", None) or hidden // heads
    ffn = getattr(t, "intermediate_size", None) or 4 * hidden
    gated = getattr(t, "model_type", "") not in NOT_GATED
    residual = 3 * tokens * hidden * size
    attention = tokens * (heads + 2 * kv_heads) * head_dim * size + tokens * heads * context * 4
    mlp = tokens * ffn * (3 if gated else 2) * size
    cache_copy = 2 * context * kv_heads * head_dim * size
    logits = t.vocab_size * 4
    return residual + max(attention, mlp) + cache_copy + logits


def _prefills_whole_prompt(config) -> bool:
    from ..models.chatglm.glm6b import ChatGLM6BConfig, ChatGLM6BForCausalLM

    return isinstance(config, ChatGLM6BConfig) and ChatGLM6BForCausalLM.prefill_whole_prompt


# ---- the estimate --------------------------------------------------------------------------------------------


@dataclass
class Estimate:
    level: str
    weights_bytes: int
    kv_bytes_per_token: int
    encode_activation_bytes: int
    generate_activation_bytes: int
    runtime_bytes: int
    encode_peak_bytes: int
    generate_peak_bytes: int
    parameters: int = 0  # as the float checkpoint counts them
    active_parameters: int = 0  # read by one token: a MoE model's chosen experts only (embedding and output included)

    def to_dict(self) -> dict:
        return asdict(self)


def estimate(
    cfg: dict,
    levels: list[str],
    encode: int,
    generate: int,
    device_type: str = "cpu",
    group_size: int = DEFAULT_GROUP_SIZE,
) -> list[Estimate]:
    """Predicted memory per level for encoding `encode` tokens, and for generating up to `generate` tokens."""
    if encode < 1 or generate < 1:
        raise ConfigError("the lengths to encode and to generate must be at least 1 token")
    config = model_config(cfg)
    overhead, slack = RUNTIME_OVERHEAD.get(device_type, 0), ALLOCATOR_SLACK.get(device_type, 0.0)
    results = []
    for name in levels:
        precision = parse_precision(name, torch.device(device_type))
        if precision is Precision.INT4 and group_size % 32:
            raise ConfigError(f"INT4 group size must be a positive multiple of 32, got {group_size}")
        dtype = precision.dtype
        model = meta_model(config, precision, group_size)
        weights = weight_bytes(model, include_meta=True)["total"]
        counts = parameter_counts(model, experts_per_token(config))
        kv = kv_bytes_per_token(config, dtype)
        chunk = encode if _prefills_whole_prompt(config) else min(encode, PREFILL_CHUNK)
        encode_act = _activation_bytes(config, chunk, encode, dtype)
        generate_act = _activation_bytes(config, 1, generate, dtype)
        encode_tensors = weights + kv * encode + encode_act
        generate_tensors = weights + kv * generate + generate_act
        results.append(
            Estimate(
                level=precision.value,
                weights_bytes=weights,
                kv_bytes_per_token=kv,
                encode_activation_bytes=encode_act,
                generate_activation_bytes=generate_act,
                runtime_bytes=overhead,
                encode_peak_bytes=round(encode_tensors * (1 + slack)) + overhead,
                generate_peak_bytes=round(generate_tensors * (1 + slack)) + overhead,
                parameters=counts["total"],
                active_parameters=counts["active"],
            )
        )
    return results


def spec_weights_bytes(spec) -> int:
    """The weights bytes of a ModelSpec (a model folder or "embedded") from its config.json alone, before loading:
    what the hub charges a model it is asked to load beside the others (ConfigError: cannot tell)."""
    from .memory import source_config

    device = resolve_device(spec.device)
    _, cfg = source_config(spec.path)
    return estimate(cfg, [spec.precision], 1, 1, device.type, spec.group_size)[0].weights_bytes


def parameters_line(total: int, active: int) -> str:
    """Parameters in words, for the CLI, the model card and the Quantization page: a MoE model's active share too."""

    def amount(n: int) -> str:
        return f"{n / 1e9:,.2f} B" if n >= 1e9 else f"{n / 1e6:,.1f} M"

    if active and active != total:
        return f"{amount(total)} parameters, {amount(active)} active per token (mixture of experts: all stay in memory)"
    return f"{amount(total)} parameters"


def published(source_key: str, encode: int, generate: int) -> dict | None:
    """Published (encode, generate) peaks per level for these exact conditions, or None."""
    return PUBLISHED.get((source_key.strip().lower(), encode, generate))
