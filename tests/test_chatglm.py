"""ChatGLM2/ChatGLM3 checkpoints in the original THUDM layout: loader, tokenizer, chat formats, kept cache."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from chatglm_fixtures import chatglm2_config, quantize_thudm, random_state_dict, reference_logits, write_checkpoint
from conftest import ROOT

from glm_core import ModelLoadError, ModelSpec, SamplingParams
from glm_core.engine import Engine
from glm_core.engine.generation import decode_one, prefill
from glm_core.engine.textstream import IncrementalDecoder
from glm_core.models import load_model
from glm_core.models.chat_format import ChatGLM2Format, ChatGLM3Format
from glm_core.models.chatglm.checkpoint import dequantize, detect_family, glm_config, spread_device_map
from glm_core.models.chatglm.tokenizer import ChatGLMTokenizer


def logits_of(folder, ids, **spec):
    loaded = load_model(ModelSpec(str(folder), "fp32", "cpu", **spec))
    with torch.inference_mode():
        return loaded, loaded.model(input_ids=torch.tensor([ids])).logits[0]


IDS = [5, 17, 230, 42, 99, 3, 311, 64, 128, 7, 250, 12]


def test_logits_equal_an_independent_chatglm2_forward(glm2):
    folder, config, sd = glm2
    loaded, logits = logits_of(folder, IDS)
    torch.testing.assert_close(logits, reference_logits(sd, config, IDS), atol=2e-4, rtol=2e-4)
    assert loaded.family == "ChatGLM2" and loaded.card().family == "ChatGLM2"
    defaults = loaded.card().sampling_defaults
    assert (defaults["temperature"], defaults["top_p"], defaults["source"]) == (
        0.8,
        0.8,
        "ChatGLM2/3 documented defaults",
    )
    assert loaded.model.config.num_key_value_heads == 2 and loaded.model.config.head_dim == 16


def test_rope_ratio_scales_the_rotary_base(tmp_path, sp_model, pieces):
    config = chatglm2_config(pieces, rope_ratio=50)
    sd = random_state_dict(config, seed=3)
    folder = write_checkpoint(tmp_path / "glm2-32k", sp_model, config, sd, "safetensors")
    _, logits = logits_of(folder, IDS)
    torch.testing.assert_close(logits, reference_logits(sd, config, IDS), atol=2e-4, rtol=2e-4)
    assert glm_config(config).rope_parameters["rope_theta"] == 500000.0


def test_sharded_bin_with_index_loads(glm3):
    folder, config, sd = glm3
    assert (folder / "pytorch_model.bin.index.json").is_file()
    loaded, logits = logits_of(folder, IDS)
    torch.testing.assert_close(logits, reference_logits(sd, config, IDS), atol=2e-4, rtol=2e-4)
    assert loaded.family == "ChatGLM3"


@pytest.mark.parametrize("bits", [4, 8])
def test_prequantized_thudm_checkpoint_loads_without_full_precision_weights(tmp_path, sp_model, pieces, bits):
    config = chatglm2_config(pieces, quantization_bit=bits, name=f"THUDM/chatglm2-6b-int{bits}")
    stored, reference = quantize_thudm(random_state_dict(config, seed=4), bits)
    assert stored["transformer.encoder.layers.0.mlp.dense_4h_to_h.weight"].dtype == torch.int8
    folder = write_checkpoint(tmp_path / f"glm2-int{bits}", sp_model, config, stored, "bin")
    loaded, logits = logits_of(folder, IDS)
    torch.testing.assert_close(logits, reference_logits(reference, config, IDS), atol=2e-4, rtol=2e-4)
    assert f"INT{bits}" in loaded.card().checkpoint


def test_int4_nibbles_even_element_high():
    values = torch.tensor([[-8, 7, 3, -1], [0, -5, 1, 2]], dtype=torch.int8)
    packed = ((values[:, 0::2] << 4) | (values[:, 1::2] & 0x0F)).to(torch.int8)
    assert packed.shape == (2, 2)
    scale = torch.tensor([0.5, 2.0], dtype=torch.float16)
    expected = values.float() * scale.float()[:, None]
    torch.testing.assert_close(dequantize(packed, scale, 4), expected)
    torch.testing.assert_close(dequantize(values, scale, 8), expected)


# ---- tokenizer -------------------------------------------------------------------------------------------


def test_special_tokens_follow_the_piece_vocabulary(sp_model, pieces):
    glm2 = ChatGLMTokenizer(sp_model, "chatglm2")
    glm3 = ChatGLMTokenizer(sp_model, "chatglm3")
    n = pieces
    assert [glm2.command(t) for t in ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")] == [n, n + 1, n + 2, n + 3, n + 4]
    assert [glm3.command(t) for t in ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")] == [
        n + 5,
        n + 6,
        n + 7,
        n + 8,
    ]
    assert len(glm2) == n + 5 and len(glm3) == n + 9
    with pytest.raises(KeyError):
        glm2.command("<|user|>")
    assert (glm3.eos_token_id, glm3.pad_token_id) == (2, 0)
    ids = glm3.prefix_ids + glm3.encode("你好 world") + [glm3.command("<|user|>")]
    assert glm3.decode(ids) == "你好 world"
    assert glm3.decode(ids, skip_special_tokens=False) == "[gMASK]sop你好 world<|user|>"


def test_streaming_never_emits_half_a_character(sp_model):
    tokenizer = ChatGLMTokenizer(sp_model, "chatglm3")
    text = "表情 😀🚀 和中文混合 text"
    ids = tokenizer.encode(text)
    assert any(tokenizer.sp.is_byte(i) for i in ids)  # the emoji go through byte fallback
    decoder = IncrementalDecoder(tokenizer)
    deltas = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_decode_drops_special_ids_and_decodes_the_rest_as_one_run(sp_model):
    """As the original tokenizer: a piece after a special id keeps its leading space, streamed or not."""
    tokenizer = ChatGLMTokenizer(sp_model, "chatglm3")
    hello, world = tokenizer.encode("Hello"), tokenizer.encode("world")  # "▁world": the dummy prefix
    assert tokenizer.sp.id_to_piece(world[0]).startswith("▁")
    ids = hello + [tokenizer.command("<|observation|>"), tokenizer.command("sop")] + world
    assert tokenizer.decode(ids) == tokenizer.sp.decode(hello + world) == "Hello world"
    decoder = IncrementalDecoder(tokenizer)
    assert "".join([decoder.push(i) for i in ids] + [decoder.flush()]) == "Hello world"
    assert tokenizer.decode(ids, skip_special_tokens=False) == "Hello<|observation|>sopworld"


# ---- chat formats ----------------------------------------------------------------------------------------


def test_chatglm2_prompt_ids(sp_model):
    tok = ChatGLMTokenizer(sp_model, "chatglm2")
    fmt = ChatGLM2Format(tok)
    single = [{"role": "user", "content": "你好"}]
    assert fmt.encode(single) == [tok.command("[gMASK]"), tok.command("sop")] + tok.sp.encode(
        "[Round 1]\n\n问：你好\n\n答："
    )
    multi = single + [{"role": "assistant", "content": "你好！"}, {"role": "user", "content": "今天天气怎么样？"}]
    round2 = tok.sp.encode("\n\n[Round 2]\n\n问：今天天气怎么样？\n\n答：")
    assert tok.sp.id_to_piece(round2[0]) == "▁"  # the dummy-prefix piece that the kept-cache turn drops
    # chat() encodes the whole prompt at once; stream_chat() with a kept cache appends the new turn alone (both
    # checked against THUDM's code run: tests/test_reference_fidelity.py).
    assert fmt.encode(multi) == fmt.encode(single)[:2] + tok.sp.encode(
        "[Round 1]\n\n问：你好\n\n答：你好！\n\n[Round 2]\n\n问：今天天气怎么样？\n\n答："
    )
    assert fmt.continuation(multi) == round2[1:]
    assert fmt.stop_token_ids == {2}


def test_chatglm3_prompt_ids(sp_model):
    tok = ChatGLMTokenizer(sp_model, "chatglm3")
    fmt = ChatGLM3Format(tok)
    enc, cmd = tok.sp.encode, tok.command
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    expected = [cmd("[gMASK]"), cmd("sop"), cmd("<|system|>")] + enc("\n") + enc("Be brief.")
    expected += [cmd("<|user|>")] + enc("\n") + enc("Hello") + [cmd("<|assistant|>")]
    assert fmt.encode(messages) == expected
    multi = messages + [{"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Bye"}]
    assert fmt.encode(multi) == expected + enc("\n") + enc("Hi.") + [cmd("<|user|>")] + enc("\n") + enc("Bye") + [
        cmd("<|assistant|>")
    ]
    assert fmt.continuation(multi) == [cmd("<|user|>")] + enc("\n") + enc("Bye") + [cmd("<|assistant|>")]
    assert fmt.stop_token_ids == {2, cmd("<|user|>"), cmd("<|observation|>")}


# ---- kept cache ------------------------------------------------------------------------------------------


def greedy_from_scratch(loaded, ids, count):
    from transformers import DynamicCache

    cache = DynamicCache(config=loaded.model.config)
    logits = prefill(loaded.model, ids, cache, loaded.device)
    out = []
    for _ in range(count):
        token = int(torch.argmax(logits))
        out.append(token)
        logits = decode_one(loaded.model, token, cache, loaded.device)
    return out


@pytest.mark.parametrize("which", ["glm2", "glm3"])
def test_new_turn_feeds_only_its_own_tokens_and_matches_a_recompute(request, which):
    folder = request.getfixturevalue(which)[0]
    loaded = load_model(ModelSpec(str(folder), "fp32", "cpu"))
    engine = Engine(loaded)
    try:
        params = SamplingParams(temperature=0, max_new_tokens=8)
        messages = [{"role": "user", "content": "Hello, how are you today?"}]
        first = engine.submit("c", messages, params).wait()
        assert first.finish_reason == "length"  # random weights: the last sampled token was never fed
        messages += [
            {"role": "assistant", "content": first.text},
            {"role": "user", "content": "The capital of France?"},
        ]
        second = engine.submit("c", messages, params).wait()
        new_turn = loaded.chat_format.continuation(messages)
        assert second.stats.reused_tokens == first.stats.prompt_tokens + first.stats.completion_tokens - 1
        assert second.stats.prefill_tokens == 1 + len(new_turn)  # the unfed last token, then the new turn only
        held = engine.pool.tokens("c")
        ids = held[: second.stats.prompt_tokens]
        assert ids[-len(new_turn) :] == new_turn
        assert held[second.stats.prompt_tokens :] == greedy_from_scratch(loaded, ids, 8)[:7]
    finally:
        engine.close()


def run_chat(folder, *extra, stdin):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "glm_core",
            "chat",
            "--model",
            str(folder),
            "--precision",
            "fp32",
            "--temperature",
            "0",
            "--max-new-tokens",
            "10",
            *extra,
        ],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.mark.slow  # over 4 s here: left out of `make test-fast`
@pytest.mark.parametrize("which", ["glm2", "glm3"])
def test_cli_multi_turn_same_replies_with_kept_cache_and_recompute(request, which):
    folder = request.getfixturevalue(which)[0]
    prompts = "你好\nThe capital of France is?\n今天天气怎么样？\n"
    kept = run_chat(folder, stdin=prompts)
    recomputed = run_chat(folder, "--recompute", stdin=prompts)
    assert len(kept) == 3
    assert [t["reply"] for t in kept] == [t["reply"] for t in recomputed]
    assert [t["prompt_tokens"] for t in kept] == [t["prompt_tokens"] for t in recomputed]


# ---- family, errors ----------------------------------------------------------------------------------------


def test_family_detection_and_override(glm2, glm3, tmp_path, env_cleanup):
    assert detect_family(glm2[0], glm2[1])[0] == "chatglm2"
    assert detect_family(glm3[0], glm3[1])[0] == "chatglm3"
    anonymous = shutil.copytree(glm2[0], tmp_path / "chatglm2-local")
    config = {**glm2[1], "_name_or_path": "local"}
    (anonymous / "config.json").write_text(json.dumps(config))
    (anonymous / "tokenizer_config.json").write_text("{}")
    assert detect_family(anonymous, config) == ("chatglm2", "folder name")
    renamed = anonymous.rename(tmp_path / "mystery")
    assert detect_family(renamed, config)[0] == "chatglm3"
    loaded = load_model(ModelSpec(str(renamed), "fp32", "cpu", family="chatglm2"))
    assert loaded.family == "ChatGLM2" and isinstance(loaded.chat_format, ChatGLM2Format)
    env_cleanup.setenv("GLM_FAMILY", "chatglm2")
    assert ModelSpec.from_settings().family == "chatglm2"


def _reason(spec):
    with pytest.raises(ModelLoadError) as info:
        load_model(spec)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_broken_chatglm_folders_get_one_line_reasons(glm2, tmp_path, pieces):
    folder, config, _ = glm2

    def copy(name):
        return shutil.copytree(folder, tmp_path / name)

    no_tok = copy("no-tokenizer")
    (no_tok / "tokenizer.model").unlink()
    assert "no tokenizer.model" in _reason(ModelSpec(str(no_tok), "fp32", "cpu"))

    bad_tok = copy("bad-tokenizer")
    (bad_tok / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    assert "SentencePiece" in _reason(ModelSpec(str(bad_tok), "fp32", "cpu"))

    truncated = copy("truncated")
    weights = truncated / "pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert "corrupt or truncated" in _reason(ModelSpec(str(truncated), "fp32", "cpu"))

    incomplete = copy("incomplete")
    sd = torch.load(incomplete / "pytorch_model.bin", weights_only=True)
    del sd["transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"]
    torch.save(sd, incomplete / "pytorch_model.bin")
    assert "incomplete" in _reason(ModelSpec(str(incomplete), "fp32", "cpu"))

    no_weights = copy("no-weights")
    (no_weights / "pytorch_model.bin").unlink()
    assert "has no weights" in _reason(ModelSpec(str(no_weights), "fp32", "cpu"))

    shape = copy("wrong-shape")
    (shape / "config.json").write_text(json.dumps({**config, "hidden_size": 96}))
    assert "do not match config.json" in _reason(ModelSpec(str(shape), "fp32", "cpu"))

    small_vocab = copy("small-vocab")
    (small_vocab / "config.json").write_text(json.dumps({**config, "padded_vocab_size": pieces + 5}))
    assert "tokens but the model only" in _reason(ModelSpec(str(small_vocab), "fp32", "cpu", family="chatglm3"))

    first_gen = tmp_path / "chatglm-6b"
    first_gen.mkdir()
    (first_gen / "config.json").write_text(
        json.dumps({"model_type": "chatglm", "vocab_size": 130528, "position_encoding_2d": True})
    )
    assert "lacks 'hidden_size', which a ChatGLM-6B config has" in _reason(ModelSpec(str(first_gen)))

    assert "unknown family" in _reason(ModelSpec(str(folder), family="chatglm9"))


def test_device_map_spreads_layers_over_gpus_when_one_is_too_small(pieces):
    from transformers import GlmForCausalLM

    config = glm_config(chatglm2_config(pieces, num_layers=6))
    with torch.device("meta"):
        model = GlmForCausalLM(config)
    layer_bytes = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    other = sum(p.numel() * 4 for p in model.parameters()) - 6 * layer_bytes
    device_map = spread_device_map(model, {0: other + 3 * layer_bytes, 1: other + 6 * layer_bytes})
    placed = {k: v for k, v in device_map.items() if k.startswith("model.layers.")}
    assert set(device_map.values()) == {0, 1}
    assert all(isinstance(v, int) for v in placed.values())  # whole layers, never split


@pytest.mark.slow  # over 4 s here: left out of `make test-fast`
def test_dashboard_chats_with_a_chatglm3_folder(glm3, env_cleanup):
    from streamlit.testing.v1 import AppTest

    from ui.resources import get_hub

    try:
        at = AppTest.from_file(str(ROOT / "Home.py"), default_timeout=300)
        at.run()
        at.text_input(key="load_path").set_value(str(glm3[0]))
        at.selectbox(key="load_precision").set_value("fp32")
        at.button(key="load_button").click().run()
        assert not at.exception and not at.error
        assert "ChatGLM3" in " ".join(c.value for c in at.sidebar.caption)
        at.slider(key="temperature").set_value(0.0)
        at.slider(key="max_new_tokens").set_value(6)
        at.chat_input[0].set_value("你好").run()
        at.chat_input[0].set_value("今天天气怎么样？").run()
        assert [m.name for m in at.chat_message] == ["user", "assistant", "user", "assistant"]
        assert "completion 6 tokens" in at.chat_message[3].caption[0].value
    finally:
        get_hub().unload()  # the next page test loads the default again


def test_glm4_hf_folder_loads_through_auto_classes(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer, GlmConfig, GlmForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = (
        "[gMASK]<sop>{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    config = GlmConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        pad_token_id=0,
        eos_token_id=[2],
    )
    folder = tmp_path / "glm-4-tiny-chat-hf"
    GlmForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "generation_config.json").write_text(  # as glm-4-9b-chat-hf ships it
        '{"do_sample": true, "eos_token_id": [2], "max_length": 128000, "temperature": 0.8, "top_p": 0.8}'
    )
    loaded = load_model(ModelSpec(str(folder), "fp32", "cpu"))
    assert loaded.family == "GLM-4"
    defaults = loaded.card().sampling_defaults
    assert (defaults["temperature"], defaults["top_p"], defaults["source"]) == (0.8, 0.8, "generation_config.json")
    assert defaults["max_length"] == 128000 and defaults["sources"]["repetition_penalty"] == "this app's defaults"
    engine = Engine(loaded)
    try:
        reply = engine.submit("c", [{"role": "user", "content": "hi"}], SamplingParams(max_new_tokens=5)).wait()
        assert reply.error is None and reply.stats.completion_tokens > 0
    finally:
        engine.close()


@pytest.mark.parametrize("level, tolerance", [("int8", 0.03), ("int4", 0.25)])
def test_chatglm_quantizes_while_loading(glm2, level, tolerance):
    from torch import nn

    from glm_core.models.quant import WeightOnlyInt4Linear, WeightOnlyInt8Embedding, WeightOnlyInt8Linear

    folder, config, sd = glm2
    loaded = load_model(ModelSpec(str(folder), level, "cpu", group_size=32))
    layers = loaded.model.model.layers
    linears = [m for m in layers.modules() if isinstance(m, nn.Linear)]
    quantized = [m for m in layers.modules() if isinstance(m, (WeightOnlyInt8Linear, WeightOnlyInt4Linear))]
    assert not linears and len(quantized) == 6 * config["num_layers"]  # q, k, v, o, gate_up, down
    assert isinstance(loaded.model.lm_head, WeightOnlyInt8Linear)  # output layer and embedding: INT8 rows
    assert isinstance(loaded.model.get_input_embeddings(), WeightOnlyInt8Embedding)
    with torch.inference_mode():
        logits = loaded.model(input_ids=torch.tensor([IDS])).logits[0].float()
    expected = reference_logits(sd, config, IDS)
    assert ((logits - expected).norm() / expected.norm()).item() < tolerance
