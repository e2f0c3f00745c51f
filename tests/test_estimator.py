"""The memory estimator: exact weights per level, KV cache with grouped attention, the published ChatGLM2-6B table,
and the `estimate` command line."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from glm_core.bench.estimator import GB, PRESETS, ConfigError, estimate, model_config, published, read_config
from glm_core.bench.memory.child import build_random_model
from glm_core.models.precision import Precision

SMALL_GLM = {  # ChatGLM2's layout (THUDM config.json), small enough to build for real in a test
    "model_type": "chatglm",
    "add_bias_linear": False,
    "add_qkv_bias": True,
    "ffn_hidden_size": 704,
    "hidden_size": 256,
    "kv_channels": 32,
    "layernorm_epsilon": 1e-05,
    "multi_query_attention": True,
    "multi_query_group_num": 2,
    "num_attention_heads": 8,
    "num_layers": 2,
    "padded_vocab_size": 3000,
    "post_layer_norm": True,
    "rmsnorm": True,
    "seq_length": 4096,
}


@pytest.mark.parametrize("level", [p.value for p in Precision])
@pytest.mark.parametrize("which", ["chatglm2-layout", "tied-llama", "chatglm-6b-layout"])
def test_predicted_weights_are_the_bytes_of_the_built_model(level, which, tiny_model_dir):
    if which == "chatglm2-layout":
        cfg = SMALL_GLM
    elif which == "tied-llama":
        cfg = json.loads((tiny_model_dir / "config.json").read_text())
    else:
        cfg = {
            "model_type": "chatglm",
            "position_encoding_2d": True,
            "hidden_size": 128,
            "inner_hidden_size": 512,
            "num_layers": 2,
            "num_attention_heads": 4,
            "vocab_size": 1000,
            "max_sequence_length": 512,
        }
    [predicted] = estimate(cfg, [level], encode=16, generate=32)
    model = build_random_model(model_config(cfg), Precision(level), 32, torch.device("cpu"))
    # The independent count: the bytes of every distinct storage the built model's state_dict holds (packed INT4
    # and INT8 buffers with their scales; a tied output layer once), not weight_bytes, which the estimator calls.
    storages = {(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in model.state_dict().values()}
    assert predicted.weights_bytes == sum(nbytes for _, nbytes in storages)
    with torch.inference_mode():  # and the built model runs at that level
        assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape[-1] >= 1000


def test_kv_cache_per_token_follows_grouped_attention():
    per_token = {name: estimate(read_config(name)[1], ["fp16"], 1, 1)[0].kv_bytes_per_token for name in PRESETS}
    assert per_token["chatglm2-6b"] == 2 * 28 * 2 * 128 * 2  # multi-query: 2 groups of keys and values
    assert per_token["chatglm3-6b"] == per_token["chatglm2-6b"]
    assert per_token["glm-4-9b"] == 2 * 40 * 2 * 128 * 2
    assert per_token["chatglm-6b"] == 2 * 28 * 32 * 128 * 2  # every head keeps its keys and values
    [int4] = estimate(read_config("chatglm2-6b")[1], ["int4"], 1, 1)
    assert int4.kv_bytes_per_token == per_token["chatglm2-6b"]  # weight-only: the cache stays BF16


def test_chatglm_6b_has_its_published_parameter_count():
    """First-generation ChatGLM-6B, estimated through the module that runs it (output layer tied: 6.17 B)."""
    from glm_core.models.chatglm.glm6b import ChatGLM6BForCausalLM

    h, ffn, layers, vocab = 4096, 16384, 28, 130528
    per_layer = (h * 3 * h + 3 * h) + (h * h + h) + (h * ffn + ffn) + (ffn * h + h) + 4 * h
    params = layers * per_layer + vocab * h + 2 * h
    [fp16] = estimate(read_config("chatglm-6b")[1], ["fp16"], 1, 1)
    assert fp16.weights_bytes == 2 * params
    config = model_config(read_config("chatglm-6b")[1])
    with torch.device("meta"):
        module = ChatGLM6BForCausalLM(config)
    assert sum(p.numel() for p in module.parameters()) == params == 6_173_286_400


def test_chatglm2_6b_prediction_against_the_published_table():
    table = published("chatglm2-6b", 2048, 8192)
    predicted = {
        e.level: e for e in estimate(read_config("chatglm2-6b")[1], ["fp16", "int8", "int4"], 2048, 8192, "cuda")
    }
    fp16 = predicted["fp16"]
    assert abs(fp16.encode_peak_bytes / table["fp16"][0] - 1) < 0.10
    assert abs(fp16.generate_peak_bytes / table["fp16"][1] - 1) < 0.10
    for level in ("int8", "int4"):  # no FP16 copy and an INT8 embedding/output layer: below the original
        assert predicted[level].encode_peak_bytes < table[level][0]
        assert predicted[level].generate_peak_bytes < table[level][1]
    assert 12.4 * GB < fp16.weights_bytes < 12.6 * GB  # 6.24 B parameters
    assert published("chatglm2-6b", 1024, 8192) is None  # only for the conditions it was measured under


def test_longer_contexts_cost_what_their_cache_and_activations_say():
    cfg = read_config("chatglm2-6b")[1]
    short, long = (estimate(cfg, ["bf16"], n, n)[0] for n in (1024, 4096))
    assert long.generate_peak_bytes - short.generate_peak_bytes >= 3072 * short.kv_bytes_per_token
    assert long.encode_activation_bytes > short.encode_activation_bytes  # attention over a longer context
    cpu, cuda = estimate(cfg, ["bf16"], 16, 16, "cpu")[0], estimate(cfg, ["bf16"], 16, 16, "cuda")[0]
    assert cpu.runtime_bytes != cuda.runtime_bytes


def test_bad_configs_are_refused_with_a_reason(tmp_path):
    with pytest.raises(ConfigError, match="neither a preset"):
        read_config(str(tmp_path / "missing"))
    broken = tmp_path / "config.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_config(str(broken))
    with pytest.raises(ConfigError, match="lacks"):
        estimate({"model_type": "chatglm", "hidden_size": 64}, ["bf16"], 1, 1)
    with pytest.raises(ConfigError, match="at least 1"):
        estimate(SMALL_GLM, ["bf16"], 0, 1)
    with pytest.raises(ValueError, match="unknown precision"):
        estimate(SMALL_GLM, ["int3"], 1, 1)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "glm_core", *args], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.slow  # over 4 s here: left out of `make test-fast`
def test_estimate_command_prints_json_per_level(tmp_path):
    done = run_cli("estimate", "--config", "chatglm2-6b", "--levels", "fp16,int8,int4", "--json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [r["level"] for r in rows] == ["fp16", "int8", "int4"]
    assert all({"weights_bytes", "encode_peak_bytes", "generate_peak_bytes"} <= set(r) for r in rows)
    assert rows[0]["weights_bytes"] > rows[1]["weights_bytes"] > rows[2]["weights_bytes"]
    config = tmp_path / "config.json"
    config.write_text(json.dumps(SMALL_GLM))
    table = run_cli("estimate", "--config", str(config), "--levels", "bf16", "--encode", "100", "--generate", "200")
    assert table.returncode == 0 and "bf16" in table.stdout and "encode peak GB" in table.stdout
    bad = run_cli("estimate", "--config", str(tmp_path / "nope.json"))
    assert bad.returncode == 2 and "neither a preset" in bad.stderr and "Traceback" not in bad.stderr
