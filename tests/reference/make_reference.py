#!/usr/bin/env python3
"""Record what THUDM's original ChatGLM code does on the project's tiny checkpoints (tests/reference/*.json).

The expected outputs of tests/test_reference_fidelity.py are not written by hand: this script builds the tiny
checkpoints with the project's own fixture builders (tests/chatglm_fixtures.py: random fp16 weights from fixed
seeds, SentencePiece models trained on a fixed corpus), loads them with THUDM's own configuration_chatglm.py,
modeling_chatglm.py, tokenization_chatglm.py and quantization.py (trust_remote_code, which is allowed here and
only here: this script runs in a separate, test-data-only environment, never in the product's), and records the
tokenizer ids, prompt ids, logits and greedy `chat()` / `stream_chat()` replies they produce, with the SHA-256 of
every checkpoint file and of every original source file.

How to get the original files and the environments, and how to rerun: tests/reference/README.md.

    python tests/reference/make_reference.py --originals DIR --family chatglm-6b      # transformers 4.27.1
    python tests/reference/make_reference.py --originals DIR --family chatglm2-6b     # transformers 4.30.2
    python tests/reference/make_reference.py --originals DIR --family chatglm3-6b     # transformers 4.30.2

DIR holds one folder per source (see SOURCES): chatglm-6b/, chatglm-6b-cpu-quantization/, chatglm2-6b/,
chatglm3-6b/, each with the original files named as in THUDM's repositories.
"""

from __future__ import annotations

import argparse
import base64
import copy
import hashlib
import json
import os
import platform
import re
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: chatglm_fixtures (imports torch and sentencepiece only)

# Where each original file comes from. The mirrors are git copies of the Hugging Face model repositories with their
# history, so a mirror commit id is the Hugging Face revision id itself. The SHA-256 are checked before anything runs.
SOURCES = {
    "chatglm-6b": {
        "thudm_repo": "THUDM/chatglm-6b",
        "mirror": "github.com/greensheng/chatglm-6b",
        "commit": "8b7d33596d18c5e83e2da052d05ca4db02e60620",
        "note": "the newest commit of THUDM/chatglm-6b (2023-09-04, 'Update README'); code last changed 2023-05",
        "files": {
            "configuration_chatglm.py": "942977b9f878be607345860a88d2fc74a75256e91d0e14ef40391818352c359b",
            "modeling_chatglm.py": "e77d33a0354ab0948d54f953708d09baa7345966f2fb73df749e8fe5352863eb",
            "tokenization_chatglm.py": "b52a2d87f05cd3919ba6401e6be1a82b99cd91609fbc562fea407f000dc9f873",
            "quantization.py": "9e29d0de295c63297b99a06c3b9fe7c6f8781a4aa5fb3b9ff903bdfeaf5a535b",
        },
    },
    "chatglm-6b-cpu-quantization": {
        "thudm_repo": "THUDM/chatglm-6b, branch dev",
        "mirror": "github.com/greensheng/chatglm-6b",
        "commit": "3f0e72a32ede52a895d9c6579bd9c85727666263",
        "note": (
            "quantization.py with THUDM's CPU kernels (quantization_kernels.c, compiled with gcc at run time; "
            "the version THUDM shipped for CPU use of the int4 checkpoints). main's quantization.py is CUDA "
            "only (cpm_kernels), so the ChatGLM-6B int4/int8 cases run this file with main's modeling file."
        ),
        "files": {"quantization.py": "89e306fc867b21a5ce5f08f61644fb888b79569458d84df73add8056171c7c59"},
    },
    "chatglm2-6b": {
        "thudm_repo": "THUDM/chatglm2-6b",
        "mirror": "github.com/syjjhl/chatglm2-6b",
        "commit": "8fd7fba285f7171d3ae7ea3b35c53b6340501ed1",
        "note": (
            "the mirror's newest commit (2023-09-08, 'Merge branch classifier'); THUDM may have committed "
            "after it (not checked: no network here)"
        ),
        "files": {
            "configuration_chatglm.py": "351ba435758670b27c160b7657c7ab1d32053c4e8c0606a5a9b8f9908249dec8",
            "modeling_chatglm.py": "fe04c69d36dd1dba8370cc68e0ccf861e07d402af6fb039b500cd7d784cfc142",
            "tokenization_chatglm.py": "b7441a9f557de4292720baec6dc4d1d55bdaca99d26f5501c27afe86825da67c",
            "quantization.py": "7a690346ab3866ebdc361fb5d7389ecf6e3e8fe62f50868d28a5bcbff52ecd20",
        },
    },
    "chatglm3-6b": {
        "thudm_repo": "THUDM/chatglm3-6b",
        "mirror": "github.com/czk1997/chatglm3-copy",
        "commit": "456aa875cf1f46623006edaa23103774ea9c0eae",
        "note": (
            "the mirror's newest commit (2023-12-07, 'fix piece id out of range (#20)'); THUDM/chatglm3-6b "
            "has later commits (2024, compatibility with newer transformers) that no mirror found here holds"
        ),
        "files": {
            "configuration_chatglm.py": "351ba435758670b27c160b7657c7ab1d32053c4e8c0606a5a9b8f9908249dec8",
            "modeling_chatglm.py": "440d89faea5c3ea47fd2778abde970008d170cacb743aafcaf822cdaa5627ee0",
            "tokenization_chatglm.py": "f3e7e26af20b222d107f888a3db305a1a25ea74c16952d36257e0e606d1780f6",
            "quantization.py": "7a690346ab3866ebdc361fb5d7389ecf6e3e8fe62f50868d28a5bcbff52ecd20",
        },
    },
}

# The transformers release each family's README asks for (ChatGLM-6B: 4.27.1; ChatGLM2/3: 4.30.2). It matters:
# 4.27.1 ignores the clean_up_tokenization_spaces=False that ChatGLM2/3's tokenizer passes, 4.30.2 honours it.
TRANSFORMERS = {"chatglm-6b": "4.27.1", "chatglm2-6b": "4.30.2", "chatglm3-6b": "4.30.2"}

# Texts for the tokenizer cases: Chinese, newlines, tabs, runs of blanks (beyond 80), leading/trailing blanks,
# emoji and characters outside the trained vocabulary (byte fallback), and the English spacing that transformers
# 4.27's decode cleans up (" ." " ," " !" " ?" " n't" " 's" ...).
TEXTS = [
    "你好",
    "Hello, how are you today?",
    "机器学习是人工智能的一个分支,\n它使计算机  能够学习。",
    "def add(a, b):\n\treturn a + b\n\n",
    "a" + " " * 85 + "b   c  d" + " " * 160 + "e",
    "  leading and trailing  ",
    "表情 😀🚀 和中文混合 text",
    "unknown: \u2603 \U0001f9ea \u2211 \u00bd \u01c5 \u0915\u093f",
    "I can 't go , he 's here . Really ? Yes ! I 'm sure we 've seen you 're right , don 't you ?",
    "line1\n\nline2\r\nend\t\ttabs",
    "[Round 1] 问：你好 答：你好！",
]


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tensor_b64(t) -> dict:
    import torch

    t = t.detach().to(torch.float32).contiguous()
    return {"shape": list(t.shape), "float32_le_base64": base64.b64encode(t.numpy().astype("<f4").tobytes()).decode()}


def check_sources(originals: Path, names: list[str]) -> dict:
    recorded = {}
    for name in names:
        source = SOURCES[name]
        files = {}
        for filename, expected in source["files"].items():
            path = originals / name / filename
            actual = sha256_file(path)
            if actual != expected:
                raise SystemExit(
                    f"{path}: SHA-256 {actual} is not the recorded {expected} ({source['mirror']} "
                    f"at {source['commit']}); see tests/reference/README.md"
                )
            files[filename] = actual
        recorded[name] = {k: v for k, v in source.items() if k != "files"} | {"files_sha256": files}
    return recorded


def environment() -> dict:
    import chatglm_fixtures as fx
    import sentencepiece
    import tokenizers
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "sentencepiece": sentencepiece.__version__,
        "machine": platform.machine(),
        # The CPU: fp32 sums run in another order on another one (torch's AVX-512 kernels, MKL on Intel or AMD), and
        # the logits tests compare strictly only on a CPU like this (chatglm_fixtures.assert_close_to_reference).
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_vendor": fx.cpu_vendor(),
    }


def build(name: str, work: Path, originals: Path, code_from: list[tuple[str, str]]) -> tuple[Path, dict, dict]:
    """The checkpoint (hashed before anything is added), then the original .py files copied beside it, as a Hugging
    Face repository holds them."""
    import chatglm_fixtures as fx

    folder, config = fx.build_reference_checkpoint(name, work / "checkpoints")
    hashes = fx.file_hashes(folder)
    for source, filename in code_from:
        shutil.copy(originals / source / filename, folder / filename)
    return folder, config, hashes


def load(folder: Path):
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
    model = AutoModel.from_pretrained(str(folder), trust_remote_code=True).float().eval()
    return tokenizer, model


class _Probe(Exception):
    pass


def prompt_of(model, call) -> list[int]:
    """The input ids that `call()` (a chat()) hands to generate(), without generating."""

    def probe(*args, **kwargs):
        raise _Probe(kwargs["input_ids"][0].tolist())

    model.generate = probe
    try:
        call()
    except _Probe as found:
        return found.args[0]
    finally:
        del model.generate
    raise AssertionError("chat() did not call generate()")


def chat_case(model, tokenizer, query, history, new_tokens: int, **chat_kwargs) -> dict:
    """One greedy chat() turn with max_length = prompt length + new_tokens; the ids generate() returned after the
    prompt (the stop token included when it stopped) and the reply exactly as chat() returned it."""
    import torch

    given = copy.deepcopy(history)
    prompt = prompt_of(
        model,
        lambda: model.chat(tokenizer, query, copy.deepcopy(history), do_sample=False, max_length=10**6, **chat_kwargs),
    )
    max_length = len(prompt) + new_tokens
    generated = []
    original_generate = model.generate

    def recording(*args, **kwargs):
        out = original_generate(*args, **kwargs)
        generated.append(out[0].tolist()[len(kwargs["input_ids"][0]) :])
        return out

    model.generate = recording
    try:
        with torch.no_grad():
            response, new_history = model.chat(
                tokenizer, query, copy.deepcopy(history), do_sample=False, max_length=max_length, **chat_kwargs
            )
    finally:
        del model.generate
    return {
        "query": query,
        "history": given,
        "max_length": max_length,
        "prompt_ids": prompt,
        "generated_ids": generated[0],
        "response": response,
        "history_after": new_history,
    }


def conversation(model, tokenizer, queries, new_tokens: int, **chat_kwargs) -> list[dict]:
    """Several chat() turns, each given the history the previous one returned."""
    turns, history = [], []
    for query in queries:
        turn = chat_case(model, tokenizer, query, history, new_tokens, **chat_kwargs)
        turns.append(turn)
        history = turn["history_after"]
    return turns


def stream_conversation(model, tokenizer, queries, new_tokens: int) -> list[dict]:
    """Several stream_chat() turns with the kept cache (past_key_values, return_past_key_values=True), as THUDM's
    cli_demo.py chats; per turn the ids fed to the model (the new turn only), the ids generated (stop token
    included) and the last response yielded."""
    import torch

    turns, history, past = [], [], None
    original = model.stream_generate
    for query in queries:
        seen = {}

        def recording(input_ids, *args, **kwargs):
            seen["input_ids"] = input_ids[0].tolist()
            for out in original(input_ids, *args, **kwargs):
                seen["output"] = (out[0] if isinstance(out, tuple) else out)[0].tolist()
                yield out

        model.stream_generate = recording
        given = copy.deepcopy(history)
        last = None
        try:
            with torch.no_grad():
                for last in model.stream_chat(
                    tokenizer,
                    query,
                    history,
                    past_key_values=past,
                    do_sample=False,
                    max_new_tokens=new_tokens,
                    return_past_key_values=True,
                ):
                    pass
        finally:
            del model.stream_generate
        response, history, past = last
        fed = seen["input_ids"]
        turns.append(
            {
                "query": query,
                "history": given,
                "max_new_tokens": new_tokens,
                "fed_ids": fed,
                "generated_ids": seen["output"][len(fed) :],
                "response": response,
                "cache_length_after": int(past[0][0].shape[0]),
            }
        )
    return turns


def logits_case(model, ids, rows: list[int]) -> dict:
    """The logits of one forward over `ids`: every position's argmax, and the whole rows at `rows` (all rows
    would make the files large; the rows kept are the first and those from <sop> on)."""
    import torch

    rows = sorted({r % len(ids) for r in rows})
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    return {"ids": ids, "rows": rows, "logits": tensor_b64(logits[rows]), "argmax": logits.argmax(-1).tolist()}


def glm6b_rows(ids: list[int], config: dict) -> list[int]:
    return [0] + list(range(ids.index(config["bos_token_id"]), len(ids)))


# ---- ChatGLM-6B -------------------------------------------------------------------------------------------------

GLM6B_CODE = [
    ("chatglm-6b", f)
    for f in ("configuration_chatglm.py", "modeling_chatglm.py", "tokenization_chatglm.py", "quantization.py")
]
GLM6B_CPU_QUANT_CODE = GLM6B_CODE[:3] + [("chatglm-6b-cpu-quantization", "quantization.py")]
GLM6B_HISTORY = [
    ["你好", "你好👋！我是人工智能助手 ChatGLM-6B，很高兴见到你。"],
    ["What's up?", "Nothing much , thanks ! I 'm fine ."],
]


def glm6b_cases(folder: Path, config: dict, full: bool) -> dict:
    tokenizer, model = load(folder)
    cases = {}
    if full:
        tokens = []
        for text in TEXTS:
            ids = tokenizer(text)["input_ids"]
            body = tokenizer.encode(text, add_special_tokens=False)
            tokens.append(
                {
                    "text": text,
                    "input_ids": ids,
                    "encode_no_special": body,
                    "decode": tokenizer.decode(ids),
                    # what chat() returns when the model generates exactly these ids and stops (<eop>)
                    "chat_reply_text": model.process_response(tokenizer.decode(body + [config["eos_token_id"]])),
                }
            )
        cases["tokenizer"] = tokens
        cases["prompts"] = [
            {"query": q, "history": h, "prompt_ids": prompt_of(model, lambda: model.chat(tokenizer, q, h))}
            for q, h in [("你好", []), ("今天天气怎么样？", GLM6B_HISTORY[:1]), ("Thanks\n\tbye  now", GLM6B_HISTORY)]
        ]
    first = tokenizer("机器学习是人工智能的一个分支,\n它使计算机  能够学习。")["input_ids"] + [17, 230, 42, 99]
    hello = tokenizer("Hello, how are you today?")["input_ids"]
    changed = list(hello)
    changed[-3] = hello[-4]
    paris = tokenizer("The capital of France is Paris.")["input_ids"] + [17, 230]
    sequences = (first, changed, paris) if full else (first,)
    cases["logits"] = [logits_case(model, ids, glm6b_rows(ids, config)) for ids in sequences]
    cases["chat"] = [
        chat_case(model, tokenizer, "Hello, how are you today?", [], 8),
        chat_case(model, tokenizer, "I can't see it . Why ?", GLM6B_HISTORY, 8),
    ]
    cases["conversation"] = conversation(model, tokenizer, ["你好", "The capital of France?", "今天天气怎么样？"], 10)
    return cases


def int4_packing(originals: Path) -> dict:
    """THUDM's int4/int8 packing as its CPU quantization.py does it (the C kernels, compiled here with gcc): a small
    fp16 weight quantized by QuantizedLinear, the bytes it stores, and what extract_weight_to_float gives back;
    and compress_int4_weight on every int4 value, to show the nibble order. Also checks that the fixture's
    pre-quantized checkpoints are packed exactly as the kernel packs them."""
    import importlib.util

    import chatglm_fixtures as fx
    import torch

    work = Path(tempfile.mkdtemp(prefix="thudm-kernels-"))
    shutil.copy(originals / "chatglm-6b-cpu-quantization" / "quantization.py", work / "quantization.py")
    spec = importlib.util.spec_from_file_location("thudm_cpu_quantization", work / "quantization.py")
    q = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(q)
    q.load_cpu_kernel()
    assert q.cpu_kernels.load, "THUDM's CPU kernels did not compile (gcc needed)"

    g = torch.Generator().manual_seed(28)
    weight = (torch.randn(4, 8, generator=g) * 0.1).half()
    out = {
        "kernel_source": "quantization_kernels.c written and compiled by THUDM's quantization.py (CPUKernel)",
        "weight_fp16": weight.float().tolist(),
        "layers": {},
    }
    for bits in (4, 8):
        layer = q.QuantizedLinear(
            bits,
            weight_tensor=weight.float(),
            bias_tensor=None,
            in_features=8,
            out_features=4,
            bias=False,
            dtype=torch.float32,
            device="cpu",
        )
        stored = layer.weight.data
        out["layers"][str(bits)] = {
            "weight_int8": stored.tolist(),
            "weight_bytes_hex": bytes(stored.view(torch.uint8).flatten().tolist()).hex(),
            "weight_scale_fp32": layer.weight_scale.data.tolist(),
            "extract_weight_to_float": q.extract_weight_to_float(stored, layer.weight_scale.data, bits).tolist(),
        }
    values = torch.arange(-8, 8, dtype=torch.int8).repeat(2, 1)  # every int4 value, two rows
    packed = q.compress_int4_weight(values)
    out["compress_int4_weight"] = {
        "values": values.tolist(),
        "packed": packed.tolist(),
        "packed_hex": bytes(packed.view(torch.uint8).flatten().tolist()).hex(),
    }

    # The fixture's int4 checkpoints (quantize_thudm_glm6b / quantize_thudm) against the kernel's packing.
    checks = {}
    for name, sd_of, quantizer, keys in [
        (
            "chatglm-6b-int4",
            lambda c: fx.chatglm6b_state_dict(c, seed=4, std=0.5),
            fx.quantize_thudm_glm6b,
            fx.GLM6B_QUANTIZED,
        ),
        ("chatglm2-6b-int4", lambda c: fx.random_state_dict(c, seed=4), fx.quantize_thudm, fx.QUANTIZED),
    ]:
        folder, config = fx.build_reference_checkpoint(name, Path(tempfile.mkdtemp(prefix="int4-")))
        full = sd_of(config)
        stored, _ = quantizer(full, 4)
        same = 0
        for key, w in full.items():
            if not key.endswith(keys):
                continue
            scale = stored[key[: -len("weight")] + "weight_scale"].float()
            ints = torch.round(w.float() / scale[:, None]).clamp(-8, 7).to(torch.int8)
            assert torch.equal(q.compress_int4_weight(ints.contiguous()), stored[key]), key
            same += 1
        checks[name] = f"{same} weights: the fixture's packed bytes equal compress_int4_weight's"
    out["fixture_checks"] = checks
    return out


def chatglm6b(originals: Path, work: Path) -> dict:
    import chatglm_fixtures as fx

    record = {"family": "chatglm-6b", "checkpoints": {}}
    for name in ("chatglm-6b", "chatglm-6b-28-layers"):
        folder, config, hashes = build(name, work, originals, GLM6B_CODE)
        record["checkpoints"][name] = {
            "description": fx.REFERENCE_CHECKPOINTS[name][1],
            "files_sha256": hashes,
            "code": "chatglm-6b",
            "cases": glm6b_cases(folder, config, name == "chatglm-6b"),
        }
    for name in ("chatglm-6b-int8", "chatglm-6b-int4"):
        folder, config, hashes = build(name, work, originals, GLM6B_CPU_QUANT_CODE)
        tokenizer, model = load(folder)
        layer = model.transformer.layers[0].attention.query_key_value
        assert type(layer).__name__ == "QuantizedLinear" and layer.weight.dtype.is_floating_point is False
        paris = tokenizer("The capital of France is Paris.")["input_ids"] + [17, 230]
        hello = tokenizer("你好")["input_ids"]
        cases = {
            "logits": [logits_case(model, ids, glm6b_rows(ids, config)) for ids in (hello, paris)],
            "chat": [chat_case(model, tokenizer, "Hello, how are you today?", [], 8)],
            "conversation": conversation(model, tokenizer, ["你好", "The capital of France?"], 8),
        }
        record["checkpoints"][name] = {
            "description": fx.REFERENCE_CHECKPOINTS[name][1],
            "files_sha256": hashes,
            "code": "chatglm-6b modeling/configuration/tokenization + chatglm-6b-cpu-quantization quantization.py",
            "how": (
                "config.json quantization_bit makes the original build QuantizedLinear layers (empty_init) and "
                "load the int8/packed-int4 weights and fp16 scales; .float(); forward on CPU through "
                "W8A16LinearCPU -> extract_weight_to_float, THUDM's C kernel"
            ),
            "cases": cases,
        }
    record["int4_packing"] = int4_packing(originals)
    return record


# ---- ChatGLM2-6B / ChatGLM3-6B ------------------------------------------------------------------------------


def glm2_code(family: str) -> list[tuple[str, str]]:
    return [
        (family, f)
        for f in ("configuration_chatglm.py", "modeling_chatglm.py", "tokenization_chatglm.py", "quantization.py")
    ]


LOGIT_IDS = [5, 17, 230, 42, 99, 3, 311, 64, 128, 7, 250, 12]
LOGIT_ROWS = [0, 1, 6, -2, -1]


def glm2_tokenizer_cases(tokenizer) -> list[dict]:
    out = []
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"]
        body = tokenizer.encode(text, add_special_tokens=False)
        out.append(
            {
                "text": text,
                "input_ids": ids,
                "encode_no_special": body,
                "decode": tokenizer.decode(ids),
                "decode_no_special": tokenizer.decode(body),
            }
        )
    return out


def glm2_3_model_cases(model, tokenizer, history) -> dict:
    """What ChatGLM2 and ChatGLM3 are both asked: logits, greedy chat() replies, a chat() conversation and a
    stream_chat() conversation with a kept cache."""
    queries = ["你好", "The capital of France is?", "今天天气怎么样？"]
    return {
        "logits": [logits_case(model, LOGIT_IDS, LOGIT_ROWS)],
        "chat": [
            chat_case(model, tokenizer, "Hello, how are you today?", [], 8),
            chat_case(model, tokenizer, "今天天气怎么样？", history, 8),
        ],
        "conversation": conversation(model, tokenizer, queries, 10),
        "stream_conversation": stream_conversation(model, tokenizer, queries, 10),
    }


def chatglm2(originals: Path, work: Path, emulate_quantized: bool) -> dict:
    import chatglm_fixtures as fx

    record = {"family": "chatglm2-6b", "checkpoints": {}}
    folder, config, hashes = build("chatglm2-6b", work, originals, glm2_code("chatglm2-6b"))
    tokenizer, model = load(folder)
    history = [["你好", "你好👋！我是人工智能助手。"], ["What's up?", "Nothing much, thanks!"]]
    cases = {
        "tokenizer": glm2_tokenizer_cases(tokenizer),
        "prompts": [
            {
                "query": q,
                "history": h,
                "build_inputs": model.build_inputs(tokenizer, q, h)["input_ids"][0].tolist(),
                "build_stream_inputs": model.build_stream_inputs(tokenizer, q, h)["input_ids"][0].tolist(),
            }
            for q, h in [("你好", []), ("今天天气怎么样？", history[:1]), ("Thanks\n\tbye  now", history)]
        ],
        **glm2_3_model_cases(model, tokenizer, history),
    }
    record["checkpoints"]["chatglm2-6b"] = {
        "description": fx.REFERENCE_CHECKPOINTS["chatglm2-6b"][1],
        "files_sha256": hashes,
        "code": "chatglm2-6b",
        "cases": cases,
    }
    if emulate_quantized:
        for bits in (8, 4):
            name = f"chatglm2-6b-int{bits}"
            folder, config, hashes = build(name, work, originals, glm2_code("chatglm2-6b"))
            with emulated_cuda_free_quantization():
                tokenizer, model = load(folder)
                patch_extract(model)
                cases = {
                    "logits": [logits_case(model, LOGIT_IDS, LOGIT_ROWS)],
                    "chat": [chat_case(model, tokenizer, "Hello, how are you today?", [], 8)],
                    "stream_conversation": stream_conversation(model, tokenizer, ["你好", "今天天气怎么样？"], 8),
                }
            record["checkpoints"][name] = {
                "description": fx.REFERENCE_CHECKPOINTS[name][1],
                "files_sha256": hashes,
                "code": "chatglm2-6b",
                "emulated": EMULATION,
                "cases": cases,
            }
    return record


EMULATION = (
    "THUDM's ChatGLM2/3 quantization.py cannot run on a CPU: quantize() moves every weight to "
    "torch.cuda.current_device() (even with empty_init), int4 is unpacked only by CUDA kernels (cpm_kernels, "
    "a compiled fatbin) and int8 asserts half/bf16 scales. Emulated: torch.cuda.current_device() answers 'cpu' "
    "while the model is built, and extract_weight_to_half is replaced by its torch equivalent: int8 -> "
    "weight.to(scale.dtype) * scale[:, None] (the original's own int8 line, without the dtype assert), int4 -> "
    "the high nibble (arithmetic shift) is the even column and the low nibble the odd one, times the row's scale, "
    "exactly what THUDM's CPU kernel extract_int4_weight_to_float computes (that kernel is run for real in the "
    "ChatGLM-6B int4 case). Everything else (QuantizedLinear, W8A16Linear, the modeling file) is the original."
)


class emulated_cuda_free_quantization:
    def __enter__(self):
        import torch

        self.saved = torch.cuda.current_device
        torch.cuda.current_device = lambda: "cpu"

    def __exit__(self, *exc):
        import torch

        torch.cuda.current_device = self.saved


def patch_extract(model) -> None:
    import torch

    module = sys.modules[type(model).__module__.rsplit(".", 1)[0] + ".quantization"]

    def extract(weight, scale_list, source_bit_width):
        if source_bit_width == 8:
            return weight.to(scale_list.dtype) * scale_list[:, None]
        high = weight >> 4
        low = (weight << 4) >> 4
        unpacked = torch.stack([high, low], dim=-1).reshape(weight.shape[0], weight.shape[1] * 2)
        return unpacked.to(scale_list.dtype) * scale_list[:, None]

    module.extract_weight_to_half = extract


def chatglm3(originals: Path, work: Path) -> dict:
    import chatglm_fixtures as fx

    record = {"family": "chatglm3-6b", "checkpoints": {}}
    folder, config, hashes = build("chatglm3-6b", work, originals, glm2_code("chatglm3-6b"))
    tokenizer, model = load(folder)
    system = {"role": "system", "content": "Be brief."}
    history = [
        system,
        {"role": "user", "content": "你好"},
        {"role": "assistant", "metadata": "", "content": "你好👋！我是人工智能助手。"},
    ]
    cases = {
        "tokenizer": glm2_tokenizer_cases(tokenizer),
        "prompts": [
            {
                "query": q,
                "history": h,
                "role": "user",
                "build_chat_input": tokenizer.build_chat_input(q, history=copy.deepcopy(h))["input_ids"][0].tolist(),
            }
            for q, h in [("你好", []), ("Hello", [system]), ("今天天气怎么样？", history)]
        ],
        **glm2_3_model_cases(model, tokenizer, history),
    }
    record["checkpoints"]["chatglm3-6b"] = {
        "description": fx.REFERENCE_CHECKPOINTS["chatglm3-6b"][1],
        "files_sha256": hashes,
        "code": "chatglm3-6b",
        "cases": cases,
    }
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--originals", type=Path, required=True, help="folder with the original files (README)")
    parser.add_argument("--family", choices=sorted(TRANSFORMERS), required=True)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="chatglm-reference-"))
    os.environ["HF_MODULES_CACHE"] = str(work / "hf-modules")  # the remote code is imported from here
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import transformers

    torch.manual_seed(0)
    if transformers.__version__ != TRANSFORMERS[args.family]:
        raise SystemExit(
            f"{args.family} is recorded with transformers {TRANSFORMERS[args.family]} (its README's), "
            f"this environment has {transformers.__version__}"
        )
    names = {"chatglm-6b": ["chatglm-6b", "chatglm-6b-cpu-quantization"]}.get(args.family, [args.family])
    sources = check_sources(args.originals, names)
    if args.family == "chatglm-6b":
        record = chatglm6b(args.originals, work)
    elif args.family == "chatglm2-6b":
        record = chatglm2(args.originals, work, emulate_quantized=True)
    else:
        record = chatglm3(args.originals, work)
    record = {
        "generated_by": "tests/reference/make_reference.py",
        "sources": sources,
        "environment": environment(),
        **record,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"{args.family}.json"
    text = json.dumps(record, ensure_ascii=False, indent=1)
    text = re.sub(r"\[[-0-9.e,\s]*\]", lambda m: re.sub(r"\s+", " ", m.group()), text)  # number lists on one line
    out.write_text(text + "\n")
    print(f"wrote {out} ({out.stat().st_size} bytes)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
