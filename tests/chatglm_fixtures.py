"""Tiny ChatGLM-6B/ChatGLM2/ChatGLM3 checkpoints in the original THUDM layout (random weights from a fixed seed,
fp16 on disk), SentencePiece models trained here, and an independent plain-torch forward of the ChatGLM2
architecture.

This module imports only torch and sentencepiece (never glm_core): tests/reference/make_reference.py imports it
in the separate environment that runs THUDM's original code, and the checkpoints it builds there must be
byte-identical to the ones the tests build here (tests/test_reference_fidelity.py checks their SHA-256)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import sentencepiece as spm
import torch
import torch.nn.functional as F

CORPUS = [
    "The capital of France is Paris. The capital of Germany is Berlin.",
    "Hello, how are you today? I am fine, thank you very much.",
    "[Round 1] 问：你好 答：你好！我是人工智能助手。",
    "[Round 2] 问：今天天气怎么样？ 答：今天天气很好，阳光明媚。",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "def add(a, b):    return a + b  # code with indentation and symbols {} [] ()",
    "机器学习是人工智能的一个分支，它使计算机能够从数据中学习。",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 and punctuation . , ; : ! ?",
] * 20


def cpu_vendor() -> str:
    """/proc/cpuinfo's vendor_id (GenuineIntel, AuthenticAMD), or "" where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("vendor_id")), "")


def assert_close_to_reference(actual: torch.Tensor, expected: torch.Tensor, environment: dict) -> None:
    """fp32 logits against the original's, recorded on a CPU described by the record's `environment`: within
    1e-4 on a CPU like that one (the same vendor and torch kernels), within 1e-3 elsewhere. fp32 sums run in
    another order on another CPU (softmax under AVX-512; MKL's products on Intel against AMD) and a random tiny
    model amplifies a last bit to ~3e-4 in its logits (ChatGLM-6B's 28-layer residual scale most)."""
    same_cpu = (
        environment.get("cpu_vendor") == cpu_vendor()
        and environment.get("cpu_capability") == torch.backends.cpu.get_cpu_capability()
    )
    tolerance = 1e-4 if same_cpu else 1e-3
    torch.testing.assert_close(actual, expected, atol=tolerance, rtol=tolerance)


def train_sentencepiece(path: Path, vocab_size: int = 700) -> Path:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=False,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    path.write_bytes(model.getvalue())
    return path


def chatglm2_config(pieces: int, name: str = "THUDM/chatglm2-6b", **overrides) -> dict:
    # The fields and names of THUDM's config.json, at a tiny size.
    config = {
        "_name_or_path": name,
        "model_type": "chatglm",
        "architectures": ["ChatGLMModel"],
        "auto_map": {
            "AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
        },
        "add_bias_linear": False,
        "add_qkv_bias": True,
        "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False,
        "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True,
        "bias_dropout_fusion": True,
        "ffn_hidden_size": 96,
        "fp32_residual_connection": False,
        "hidden_dropout": 0.0,
        "hidden_size": 64,
        "kv_channels": 16,
        "layernorm_epsilon": 1e-05,
        "multi_query_attention": True,
        "multi_query_group_num": 2,
        "num_attention_heads": 4,
        "num_layers": 2,
        "original_rope": True,
        "padded_vocab_size": pieces + 16,
        "post_layer_norm": True,
        "rmsnorm": True,
        "seq_length": 2048,
        "use_cache": True,
        "torch_dtype": "float16",
        "transformers_version": "4.30.2",
        "tie_word_embeddings": False,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    config.update(overrides)
    return config


def random_state_dict(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, ffn, hn = config["hidden_size"], config["ffn_hidden_size"], config["kv_channels"]
    qkv = config["num_attention_heads"] * hn + 2 * config["multi_query_group_num"] * hn

    def rand(*shape, std=0.15):
        return (torch.randn(*shape, generator=g) * std).half()

    sd = {"transformer.embedding.word_embeddings.weight": rand(config["padded_vocab_size"], h, std=1.0)}
    for i in range(config["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        sd[p + "input_layernorm.weight"] = (1 + rand(h, std=0.1).float()).half()
        sd[p + "self_attention.query_key_value.weight"] = rand(qkv, h)
        sd[p + "self_attention.query_key_value.bias"] = rand(qkv, std=0.1)
        sd[p + "self_attention.dense.weight"] = rand(h, config["num_attention_heads"] * hn)
        sd[p + "post_attention_layernorm.weight"] = (1 + rand(h, std=0.1).float()).half()
        sd[p + "mlp.dense_h_to_4h.weight"] = rand(2 * ffn, h)
        sd[p + "mlp.dense_4h_to_h.weight"] = rand(h, ffn)
    sd["transformer.encoder.final_layernorm.weight"] = (1 + rand(h, std=0.1).float()).half()
    sd["transformer.output_layer.weight"] = rand(config["padded_vocab_size"], h, std=0.5)
    sd["transformer.rotary_pos_emb.inv_freq"] = torch.ones(hn // 4).half()  # stored by THUDM, recomputed by us
    return sd


QUANTIZED = (
    "self_attention.query_key_value.weight",
    "self_attention.dense.weight",
    "mlp.dense_h_to_4h.weight",
    "mlp.dense_4h_to_h.weight",
)


def quantize_thudm(sd: dict, bits: int) -> tuple[dict, dict]:
    """(checkpoint state dict with int8/int4-packed weights and per-row scales, the dequantized reference)."""
    stored, reference = {}, {}
    for key, w in sd.items():
        if not key.endswith(QUANTIZED):
            stored[key] = reference[key] = w
            continue
        limit = 127 if bits == 8 else 7
        scale = (w.float().abs().amax(dim=1) / limit).half()
        q = torch.round(w.float() / scale.float()[:, None]).clamp(-limit - 1, limit).to(torch.int8)
        reference[key] = q.float() * scale.float()[:, None]
        if bits == 4:  # two values a byte, the even element in the high nibble
            q = ((q[:, 0::2] << 4) | (q[:, 1::2] & 0x0F)).to(torch.int8)
        stored[key] = q
        stored[key[: -len("weight")] + "weight_scale"] = scale
    return stored, reference


def write_checkpoint(
    folder: Path, tokenizer_model: Path, config: dict, sd: dict, layout: str = "bin", tokenizer_name: str | None = None
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "tokenizer.model").write_bytes(tokenizer_model.read_bytes())
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "name_or_path": tokenizer_name or config["_name_or_path"],
                "remove_space": False,
                "do_lower_case": False,
                "tokenizer_class": "ChatGLMTokenizer",
                "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
            },
            indent=2,
        )
    )
    if layout == "bin":
        torch.save(sd, folder / "pytorch_model.bin")
    elif layout == "sharded-bin":
        keys = list(sd)
        halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
        weight_map = {}
        for n, part in enumerate(halves, start=1):
            name = f"pytorch_model-0000{n}-of-00002.bin"
            torch.save({k: sd[k] for k in part}, folder / name)
            weight_map.update({k: name for k in part})
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    elif layout == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    return folder


# ---- an independent forward of the ChatGLM2 architecture, from its description --------------------------------


def reference_logits(sd: dict, config: dict, ids: list[int]) -> torch.Tensor:
    """RMSNorm, multi-query attention with grouped K/V, rotary on the first half of each head with interleaved
    pairs, SwiGLU, pre-norm residuals, final RMSNorm, output layer. fp32 throughout."""
    w = {k: v.float() for k, v in sd.items()}
    heads, groups, hn = config["num_attention_heads"], config["multi_query_group_num"], config["kv_channels"]
    eps, base = config["layernorm_epsilon"], 10000.0 * config.get("rope_ratio", 1)
    n = len(ids)

    def rmsnorm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    rot = hn // 2  # rotary on the first half of each head
    theta = 1.0 / base ** (torch.arange(0, rot, 2).float() / rot)
    angles = torch.arange(n).float()[:, None] * theta[None, :]  # [n, rot/2]
    cos, sin = angles.cos(), angles.sin()

    def rotary(x):  # x: [n, heads, hn]
        x_rot, x_pass = x[..., :rot], x[..., rot:]
        pairs = x_rot.reshape(n, x.shape[1], rot // 2, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        c, s = cos[:, None, :], sin[:, None, :]
        rotated = torch.stack([a * c - b * s, b * c + a * s], dim=-1).reshape(n, x.shape[1], rot)
        return torch.cat([rotated, x_pass], dim=-1)

    x = w["transformer.embedding.word_embeddings.weight"][torch.tensor(ids)]
    mask = torch.full((n, n), float("-inf")).triu(1)
    for i in range(config["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        h = rmsnorm(x, w[p + "input_layernorm.weight"])
        qkv = h @ w[p + "self_attention.query_key_value.weight"].T + w[p + "self_attention.query_key_value.bias"]
        q, k, v = qkv.split([heads * hn, groups * hn, groups * hn], dim=-1)
        q, k, v = q.view(n, heads, hn), k.view(n, groups, hn), v.view(n, groups, hn)
        q, k = rotary(q), rotary(k)
        per_group = heads // groups
        outputs = []
        for head in range(heads):
            g = head // per_group
            scores = (q[:, head] @ k[:, g].T) / math.sqrt(hn) + mask
            outputs.append(torch.softmax(scores, dim=-1) @ v[:, g])
        attn = torch.cat(outputs, dim=-1) @ w[p + "self_attention.dense.weight"].T
        x = x + attn
        h = rmsnorm(x, w[p + "post_attention_layernorm.weight"])
        gate, up = (h @ w[p + "mlp.dense_h_to_4h.weight"].T).chunk(2, dim=-1)
        x = x + (F.silu(gate) * up) @ w[p + "mlp.dense_4h_to_h.weight"].T
    x = rmsnorm(x, w["transformer.encoder.final_layernorm.weight"])
    return x @ w["transformer.output_layer.weight"].T


# ---- ChatGLM-6B (first generation): ice_text tokenizer, THUDM config and layout -------------------------------
# (Its expected outputs are not written here: they are what THUDM's own code produced, tests/reference/.)

ICE_SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
ICE_TEXT_SYMBOLS = ["<n>", "<|tab|>"] + [f"<|blank_{i}|>" for i in range(2, 81)]


def _ice_rewrite(text: str) -> str:
    """The training corpus in ice_text's form (newline, tab and blank runs as their pieces); training data only."""
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    for n in range(80, 1, -1):
        text = text.replace(" " * n, f"<|blank_{n}|>")
    return text


def train_ice_sentencepiece(path: Path, vocab_size: int = 800) -> Path:
    """An ice_text.model stand-in: <unk> <s> </s> <pad> at 0..3 as in the real one; the newline, tab and
    blank-run pieces as user-defined symbols (matched in text, as "<n>" is id 4 in the real vocabulary); the
    special pieces ([MASK] [gMASK] <sop> <eop> ...) as control symbols, so that SentencePiece decodes them to
    nothing: the original chat() decodes the reply with its final <eop> (skip_special_tokens=False) and THUDM's
    replies carry no "<eop>" text. Trained on the rewritten corpus."""
    corpus = [_ice_rewrite(line) for line in CORPUS + ["a\tb\n  c   d\n\n" + " " * 90 + "e"] * 5]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        user_defined_symbols=ICE_TEXT_SYMBOLS,
        control_symbols=ICE_SPECIALS,
        hard_vocab_limit=False,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    path.write_bytes(model.getvalue())
    return path


def chatglm6b_config(sp_path: Path, num_image_tokens: int = 0, **overrides) -> dict:
    """THUDM/chatglm-6b's config.json fields at a tiny size; the special ids are the pieces' ids + the offset."""
    sp = spm.SentencePieceProcessor(model_file=str(sp_path))
    special = {name: sp.piece_to_id(name) + num_image_tokens for name in ICE_SPECIALS}
    config = {
        "_name_or_path": "THUDM/chatglm-6b",
        "architectures": ["ChatGLMModel"],
        "auto_map": {
            "AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
        },
        "bos_token_id": special["<sop>"],
        "eos_token_id": special["<eop>"],
        "mask_token_id": special["[MASK]"],
        "gmask_token_id": special["[gMASK]"],
        "pad_token_id": 3,
        "hidden_size": 64,
        "inner_hidden_size": 256,
        "layernorm_epsilon": 1e-05,
        "max_sequence_length": 2048,
        "model_type": "chatglm",
        "num_attention_heads": 4,
        "num_layers": 3,
        "position_encoding_2d": True,
        "quantization_bit": 0,
        "pre_seq_len": None,
        "prefix_projection": False,
        "torch_dtype": "float16",
        "transformers_version": "4.27.1",
        "use_cache": True,
        "vocab_size": sp.get_piece_size() + num_image_tokens + 16,
    }
    config.update(overrides)
    return config


def chatglm6b_state_dict(config: dict, seed: int = 0, std: float = 0.15) -> dict[str, torch.Tensor]:
    """Random fp16 weights under the original names, the stored rotary buffers and the tied output layer included.
    `std`: of the attention and MLP weights (with the tied output layer and the residual on the normalised input,
    a small std makes a random model repeat its last input token; a larger one gives varied greedy replies)."""
    g = torch.Generator().manual_seed(seed)
    h, ffn, heads = config["hidden_size"], config["inner_hidden_size"], config["num_attention_heads"]
    rot = h // heads // 2

    def rand(*shape, std=std):
        return (torch.randn(*shape, generator=g) * std).half()

    sd = {"transformer.word_embeddings.weight": rand(config["vocab_size"], h, std=1.0)}
    for i in range(config["num_layers"]):
        p = f"transformer.layers.{i}."
        sd[p + "input_layernorm.weight"] = (1 + rand(h, std=0.1).float()).half()
        sd[p + "input_layernorm.bias"] = rand(h, std=0.1)
        sd[p + "attention.rotary_emb.inv_freq"] = (1.0 / 10000 ** (torch.arange(0, rot, 2).float() / rot)).half()
        sd[p + "attention.query_key_value.weight"] = rand(3 * h, h)
        sd[p + "attention.query_key_value.bias"] = rand(3 * h, std=0.1)
        sd[p + "attention.dense.weight"] = rand(h, h)
        sd[p + "attention.dense.bias"] = rand(h, std=0.1)
        sd[p + "post_attention_layernorm.weight"] = (1 + rand(h, std=0.1).float()).half()
        sd[p + "post_attention_layernorm.bias"] = rand(h, std=0.1)
        sd[p + "mlp.dense_h_to_4h.weight"] = rand(ffn, h)
        sd[p + "mlp.dense_h_to_4h.bias"] = rand(ffn, std=0.1)
        sd[p + "mlp.dense_4h_to_h.weight"] = rand(h, ffn)
        sd[p + "mlp.dense_4h_to_h.bias"] = rand(h, std=0.1)
    sd["transformer.final_layernorm.weight"] = (1 + rand(h, std=0.1).float()).half()
    sd["transformer.final_layernorm.bias"] = rand(h, std=0.1)
    sd["lm_head.weight"] = sd["transformer.word_embeddings.weight"].clone()  # tied; THUDM's files store a copy
    return sd


GLM6B_QUANTIZED = (
    "attention.query_key_value.weight",
    "attention.dense.weight",
    "mlp.dense_h_to_4h.weight",
    "mlp.dense_4h_to_h.weight",
)


def quantize_thudm_glm6b(sd: dict, bits: int, embedding: bool = False) -> tuple[dict, dict]:
    """As THUDM's quantization.py: symmetric per-row scale (max |w| / (2^(bits-1) - 1), fp16), int8 rows or int4
    two a byte, even element in the high nibble. `embedding` as the int4-qe checkpoint (word embedding and
    output layer quantized too)."""
    stored, reference = {}, {}
    for key, w in sd.items():
        quantize = key.endswith(GLM6B_QUANTIZED) or (
            embedding and key in ("transformer.word_embeddings.weight", "lm_head.weight")
        )
        if not quantize:
            stored[key] = reference[key] = w
            continue
        limit = 2 ** (bits - 1) - 1
        scale = (w.float().abs().amax(dim=1) / limit).half()
        q = torch.round(w.float() / scale.float()[:, None]).clamp(-limit - 1, limit).to(torch.int8)
        reference[key] = q.float() * scale.float()[:, None]
        if bits == 4:
            q = ((q[:, 0::2] << 4) | (q[:, 1::2] & 0x0F)).to(torch.int8)
        stored[key] = q
        stored[key[: -len("weight")] + "weight_scale"] = scale
    return stored, reference


def write_chatglm6b_checkpoint(
    folder: Path, ice_model: Path, config: dict, sd: dict, layout: str = "sharded-bin", num_image_tokens: int = 0
) -> Path:
    """The original THUDM/chatglm-6b folder layout: config.json, ice_text.model, tokenizer_config.json and
    pytorch_model-0000N-of-0000M.bin with its index (or one pytorch_model.bin)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "ice_text.model").write_bytes(ice_model.read_bytes())
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "name_or_path": config["_name_or_path"],
                "bos_token": "<sop>",
                "eos_token": "<eop>",
                "end_token": "</s>",
                "gmask_token": "[gMASK]",
                "mask_token": "[MASK]",
                "pad_token": "<pad>",
                "unk_token": "<unk>",
                "remove_space": False,
                "do_lower_case": False,
                "num_image_tokens": num_image_tokens,
                "padding_side": "left",
                "tokenizer_class": "ChatGLMTokenizer",
                "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
            },
            indent=2,
        )
    )
    if layout == "bin":
        torch.save(sd, folder / "pytorch_model.bin")
    else:
        keys = list(sd)
        parts = [keys[: len(keys) // 3], keys[len(keys) // 3 : 2 * len(keys) // 3], keys[2 * len(keys) // 3 :]]
        weight_map = {}
        for n, part in enumerate(parts, start=1):
            name = f"pytorch_model-0000{n}-of-0000{len(parts)}.bin"
            torch.save({k: sd[k] for k in part}, folder / name)
            weight_map.update({k: name for k in part})
        total = sum(t.numel() * t.element_size() for t in sd.values())
        (folder / "pytorch_model.bin.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    return folder


# ---- the checkpoints of the recorded reference outputs (tests/reference/) -----------------------------------

REFERENCE_CHECKPOINTS = {
    # name: (family, what it is)
    "chatglm-6b": (
        "chatglm-6b",
        "3 layers (not 28: the residual scale stays sqrt(2 * 28)), fp16 weights, sharded .bin",
    ),
    "chatglm-6b-28-layers": ("chatglm-6b", "28 layers (the real count), fp16 weights, one .bin"),
    "chatglm-6b-int8": ("chatglm-6b", "2 layers, pre-quantized as THUDM's chatglm-6b-int8 (int8 rows, fp16 scales)"),
    "chatglm-6b-int4": ("chatglm-6b", "2 layers, pre-quantized as THUDM's chatglm-6b-int4 (two a byte, fp16 scales)"),
    "chatglm2-6b": ("chatglm2-6b", "2 layers, fp16 weights, one .bin"),
    "chatglm3-6b": ("chatglm3-6b", "2 layers, fp16 weights, sharded .bin with its index"),
    "chatglm2-6b-int8": ("chatglm2-6b", "2 layers, pre-quantized as THUDM's chatglm2-6b-int8 layout"),
    "chatglm2-6b-int4": ("chatglm2-6b", "2 layers, pre-quantized as THUDM's chatglm2-6b-int4 layout"),
}


def build_reference_checkpoint(name: str, root: Path) -> tuple[Path, dict]:
    """The folder (under `root`) and config.json of one reference checkpoint, built from fixed seeds. Byte-identical
    wherever torch and sentencepiece are the same versions (torch.save and SentencePiece training, one thread, are
    deterministic): the reference files record each file's SHA-256."""
    family = REFERENCE_CHECKPOINTS[name][0]
    root.mkdir(parents=True, exist_ok=True)
    if family == "chatglm-6b":
        ice = root / "ice_text.model"
        if not ice.exists():
            train_ice_sentencepiece(ice)
        # vocab_size = the piece count, as the real ice_text.model and config.json (130528): no padded rows, which
        # a random model could pick and the original tokenizer cannot decode.
        pieces = spm.SentencePieceProcessor(model_file=str(ice)).get_piece_size()
        if name == "chatglm-6b":
            config = chatglm6b_config(ice, vocab_size=pieces)
            sd, layout = chatglm6b_state_dict(config, std=0.5), "sharded-bin"
        elif name == "chatglm-6b-28-layers":
            config = chatglm6b_config(
                ice, vocab_size=pieces, num_layers=28, hidden_size=32, num_attention_heads=2, inner_hidden_size=64
            )
            sd, layout = chatglm6b_state_dict(config, std=0.5), "bin"
        else:
            bits = int(name[-1])
            config = chatglm6b_config(
                ice, vocab_size=pieces, quantization_bit=bits, _name_or_path=f"THUDM/{name}", num_layers=2
            )
            sd, layout = quantize_thudm_glm6b(chatglm6b_state_dict(config, seed=4, std=0.5), bits)[0], "bin"
        return write_chatglm6b_checkpoint(root / name, ice, config, sd, layout=layout), config
    sp = root / "tokenizer.model"
    if not sp.exists():
        train_sentencepiece(sp)
    pieces = spm.SentencePieceProcessor(model_file=str(sp)).get_piece_size()
    # No padded rows beyond the tokenizer's ids (5 special ids for ChatGLM2, 9 for ChatGLM3): a random model could
    # pick one, and the original ChatGLM2 tokenizer cannot decode it ("piece id is out of range").
    if name == "chatglm2-6b":
        config = chatglm2_config(pieces, padded_vocab_size=pieces + 5)
        sd, layout = random_state_dict(config), "bin"
    elif name == "chatglm3-6b":
        config = chatglm2_config(pieces, name="THUDM/chatglm3-6b", padded_vocab_size=pieces + 9)
        sd, layout = random_state_dict(config, seed=1), "sharded-bin"
    else:
        bits = int(name[-1])
        config = chatglm2_config(pieces, quantization_bit=bits, name=f"THUDM/{name}", padded_vocab_size=pieces + 5)
        sd, layout = quantize_thudm(random_state_dict(config, seed=4), bits)[0], "bin"
    return write_checkpoint(root / name, sp, config, sd, layout), config


def file_hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of every file of a checkpoint folder, by name."""
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}
