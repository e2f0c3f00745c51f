"""ChatGLM-6B (first generation) natively: a tiny checkpoint in the original THUDM layout (random fp16 weights,
sharded .bin with its index, an ice_text.model trained here), its logits against those THUDM's own code produced
on the same checkpoint (tests/reference/chatglm-6b.json, tests/test_reference_fidelity.py), the tokenizer's
rewrites, the prompt, quantization and the engine's kept-cache rules."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from chatglm_fixtures import (
    assert_close_to_reference,
    build_reference_checkpoint,
    chatglm6b_config,
    chatglm6b_state_dict,
    quantize_thudm_glm6b,
    write_chatglm6b_checkpoint,
)
from conftest import ROOT

from glm_core import ModelLoadError, ModelSpec, SamplingParams
from glm_core.engine import Engine
from glm_core.engine.textstream import IncrementalDecoder
from glm_core.models import load_model
from glm_core.models.chat_format import ChatGLM6BFormat
from glm_core.models.chatglm.glm6b import CACHED_IDS, ChatGLM6BForCausalLM, rotary_inv_freq
from glm_core.models.chatglm.ice_tokenizer import IceTokenizer, TokenizerMismatch, postprocess, preprocess

REFERENCE = json.loads((ROOT / "tests" / "reference" / "chatglm-6b.json").read_text(encoding="utf-8"))


def original_logits(name: str, ids: list[int]) -> tuple[list[int], torch.Tensor]:
    """(rows, logits at those rows) that THUDM's modeling_chatglm.py gave for `ids` on checkpoint `name`."""
    import base64

    for case in REFERENCE["checkpoints"][name]["cases"]["logits"]:
        if case["ids"] == ids:
            raw = base64.b64decode(case["logits"]["float32_le_base64"])
            return case["rows"], torch.frombuffer(bytearray(raw), dtype=torch.float32).reshape(case["logits"]["shape"])
    raise AssertionError(f"no recorded logits of {ids} for {name}: rerun tests/reference/make_reference.py")


@pytest.fixture(scope="module")
def glm6b(tmp_path_factory):
    """The reference checkpoint "chatglm-6b" (3 layers, fp16, sharded; its hashes are checked in
    test_reference_fidelity.py)."""
    folder, config = build_reference_checkpoint("chatglm-6b", tmp_path_factory.mktemp("m"))
    return folder, config, chatglm6b_state_dict(config, std=0.5)


@pytest.fixture(scope="module")
def ice_model(glm6b):
    return glm6b[0] / "ice_text.model"


@pytest.fixture(scope="module")
def loaded_fp32(glm6b):
    return load_model(ModelSpec(str(glm6b[0]), "fp32", "cpu"))


def tokenizer_of(config, ice_model, offset=0):
    return IceTokenizer(
        ice_model,
        offset,
        {
            "[MASK]": config["mask_token_id"],
            "[gMASK]": config["gmask_token_id"],
            "<sop>": config["bos_token_id"],
            "<eop>": config["eos_token_id"],
        },
        3,
    )


def prompt_ids(loaded, text):
    return loaded.tokenizer(text)["input_ids"]


# ---- tokenizer -------------------------------------------------------------------------------------------


def test_text_rewrites_as_the_original(ice_model, glm6b):
    assert preprocess("a\nb\tc  d") == "a<n>b<|tab|>c<|blank_2|>d"
    assert preprocess(" " * 85) == "<|blank_80|><|blank_5|>"  # the original replaces runs of 80 first
    assert preprocess(" " * 81 + "x y") == "<|blank_80|> x y"
    assert postprocess("<|blank_80|><|blank_5|>x<n><|tab|>") == " " * 85 + "x\n\t"
    tokenizer = tokenizer_of(glm6b[1], ice_model)
    for text in ["def f():\n\treturn 1\n\n", "a" + " " * 170 + "b  c   d", "你好\n世界", "  leading and trailing  "]:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        decoder = IncrementalDecoder(tokenizer)
        assert "".join([decoder.push(i) for i in ids] + [decoder.flush()]) == text
    pieces = [tokenizer.sp.id_to_piece(i) for i in tokenizer.encode("x\n\ty" + " " * 5 + "z")]
    assert {"<n>", "<|tab|>", "<|blank_5|>"} <= set(pieces)


def test_special_ids_come_from_config_and_num_image_tokens(ice_model, glm6b):
    config = glm6b[1]
    tokenizer = tokenizer_of(config, ice_model)
    ids = tokenizer("你好")["input_ids"]
    # The structure of chatglm.cpp's golden "你好" -> 5, 74874, 130001, 130004: pieces, then [gMASK] <sop>.
    assert ids == tokenizer.sp.encode("你好") + [config["gmask_token_id"], config["bos_token_id"]]
    assert tokenizer.sp.id_to_piece(ids[0]) == "▁"
    assert tokenizer.decode(ids + [config["eos_token_id"]]) == "你好"
    assert tokenizer.decode(ids, skip_special_tokens=False) == "你好[gMASK]<sop>"
    shifted = tokenizer_of({k: v + 20000 if k.endswith("token_id") else v for k, v in config.items()}, ice_model, 20000)
    assert shifted("你好")["input_ids"] == [i + 20000 for i in ids]  # the first release's offset
    assert shifted.decode([5, 17] + shifted.encode("你好")) == "你好"  # image ids are dropped
    assert len(shifted) == len(tokenizer) + 20000
    with pytest.raises(TokenizerMismatch, match="num_image_tokens"):
        tokenizer_of(config, ice_model, 20000)  # config.json's ids without the offset: a stale tokenizer_config


# ---- prompt ----------------------------------------------------------------------------------------------


def test_prompt_for_one_and_three_turns(loaded_fp32):
    fmt, tok = loaded_fp32.chat_format, loaded_fp32.tokenizer
    assert isinstance(fmt, ChatGLM6BFormat)
    one = [{"role": "user", "content": "你好"}]
    assert fmt.prompt(one) == "你好"
    assert fmt.encode(one) == tok.sp.encode("你好") + [tok.command("[gMASK]"), tok.command("<sop>")]
    three = one + [
        {"role": "assistant", "content": "你好👋！"},
        {"role": "user", "content": "今天天气怎么样？"},
        {"role": "assistant", "content": "很好。"},
        {"role": "user", "content": "Thanks"},
    ]
    text = "[Round 0]\n问：你好\n答：你好👋！\n[Round 1]\n问：今天天气怎么样？\n答：很好。\n[Round 2]\n问：Thanks\n答："
    assert fmt.prompt(three) == text
    assert fmt.encode(three) == tok.sp.encode(preprocess(text)) + [tok.command("[gMASK]"), tok.command("<sop>")]
    assert fmt.stop_token_ids == {tok.command("<eop>")}
    assert not hasattr(fmt, "continuation")
    assert fmt.prompt([{"role": "system", "content": "Be brief."}] + one) == "Be brief.\n\n你好"


def test_reusable_length_only_for_the_same_prompt():
    sop = 9
    fmt = ChatGLM6BFormat.__new__(ChatGLM6BFormat)
    fmt.sop_id = sop
    prompt = [5, 6, 7, 8, sop]
    assert fmt.reusable_length(prompt + [20, 21], prompt) == 4  # regenerate: all before <sop>
    assert fmt.reusable_length(prompt + [20, 21], [5, 6, 7, 8, 30, 31, 8, sop]) == 0  # a new turn: nothing
    assert fmt.reusable_length([5, 6, 7, 8, 30, sop], prompt) == 0
    assert fmt.reusable_length([], prompt) == 0


def test_process_response_as_the_original_chat():
    assert ChatGLM6BFormat.process_response(" 你好,世界!ok, fine? 是吗?\n") == "你好，世界！ok, fine? 是吗？"
    assert ChatGLM6BFormat.process_response("[[训练时间]]") == "2023年"


@pytest.mark.parametrize(
    "text",
    [
        "你好,世界!ok, fine? 是吗?[[训练时间]]好:对;",
        "  答:是 , 不是,  [[训练",
        "好?",
        "Yes , I 'm here . Don 't , he 's 你 ,好 ' s n",
    ],
)
def test_replies_stream_through_process_response_without_taking_text_back(loaded_fp32, text):
    """The runner's decoder for ChatGLM-6B: token by token, what is sent only grows, and the whole reply is what
    the original chat() returned (full-width marks next to CJK characters, the placeholder replaced)."""
    from glm_core.engine.runner import reply_decoder

    ids = loaded_fp32.tokenizer(text, add_special_tokens=False)["input_ids"]
    decoder = reply_decoder(loaded_fp32)
    sent = ""
    for token in ids:
        sent += decoder.push(token)
        assert ChatGLM6BFormat.process_response(loaded_fp32.tokenizer.decode(ids)).startswith(sent.lstrip())
    sent += decoder.flush()
    assert sent.lstrip() == ChatGLM6BFormat.process_response(text)
    if "你好,世界" in text:
        assert sent == "你好，世界！ok, fine? 是吗？2023年好：对；"


# ---- the module against the original's forward -----------------------------------------------------------


def test_logits_equal_the_original_forward(glm6b, loaded_fp32):
    from transformers import DynamicCache

    folder, config, sd = glm6b
    assert (folder / "pytorch_model.bin.index.json").is_file()
    assert loaded_fp32.family == "ChatGLM-6B" and loaded_fp32.card().family == "ChatGLM-6B"
    assert loaded_fp32.max_context == 2048 and loaded_fp32.card().loader == "streamed"
    assert isinstance(loaded_fp32.model, ChatGLM6BForCausalLM)
    model = loaded_fp32.model
    assert model.lm_head.weight is model.transformer.word_embeddings.weight  # tied
    stored_inv_freq = sd["transformer.layers.0.attention.rotary_emb.inv_freq"].float()  # recomputed, not read
    assert torch.equal(rotary_inv_freq(len(stored_inv_freq) * 2, "cpu"), stored_inv_freq)
    ids = prompt_ids(loaded_fp32, "机器学习是人工智能的一个分支,\n它使计算机  能够学习。") + [17, 230, 42, 99]
    rows, expected = original_logits("chatglm-6b", ids)  # row 0, then every row from <sop> on
    environment = REFERENCE["environment"]  # the CPU it was recorded on
    sop = ids.index(config["bos_token_id"])
    assert rows == [0] + list(range(sop, len(ids)))
    with torch.inference_mode():
        whole = model(input_ids=torch.tensor([ids])).logits[0]
        assert_close_to_reference(whole[rows], expected, environment)
        # The engine's way: the prompt up to <sop> in one forward into a DynamicCache, then one token at a time.
        cache = DynamicCache(config=model.config)
        out = model(input_ids=torch.tensor([ids[: sop + 1]]), past_key_values=cache, use_cache=True, logits_to_keep=1)
        steps = [out.logits[0, -1]]
        for token in ids[sop + 1 :]:
            steps.append(model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True).logits[0, -1])
        assert_close_to_reference(torch.stack(steps), expected[1:], environment)
        assert getattr(cache, CACHED_IDS) == ids
        # Regenerate: the cache cropped to just before <sop>, then <sop> again, gives the same logits.
        cache.crop(-(len(ids) - sop))
        again = model(input_ids=torch.tensor([[ids[sop]]]), past_key_values=cache, use_cache=True).logits[0, -1]
        assert_close_to_reference(again, expected[1], environment)


def test_bidirectional_prompt_and_2d_positions_matter(glm6b, loaded_fp32):
    """Position 0 sees a later prompt token (the prompt attends in both directions), as in the original."""
    _, config, sd = glm6b
    ids = prompt_ids(loaded_fp32, "Hello, how are you today?")
    with torch.inference_mode():
        logits = loaded_fp32.model(input_ids=torch.tensor([ids])).logits[0]
    changed = list(ids)
    changed[-3] = ids[-4]
    with torch.inference_mode():
        other = loaded_fp32.model(input_ids=torch.tensor([changed])).logits[0]
    assert not torch.allclose(logits[0], other[0])  # position 0 saw a later prompt token
    rows, expected = original_logits("chatglm-6b", changed)
    torch.testing.assert_close(other[rows], expected, atol=1e-4, rtol=1e-4)


# ---- loading: sharded / single bin, quantized while loading, pre-quantized THUDM checkpoints ----------------------


@pytest.fixture(scope="module")
def gentle(tmp_path_factory, ice_model):
    """For the precision levels: the reference checkpoint's shapes with weights of std 0.15, whose logits move
    smoothly with rounding (the reference's std 0.5 makes a 3-layer random model chaotic: bf16 alone moves its
    logits by 30%). Their loss is measured against this folder's FP32 logits, which is the module
    test_logits_equal_the_original_forward checks against THUDM's code."""
    import sentencepiece as spm

    config = chatglm6b_config(
        ice_model, vocab_size=spm.SentencePieceProcessor(model_file=str(ice_model)).get_piece_size()
    )
    folder = write_chatglm6b_checkpoint(
        tmp_path_factory.mktemp("gentle") / "chatglm-6b-gentle", ice_model, config, chatglm6b_state_dict(config)
    )
    fp32 = load_model(ModelSpec(str(folder), "fp32", "cpu"))
    ids = prompt_ids(fp32, "The capital of France is Paris.") + [17, 230]
    with torch.inference_mode():
        return folder, config, ids, fp32.model(input_ids=torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("level", ["bf16", "fp16"])
def test_half_precision_levels(gentle, level):
    folder, config, ids, expected = gentle
    loaded = load_model(ModelSpec(str(folder), level, "cpu"))
    assert loaded.model.transformer.layers[0].attention.dense.weight.dtype == loaded.precision.dtype
    with torch.inference_mode():
        logits = loaded.model(input_ids=torch.tensor([ids])).logits[0].float()
    assert ((logits - expected).norm() / expected.norm()).item() < 0.03


@pytest.mark.parametrize("level, tolerance", [("int8", 0.03), ("int4", 0.25)])
def test_quantizes_while_loading(gentle, level, tolerance):
    from torch import nn

    from glm_core.models.quant import WeightOnlyInt4Linear, WeightOnlyInt8Embedding, WeightOnlyInt8Linear

    folder, config, ids, expected = gentle
    loaded = load_model(ModelSpec(str(folder), level, "cpu", group_size=32))
    layers = loaded.model.transformer.layers
    assert not [m for m in layers.modules() if isinstance(m, nn.Linear)]
    kind = WeightOnlyInt8Linear if level == "int8" else WeightOnlyInt4Linear
    assert len([m for m in layers.modules() if isinstance(m, kind)]) == 4 * config["num_layers"]
    embedding = loaded.model.get_input_embeddings()
    assert isinstance(embedding, WeightOnlyInt8Embedding)
    assert isinstance(loaded.model.lm_head, WeightOnlyInt8Linear) and loaded.model.lm_head.weight is embedding.weight
    assert loaded.weights["quantized"] > 0
    with torch.inference_mode():
        logits = loaded.model(input_ids=torch.tensor([ids])).logits[0].float()
    assert ((logits - expected).norm() / expected.norm()).item() < tolerance


@pytest.mark.parametrize("bits, embedding", [(4, False), (8, False), (4, True)])
def test_prequantized_thudm_checkpoints(tmp_path, bits, embedding):
    """chatglm-6b-int4 / int8 layouts, dequantized as they are read: the logits THUDM's modeling file and CPU
    kernels gave on the same checkpoint (tests/reference/). int4-qe (word embedding quantized too) has its own
    modeling file, which no mirror found here holds, so it is only checked to read the same weights: its logits
    equal those of the dequantized values stored as plain weights."""
    folder, config = build_reference_checkpoint(f"chatglm-6b-int{bits}", tmp_path / "ref")
    if embedding:
        config = {**config, "_name_or_path": "THUDM/chatglm-6b-int4-qe"}
        stored, dequantized = quantize_thudm_glm6b(chatglm6b_state_dict(config, seed=4, std=0.5), bits, embedding)
        assert stored["transformer.word_embeddings.weight"].dtype == torch.int8
        ice = folder / "ice_text.model"
        folder = write_chatglm6b_checkpoint(tmp_path / "chatglm-6b-int4-qe", ice, config, stored, layout="bin")
        plain = write_chatglm6b_checkpoint(
            tmp_path / "dequantized",
            ice,
            {**config, "quantization_bit": 0},
            {k: v.float() for k, v in dequantized.items()},
            layout="bin",
        )
    loaded = load_model(ModelSpec(str(folder), "fp32", "cpu"))
    ids = loaded.tokenizer("你好")["input_ids"]
    with torch.inference_mode():
        logits = loaded.model(input_ids=torch.tensor([ids])).logits[0]
    if embedding:
        with torch.inference_mode():
            expected = load_model(ModelSpec(str(plain), "fp32", "cpu")).model(input_ids=torch.tensor([ids])).logits[0]
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    else:
        rows, expected = original_logits(f"chatglm-6b-int{bits}", ids)
        torch.testing.assert_close(logits[rows], expected, atol=1e-4, rtol=1e-4)
    assert f"INT{bits}" in loaded.card().checkpoint
    # And straight to our INT4: every layer holds the checkpoint's weights, requantized (each layer applied to the
    # identity gives its weights back, compared with the dequantized load's layer of the same name).
    from glm_core.models.quant import WeightOnlyInt4Linear

    int4 = load_model(ModelSpec(str(folder), "int4", "cpu", group_size=32))
    source = dict(loaded.model.named_modules())
    layers = [(name, m) for name, m in int4.model.named_modules() if isinstance(m, WeightOnlyInt4Linear)]
    assert len(layers) == 4 * config["num_layers"]
    with torch.inference_mode():
        for name, layer in layers:
            eye = torch.eye(layer.in_features)
            got, want = layer(eye.to(layer.scales_and_zeros.dtype)).float(), source[name](eye)
            assert ((got - want).norm() / want.norm()).item() < 0.15, name


def test_broken_first_generation_folders_get_one_line_reasons(glm6b, tmp_path):
    folder, config, _ = glm6b

    def reason(path):
        with pytest.raises(ModelLoadError) as info:
            load_model(ModelSpec(str(path), "fp32", "cpu"))
        assert "\n" not in str(info.value)
        return str(info.value)

    no_tok = shutil.copytree(folder, tmp_path / "no-tokenizer")
    (no_tok / "ice_text.model").unlink()
    assert "no ice_text.model" in reason(no_tok)
    stale = shutil.copytree(folder, tmp_path / "stale-tokenizer-config")
    (stale / "tokenizer_config.json").write_text(json.dumps({"num_image_tokens": 20000}))
    assert "num_image_tokens 20000" in reason(stale)
    missing = shutil.copytree(folder, tmp_path / "missing-shard")
    (missing / "pytorch_model-00002-of-00003.bin").unlink()
    assert "missing shard" in reason(missing)
    ptuning = shutil.copytree(folder, tmp_path / "ptuning")
    (ptuning / "config.json").write_text(json.dumps({**config, "pre_seq_len": 128}))
    assert "P-tuning" in reason(ptuning)


# ---- the engine: greedy replies, the kept-cache rules --------------------------------------------------------


def test_engine_re_reads_a_new_turn_and_reuses_the_prompt_to_regenerate(loaded_fp32):
    """Greedy replies (no penalty) against the original's recorded two-turn chat() conversation."""
    turns = REFERENCE["checkpoints"]["chatglm-6b"]["cases"]["conversation"]
    engine = Engine(loaded_fp32)
    try:
        params = SamplingParams(temperature=0, max_new_tokens=len(turns[0]["generated_ids"]))
        first_turn = [{"role": "user", "content": turns[0]["query"]}]
        first = engine.submit("c", first_turn, params).wait()
        assert first.error is None and first.stats.reused_tokens == 0
        ids = loaded_fp32.chat_format.encode(first_turn)
        assert ids == turns[0]["prompt_ids"]
        held = engine.pool.tokens("c")[len(ids) :]
        assert held == turns[0]["generated_ids"][: len(held)] and len(held) >= first.stats.completion_tokens - 1
        assert first.text == turns[0]["response"]

        again = engine.submit("c", first_turn, params).wait()  # regenerate: the prompt before <sop> is kept
        assert again.stats.reused_tokens == len(ids) - 1 and again.stats.prefill_tokens == 1
        assert again.text == first.text

        second_turn = first_turn + [
            {"role": "assistant", "content": first.text},
            {"role": "user", "content": turns[1]["query"]},
        ]
        second = engine.submit("c", second_turn, params).wait()
        assert second.stats.reused_tokens == 0  # the whole conversation re-read: the prompt is bidirectional
        ids2 = loaded_fp32.chat_format.encode(second_turn)
        assert ids2 == turns[1]["prompt_ids"]
        assert second.stats.prefill_tokens == second.stats.prompt_tokens == len(ids2)
        assert second.text == turns[1]["response"]
    finally:
        engine.close()


def test_cli_chats_with_a_first_generation_folder(glm6b):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "glm_core",
            "chat",
            "--model",
            str(glm6b[0]),
            "--precision",
            "int8",
            "--temperature",
            "0",
            "--max-new-tokens",
            "5",
        ],
        input="你好\nThe capital of France is?\n",
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    turns = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(turns) == 2 and all(t["completion_tokens"] >= 1 for t in turns)


def test_memory_bench_runs_the_module_with_random_weights(glm6b, tmp_path):
    """The Quantization page's random-weight path (estimator's meta model, a filled cache, decode steps)."""
    from glm_core.bench.estimator import estimate
    from glm_core.bench.memory import MemoryBenchRequest
    from glm_core.bench.memory.child import measure_level

    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(glm6b[1]))
    request = MemoryBenchRequest(
        source=str(config_file), levels=("int8",), encode=40, generate=48, device="cpu", eval_tokens=0
    )
    result = measure_level(request, "int8", lambda fraction, message: None)
    [predicted] = estimate(glm6b[1], ["int8"], 40, 48)
    assert result.weights_bytes == predicted.weights_bytes and result.decode_tokens_per_s > 0
