"""ChatGLM2/ChatGLM3 checkpoints in the original THUDM layout, loaded natively into transformers' GlmForCausalLM.

No remote code runs: config.json and the weight names are remapped here; `checkpoint.fill_from_checkpoint` reads
the weights tensor by tensor (safetensors or mmapped .bin files, the latter with `weights_only=True`) through
this remap, so memory peaks near the model's size, not twice it.
Pre-quantized THUDM checkpoints (`quantization_bit` 4 or 8: int8 tensors, int4 packed two a byte, per-row
`weight_scale`) are dequantized tensor by tensor to the chosen float precision.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch

from ...settings import DEFAULT_GROUP_SIZE
from ..checkpoint import CheckpointError, fill_from_checkpoint, read_json, weight_files
from ..precision import Precision

FAMILIES = ("chatglm2", "chatglm3")
LINEAR_NAMES = {
    "self_attention.dense": "self_attn.o_proj",
    "mlp.dense_h_to_4h": "mlp.gate_up_proj",
    "mlp.dense_4h_to_h": "mlp.down_proj",
}


def is_first_generation(cfg: dict) -> bool:
    """ChatGLM-6B (2D positions, GELU, 130528 vocabulary) shares model_type "chatglm" but not the architecture."""
    return "position_encoding_2d" in cfg or ("padded_vocab_size" not in cfg and cfg.get("vocab_size") == 130528)


def detect_family(folder: Path, cfg: dict) -> tuple[str, str]:
    """("chatglm2" | "chatglm3", why). Names in config.json and tokenizer_config.json first, then the chat
    template, then the folder name; ChatGLM3 when nothing tells (its format also carries system prompts)."""
    tok_cfg = read_json(folder / "tokenizer_config.json")
    for source, text in (
        ("config.json", str(cfg.get("_name_or_path", ""))),
        ("tokenizer_config.json", str(tok_cfg.get("name_or_path", "")) + str(tok_cfg.get("_name_or_path", ""))),
    ):
        for family in FAMILIES:
            if family in text.lower():
                return family, f"name in {source}"
    template = json.dumps(tok_cfg.get("chat_template", "")) + json.dumps(tok_cfg.get("added_tokens_decoder", {}))
    if "<|user|>" in template:
        return "chatglm3", "role tokens in tokenizer_config.json"
    for family in FAMILIES:
        if family in folder.name.lower():
            return family, "folder name"
    return "chatglm3", "default (nothing in the folder names the generation; override the family if wrong)"


def glm_config(cfg: dict):
    """THUDM config.json -> transformers GlmConfig."""
    from transformers import GlmConfig

    try:
        heads = int(cfg["num_attention_heads"])
        groups = int(cfg["multi_query_group_num"]) if cfg.get("multi_query_attention") else heads
        return GlmConfig(
            vocab_size=int(cfg["padded_vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["ffn_hidden_size"]),
            num_hidden_layers=int(cfg["num_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=groups,
            head_dim=int(cfg.get("kv_channels") or int(cfg["hidden_size"]) // heads),
            rms_norm_eps=float(cfg.get("layernorm_epsilon", 1e-5)),
            attention_bias=bool(cfg.get("add_qkv_bias", True)),
            max_position_embeddings=int(cfg.get("seq_length", 8192)),
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0 * float(cfg.get("rope_ratio", 1) or 1),
                "partial_rotary_factor": 0.5,
            },
            pad_token_id=0,
            eos_token_id=2,
            bos_token_id=None,
            tie_word_embeddings=False,
        )
    except KeyError as exc:
        raise CheckpointError(f"config.json lacks {exc.args[0]!r}, which a ChatGLM2/3 config has") from None


def dequantize(weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """THUDM int8/int4 rows times their per-row scale. int4 packs two values a byte, even element high nibble."""
    if bits == 4:
        packed = weight.to(torch.int8)
        high = packed >> 4  # arithmetic shift keeps the sign
        low = (packed << 4) >> 4
        weight = torch.stack((high, low), dim=-1).reshape(weight.shape[0], -1)
    elif bits != 8:
        raise CheckpointError(f"quantization_bit {bits} is not supported (4 or 8)")
    return weight.float() * scale.float()[:, None]


class _Remapper:
    """Turns THUDM tensors into GlmForCausalLM tensors; holds back a quantized weight until its scale arrives."""

    def __init__(self, cfg: dict, config):
        self.bits = int(cfg.get("quantization_bit") or 0)
        q = config.num_attention_heads * config.head_dim
        kv = config.num_key_value_heads * config.head_dim
        self.qkv_sizes = [q, kv, kv]
        self.pending: dict[str, dict[str, torch.Tensor]] = {}

    def __call__(self, key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        if key.endswith("rotary_pos_emb.inv_freq"):
            return []
        if key == "transformer.embedding.word_embeddings.weight":
            return [("model.embed_tokens.weight", tensor)]
        if key == "transformer.encoder.final_layernorm.weight":
            return [("model.norm.weight", tensor)]
        if key == "transformer.output_layer.weight":
            return [("lm_head.weight", tensor)]
        m = re.fullmatch(r"transformer\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias|weight_scale)", key)
        if not m:
            raise CheckpointError(f"unexpected tensor {key!r} in a ChatGLM2/3 checkpoint")
        layer, module, kind = m.groups()
        prefix = f"model.layers.{layer}."
        if module in ("input_layernorm", "post_attention_layernorm"):
            return [(prefix + module + "." + kind, tensor)]
        if self.bits and kind in ("weight", "weight_scale"):
            parts = self.pending.setdefault(prefix + module, {})
            parts[kind] = tensor
            if len(parts) < 2:
                return []
            del self.pending[prefix + module]
            tensor, kind = dequantize(parts["weight"], parts["weight_scale"], self.bits), "weight"
        if module == "self_attention.query_key_value":
            names = ("q_proj", "k_proj", "v_proj")
            return [
                (f"{prefix}self_attn.{n}.{kind}", t.contiguous())
                for n, t in zip(names, torch.split(tensor, self.qkv_sizes, dim=0))
            ]
        if module in LINEAR_NAMES:
            return [(f"{prefix}{LINEAR_NAMES[module]}.{kind}", tensor)]
        raise CheckpointError(f"unexpected tensor {key!r} in a ChatGLM2/3 checkpoint")


def load_chatglm_model(
    folder: Path,
    cfg: dict,
    precision: Precision,
    device: torch.device,
    progress: Callable[[float, str], None],
    group_size: int = DEFAULT_GROUP_SIZE,
):
    """GlmForCausalLM with the checkpoint's weights, built on the meta device and filled shard by shard.

    At INT8/INT4 each linear weight is quantized on the device as soon as it is read, so no full-precision
    copy of the model ever exists (the seeds needed 13 GB of RAM to quantize ChatGLM2-6B)."""
    from transformers import GlmForCausalLM

    config = glm_config(cfg)
    files = weight_files(folder)
    with torch.device("meta"):
        model = GlmForCausalLM(config)
    return fill_from_checkpoint(model, files, _Remapper(cfg, config), precision, device, progress, group_size)


def spread_device_map(model, max_memory: dict) -> dict:
    """Which GPU holds which layer when one GPU is too small (the seeds' load_model_on_gpus), never splitting
    a decoder layer; accelerate does the packing."""
    from accelerate import infer_auto_device_map

    no_split = list(getattr(model, "_no_split_modules", None) or ["GlmDecoderLayer"])
    return infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)


def spread_over_gpus(model):
    """Place a CPU-loaded model over the visible GPUs (hooks move activations between them)."""
    from accelerate import dispatch_model
    from accelerate.utils import get_max_memory

    # Fill GPU 0 first and spill to the next only when needed: a model that fits one GPU stays on one.
    max_memory = {k: v for k, v in get_max_memory().items() if k != "cpu"}
    return dispatch_model(model, device_map=spread_device_map(model, max_memory))


def chatglm_tokenizer_file(folder: Path) -> Path:
    path = folder / "tokenizer.model"
    if not path.is_file():
        raise CheckpointError(f"{folder.name} has no tokenizer.model (the SentencePiece model ChatGLM needs)")
    return path
