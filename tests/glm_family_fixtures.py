"""Tiny checkpoints of the GLM generations transformers runs natively, built from transformers' own config classes
with random weights (seeded), saved as safetensors, with a tokenizer that carries a GLM-style chat template.

Families: `glm` (GLM-4-9B-chat-hf, GLM-Edge), `glm4` (GLM-4-9B-0414, GLM-Z1), `glm4_moe` (GLM-4.5, 4.5-Air, 4.6:
fused expert tensors) and `glm4_moe_lite` (GLM-4.7-Flash: MLA attention over a compressed cache). The MoE folders
give the routed experts most of the weights, as the real ones do (GLM-4.5-Air: about 94 % of its parameters).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# GLM-4.5's chat template, reduced to what the app relies on: [gMASK]<sop>, <|system|>/<|user|>/<|assistant|>
# turns, thinking inside <think>...</think>, earlier turns' thinking dropped (only turns after the last user
# message keep their reasoning_content), `enable_thinking=false` answered by "/nothink" on the user turn and an
# empty <think></think> after the assistant tag.
GLM45_TEMPLATE = (
    "[gMASK]<sop>"
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages %}{%- if m['role'] == 'user' %}{%- set ns.last_user = loop.index0 -%}{%- endif %}"
    "{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'system' %}<|system|>\n{{ m['content'] }}"
    "{%- elif m['role'] == 'user' %}<|user|>\n{{ m['content'] }}"
    "{%- if enable_thinking is defined and not enable_thinking %}/nothink{%- endif %}"
    "{%- elif m['role'] == 'assistant' %}<|assistant|>"
    "{%- if loop.index0 > ns.last_user and m.get('reasoning_content') %}\n<think>{{ m['reasoning_content'] }}</think>"
    "{%- else %}\n<think></think>{%- endif %}\n{{ m['content'] }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|assistant|>"
    "{%- if enable_thinking is defined and not enable_thinking %}\n<think></think>{%- endif %}"
    "{%- endif %}"
)

# GLM-4-0414 / GLM-4-9B-chat-hf: no thinking.
GLM4_TEMPLATE = (
    "[gMASK]<sop>{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

SPECIAL = ["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>", "<|endoftext|>"]
THINK = ["<think>", "</think>"]

FAMILIES = ("glm", "glm4", "glm4_moe", "glm4_moe_lite")


def glm_tokenizer(thinking: bool):
    """A byte-level BPE trained here on a small corpus (about 500 tokens: the embedding and the output layer stay
    small next to the experts, as in the real models), GLM's control tokens added, a GLM-style chat template; eos
    is <|endoftext|>, and <|user|> / <|observation|> end a turn too (as GLM-4's generation_config lists them)."""
    from chatglm_fixtures import CORPUS
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=480, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL})
    if thinking:  # ordinary added tokens, as GLM-4.5 has them: decoded into the reply's text
        tokenizer.add_tokens(THINK)
    tokenizer.chat_template = GLM45_TEMPLATE if thinking else GLM4_TEMPLATE
    return tokenizer


def family_config(family: str, vocab_size: int, stop_ids: list[int]):
    """A tiny config of `family` from transformers' own config class."""
    from transformers import Glm4Config, Glm4MoeConfig, Glm4MoeLiteConfig, GlmConfig

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        num_attention_heads=4,
        max_position_embeddings=4096,
        pad_token_id=stop_ids[0],
        eos_token_id=stop_ids,
        tie_word_embeddings=False,
    )
    if family == "glm":
        return GlmConfig(**common, intermediate_size=96, num_hidden_layers=2, num_key_value_heads=2, head_dim=16)
    if family == "glm4":
        return Glm4Config(**common, intermediate_size=96, num_hidden_layers=2, num_key_value_heads=2, head_dim=16)
    if family == "glm4_moe":
        # 16 routed experts of 2 x 64 x 64 each per sparse layer against 64 x 64 attention blocks: the experts hold
        # most of the weights (the embedding and output layer aside), as GLM-4.5-Air's.
        return Glm4MoeConfig(
            **common,
            intermediate_size=128,
            moe_intermediate_size=64,
            num_hidden_layers=3,
            first_k_dense_replace=1,
            num_key_value_heads=2,
            head_dim=16,
            partial_rotary_factor=0.5,
            n_routed_experts=16,
            num_experts_per_tok=4,
            n_shared_experts=1,
            n_group=1,
            topk_group=1,
            use_qk_norm=True,
        )
    if family == "glm4_moe_lite":
        return Glm4MoeLiteConfig(
            **common,
            intermediate_size=128,
            moe_intermediate_size=64,
            num_hidden_layers=3,
            mlp_layer_types=["dense", "sparse", "sparse"],
            num_key_value_heads=4,
            q_lora_rank=32,
            kv_lora_rank=64,
            qk_nope_head_dim=16,
            qk_rope_head_dim=16,
            v_head_dim=32,
            n_routed_experts=16,
            num_experts_per_tok=4,
            n_shared_experts=1,
            n_group=1,
            topk_group=1,
        )
    raise ValueError(family)


def write_glm_folder(folder: Path, family: str, seed: int = 0) -> Path:
    """A tiny `family` checkpoint in `folder`: safetensors weights (FP32), tokenizer, generation_config.json."""
    from transformers import AutoModelForCausalLM

    thinking = family in ("glm4_moe", "glm4_moe_lite")
    tokenizer = glm_tokenizer(thinking)
    stop_ids = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|user|>", "<|observation|>"])
    config = family_config(family, len(tokenizer), stop_ids)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # _init_weights leaves some tensors (router, norms) flat; give every tensor values
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0, 0.08)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # As GLM-4.5 ships it: the three ids that end a turn, its sampling defaults.
    (folder / "generation_config.json").write_text(
        json.dumps({"eos_token_id": stop_ids, "pad_token_id": stop_ids[0], "do_sample": True, "temperature": 0.6})
    )
    return folder


def write_reasoning_folder(folder: Path, prompt_opens_thinking: bool = False) -> tuple[Path, dict]:
    """A tiny GLM-4-0414 checkpoint whose weights are set, not random, so that it thinks and then answers: every
    attention and MLP output projection is zero, so the last hidden state is the current token's embedding, and
    the output layer maps each token of one chain to the next one. Greedy, it replies
    <think> THINKING </think> ANSWER <|user|> (a stop), the way GLM-4.5 does; with the thinking switched off
    (the template ends the prompt with <think></think>) it answers at once.

    Returns the folder and the chain's texts: {"reasoning", "answer"}."""
    from transformers import AutoModelForCausalLM

    tokenizer = glm_tokenizer(thinking=True)
    if prompt_opens_thinking:
        tokenizer.chat_template = GLM45_TEMPLATE.replace(
            "{%- if add_generation_prompt %}<|assistant|>", "{%- if add_generation_prompt %}<|assistant|>\n<think>"
        )
    stop_ids = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|user|>", "<|observation|>"])
    words = [tokenizer.convert_tokens_to_ids(t) for t in ("<|assistant|>", "<think>", "</think>", "<|user|>")]
    assistant, think, end_think, user = words
    thinking_ids = _distinct_ids(tokenizer, "Paris is the capital", exclude=set(words))
    answer_ids = _distinct_ids(tokenizer, "Berlin", exclude=set(words) | set(thinking_ids))
    chain = [assistant, think, *thinking_ids, end_think, *answer_ids, user]
    config = family_config("glm4", len(tokenizer), stop_ids)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        embed = torch.nn.functional.normalize(torch.randn(len(tokenizer), config.hidden_size), dim=-1)
        model.model.embed_tokens.weight.copy_(embed)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        head = torch.zeros(len(tokenizer), config.hidden_size)
        for current, following in zip(chain, chain[1:]):
            head[following] += 20 * embed[current]
        model.lm_head.weight.copy_(head)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": stop_ids, "pad_token_id": stop_ids[0]}))
    return folder, {"reasoning": tokenizer.decode(thinking_ids), "answer": tokenizer.decode(answer_ids)}


def _distinct_ids(tokenizer, text: str, exclude: set[int]) -> list[int]:
    ids = []
    for i in tokenizer(text, add_special_tokens=False)["input_ids"]:
        if i not in ids and i not in exclude:
            ids.append(i)
    return ids
