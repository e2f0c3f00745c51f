"""ChatGLM-6B (first generation, THUDM/chatglm-6b) natively: its config, its module and its checkpoint loader.

No library runs this architecture without its remote code (transformers has no class for it, vLLM covers only
ChatGLM2/3), so it is written here from THUDM's modeling_chatglm.py (chatglm.cpp's ChatGLMForCausalLM agrees):

- 2D rotary positions. Each head's dimensions split in two halves; the first half rotates by the position id,
  the second by the block position id, each in the rotate-half (non-interleaved) form with
  inv_freq = 1 / 10000^(2i / (head_dim / 2)) rounded to FP16, as the original's buffer is. Before <sop> a token's
  position is its index and its block position 0; from <sop> on the position stays at the [gMASK] (else [MASK])
  index and the block position counts 1, 2, ... (get_position_ids, and the decode-time update that adds 1 to the
  block position only).
- Attention: every token sees every token before <sop> (the prompt attends in both directions) and, causally,
  those up to itself (get_masks). One fused qkv Linear with bias whose output is [q k v] per head, interleaved
  head by head. The original divides the query by sqrt(head_dim) * (layer + 1) and multiplies the scores by
  (layer + 1) again before the softmax (an FP16 overflow guard): the net scale is 1 / sqrt(head_dim).
- Block: pre-LayerNorm; the residual is the *normalised* input times alpha = sqrt(2 * 28):
  h = ln1(x); x = h * alpha + attn(h); h = ln2(x); x = h * alpha + mlp(h). 28 whatever config.json's
  num_layers: the original computes alpha from GLMBlock's own `num_layers=28` default, which ChatGLMModel never
  passes (THUDM's code run on a 3-layer checkpoint: tests/reference/chatglm-6b.json). MLP: Linear (bias), GELU (tanh
  approximation, the original's gelu_impl), Linear (bias). Final LayerNorm; the output layer is tied to the word
  embedding (chatglm.cpp's converter asserts they are equal).

Names follow the checkpoint's (transformer.layers.N.attention.query_key_value ...), so loading is an identity map
but for the stored rotary buffers and the tied output layer, which are not read.

The engine contract: the engine hands a transformers DynamicCache (`DynamicCache(config=model.config)`) and feeds
the prompt, then one token at a time. Positions and the mask depend on where [gMASK] and <sop> are, which may lie
in the cached part, so the ids the cache holds are kept on the cache object itself (`CACHED_IDS`), cut back to
the cache's length on every call: a cache the engine `crop()`s stays consistent.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig

from ...settings import DEFAULT_GROUP_SIZE
from ..checkpoint import CheckpointError, fill_from_checkpoint, weight_files
from ..precision import Precision
from .checkpoint import dequantize

CACHED_IDS = "chatglm6b_ids"  # attribute of the DynamicCache: the token ids whose keys and values it holds
UNKNOWN_ID = -1  # an id the cache holds keys for but that this module did not see (filled from outside)
ORIGINAL_ALPHA_LAYERS = 28  # the residual scale's layer count: GLMBlock's default, never the config's (module doc)


class ChatGLM6BConfig(PreTrainedConfig):
    """THUDM/chatglm-6b's config.json under the standard names transformers' caches and our estimator read."""

    model_type = "chatglm6b"

    vocab_size: int = 130528
    hidden_size: int = 4096
    intermediate_size: int = 16384
    num_hidden_layers: int = 28
    num_attention_heads: int = 32
    layernorm_epsilon: float = 1e-5
    max_position_embeddings: int = 2048
    mask_token_id: int = 130000
    gmask_token_id: int = 130001
    bos_token_id: int | None = 130004  # <sop>
    eos_token_id: int | list[int] | None = 130005  # <eop>
    pad_token_id: int | None = 3
    tie_word_embeddings: bool = True
    use_cache: bool = True


def glm6b_config(cfg: dict) -> ChatGLM6BConfig:
    """THUDM config.json -> ChatGLM6BConfig; CheckpointError for what this module does not implement."""
    if cfg.get("position_encoding_2d") is False:
        raise CheckpointError("position_encoding_2d false (1D positions) is not supported; ChatGLM-6B uses 2D")
    if cfg.get("pre_seq_len"):
        raise CheckpointError("P-tuning v2 prefixes (pre_seq_len) are not supported")
    try:
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        if hidden % (heads * 4):
            raise CheckpointError(f"hidden_size {hidden} is not a multiple of 4 x {heads} heads (2D rotary halves)")
        return ChatGLM6BConfig(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg.get("inner_hidden_size") or 4 * hidden),
            num_hidden_layers=int(cfg["num_layers"]),
            num_attention_heads=heads,
            layernorm_epsilon=float(cfg.get("layernorm_epsilon", 1e-5)),
            max_position_embeddings=int(cfg.get("max_sequence_length", 2048)),
            mask_token_id=int(cfg.get("mask_token_id", 130000)),
            gmask_token_id=int(cfg.get("gmask_token_id", 130001)),
            bos_token_id=int(cfg.get("bos_token_id", 130004)),
            eos_token_id=int(cfg.get("eos_token_id", 130005)),
            pad_token_id=int(cfg.get("pad_token_id", 3)),
        )
    except KeyError as exc:
        raise CheckpointError(f"config.json lacks {exc.args[0]!r}, which a ChatGLM-6B config has") from None


# ---- positions and mask ------------------------------------------------------------------------------------


def layout(ids: list[int], start: int, config: ChatGLM6BConfig) -> tuple[list[int], list[int], int]:
    """(position ids, block position ids) of ids[start:], and the context length (index of <sop>; everything
    before it is seen by every token). Without <sop> the whole sequence is context."""
    n = len(ids)
    context = ids.index(config.bos_token_id) if config.bos_token_id in ids else n
    mask_token = config.gmask_token_id if config.gmask_token_id in ids else config.mask_token_id
    # Without any mask token the original fails; chatglm.cpp takes the index just before <sop>.
    mask_position = ids.index(mask_token) if mask_token in ids else max(context - 1, 0)
    positions = [t if t < context else mask_position for t in range(start, n)]
    blocks = [0 if t < context else t - context + 1 for t in range(start, n)]
    return positions, blocks, context


def visibility(start: int, total: int, context: int, device) -> torch.Tensor | None:
    """[new, total] bool: query start+i sees key j when j < context or j <= start+i. None when all are seen."""
    if total - start == 1:
        return None  # one query at the end sees everything there is
    rows = torch.arange(start, total, device=device)[:, None]
    columns = torch.arange(total, device=device)[None, :]
    return (columns < context) | (columns <= rows)


def rotary_inv_freq(dim: int, device) -> torch.Tensor:
    # Rounded to FP16 as the original's RotaryEmbedding(precision=torch.half) stores it (and the checkpoint holds).
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    return inv_freq.half().float()


def rotary_tables(positions: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, [len(positions), dim], in float32 (the original's FP32 path: half-rounded inv_freq, fp32 angles)."""
    angles = positions.float()[:, None] * rotary_inv_freq(dim, positions.device)[None, :]
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos(), emb.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


# ---- the module -------------------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    def __init__(self, config: ChatGLM6BConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.heads
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=True)

    def forward(self, x, rotary, mask, cache):
        batch, length, _ = x.shape
        qkv = self.query_key_value(x).view(batch, length, self.heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.split(self.head_dim, dim=-1)  # [q k v] per head
        (cos_p, sin_p), (cos_b, sin_b) = rotary
        half = self.head_dim // 2
        q = torch.cat([rotate(q[..., :half], cos_p, sin_p), rotate(q[..., half:], cos_b, sin_b)], dim=-1)
        k = torch.cat([rotate(k[..., :half], cos_p, sin_p), rotate(k[..., half:], cos_b, sin_b)], dim=-1)
        if cache is not None:
            k, v = cache.update(k, v.contiguous(), self.layer_idx)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # scale 1/sqrt(head_dim): see the module doc
        return self.dense(out.transpose(1, 2).reshape(batch, length, -1))


class MLP(nn.Module):
    def __init__(self, config: ChatGLM6BConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size, bias=True)

    def forward(self, x):
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh"))


class GLMBlock(nn.Module):
    def __init__(self, config: ChatGLM6BConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = SelfAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = MLP(config)
        self.alpha = math.sqrt(2 * ORIGINAL_ALPHA_LAYERS)

    def forward(self, x, rotary, mask, cache):
        h = self.input_layernorm(x)
        x = h * self.alpha + self.attention(h, rotary, mask, cache)
        h = self.post_attention_layernorm(x)
        return h * self.alpha + self.mlp(h)


class ChatGLM6BModel(nn.Module):
    def __init__(self, config: ChatGLM6BConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GLMBlock(config, i) for i in range(config.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)


class ChatGLM6BForCausalLM(nn.Module):
    """The first-generation ChatGLM with the transformers call surface the engine uses:
    `model(input_ids=[[...]], past_key_values=DynamicCache, use_cache=True, logits_to_keep=1).logits`."""

    # The engine's contract: decode this model per sequence, not in the slot batch (positions depend on where
    # each sequence's <sop> is), and feed the whole prompt in one forward (it attends in both directions, so a
    # prompt split in chunks would see only the chunks before it).
    batchable = False
    prefill_whole_prompt = True
    all_tied_weights_keys = {"lm_head.weight": "transformer.word_embeddings.weight"}
    _no_split_modules = ["GLMBlock"]

    def __init__(self, config: ChatGLM6BConfig):
        super().__init__()
        self.config = config
        self.transformer = ChatGLM6BModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def get_input_embeddings(self) -> nn.Module:
        return self.transformer.word_embeddings

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, module: nn.Module) -> None:
        self.lm_head = module

    def tie_weights(self) -> None:
        self.lm_head.weight = self.transformer.word_embeddings.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        past_key_values=None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **_ignored,
    ):
        from transformers import DynamicCache
        from transformers.modeling_outputs import CausalLMOutputWithPast

        if input_ids.shape[0] != 1:
            raise ValueError("ChatGLM-6B runs one sequence per forward (its positions follow each sequence's <sop>)")
        cache = past_key_values
        if cache is None and use_cache:
            cache = DynamicCache(config=self.config)
        start = cache.get_seq_length() if cache is not None else 0
        held = list(getattr(cache, CACHED_IDS, []))[:start] if cache is not None else []
        ids = [UNKNOWN_ID] * (start - len(held)) + held + input_ids[0].tolist()
        positions, blocks, context = layout(ids, start, self.config)
        device = input_ids.device
        half = self.config.hidden_size // self.config.num_attention_heads // 2
        x = self.transformer.word_embeddings(input_ids)
        rotary = tuple(
            tuple(t.to(x.dtype) for t in rotary_tables(torch.tensor(p, device=device), half))
            for p in (positions, blocks)
        )
        mask = visibility(start, len(ids), context, device)
        for layer in self.transformer.layers:
            x = layer(x, rotary, mask, cache)
        if cache is not None:
            setattr(cache, CACHED_IDS, ids)
        x = self.transformer.final_layernorm(x)
        logits = self.lm_head(x[:, -logits_to_keep:] if logits_to_keep else x)
        return CausalLMOutputWithPast(logits=logits, past_key_values=cache if use_cache else None)


# ---- checkpoint ---------------------------------------------------------------------------------------------


class _Remapper:
    """Checkpoint tensors -> module tensors. The names are the same; the rotary buffers (recomputed, same values)
    and the tied output layer (the embedding is read) are skipped; a pre-quantized weight (THUDM
    chatglm-6b-int4/int8, and int4-qe whose embedding is quantized too: int8 rows or int4 two a byte, per-row
    `weight_scale`) waits for its scale and is dequantized to float as it arrives."""

    def __init__(self, cfg: dict):
        self.bits = int(cfg.get("quantization_bit") or 0)
        self.pending: dict[str, dict[str, torch.Tensor]] = {}

    def __call__(self, key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        if key.endswith("rotary_emb.inv_freq") or key.startswith("lm_head."):
            return []
        m = re.fullmatch(r"(.+)\.(weight|weight_scale)", key)
        if m and (m.group(2) == "weight_scale" or tensor.dtype == torch.int8):
            if not self.bits:
                raise CheckpointError(f"{key} is quantized but config.json has no quantization_bit")
            parts = self.pending.setdefault(m.group(1), {})
            parts[m.group(2)] = tensor
            if len(parts) < 2:
                return []
            del self.pending[m.group(1)]
            return [(m.group(1) + ".weight", dequantize(parts["weight"], parts["weight_scale"], self.bits))]
        return [(key, tensor)]


def load_glm6b_model(
    folder: Path,
    cfg: dict,
    precision: Precision,
    device: torch.device,
    progress: Callable[[float, str], None],
    group_size: int = DEFAULT_GROUP_SIZE,
) -> ChatGLM6BForCausalLM:
    """The module built on the meta device and filled shard by shard (pytorch_model-0000N-of-0000M.bin with its
    index, a single .bin, or safetensors; .bin read with weights_only=True), quantized as each weight is read."""
    config = glm6b_config(cfg)
    files = weight_files(folder)
    with torch.device("meta"):
        model = ChatGLM6BForCausalLM(config)
    return fill_from_checkpoint(model, files, _Remapper(cfg), precision, device, progress, group_size)


def ice_tokenizer_file(folder: Path) -> Path:
    path = folder / "ice_text.model"
    if not path.is_file():
        raise CheckpointError(f"{folder.name} has no ice_text.model (the SentencePiece model ChatGLM-6B needs)")
    return path
