"""Loading from a spec, and a one-line reason for everything that is not a usable model."""

import dataclasses
import json

import pytest
import torch
from test_dense_kernel import like_a_loaded_model

from glm_core import EngineClosed, ModelLoadError, ModelSpec
from glm_core.backends.hub import BackendHub
from glm_core.models import Precision, load_model
from glm_core.models.loading import STREAMED, convert_gguf, embedded_gguf_path
from glm_core.models.precision import parse_precision, resolve_device
from glm_core.settings import load_settings


def test_embedded_model_card(embedded_fp32):
    card = embedded_fp32.card()
    assert card.name == "SmolLM2-135M-Instruct"
    assert card.precision == "FP32" and card.device == "cpu"
    assert 130e6 < card.parameters < 140e6 and card.max_context == 8192
    assert card.sampling_defaults["sources"]["temperature"] == "SmolLM2 model card"
    assert next(embedded_fp32.model.parameters()).dtype == torch.float32


def test_a_loaded_models_card_is_typed_and_its_dict_keeps_only_what_is_known(embedded_fp32):
    """The loader's facts land in ModelCard's fields (a stray one would be a TypeError); to_dict leaves out what a
    loaded model cannot know (the engine's and a remote server's parts), as the dict it replaced did."""
    card = embedded_fp32.card()
    with pytest.raises(dataclasses.FrozenInstanceError):
        card.name = "other"  # type: ignore[misc]
    assert card.loader == STREAMED and card.backend == "local" and not card.remote
    assert card.weights_bytes > card.quantized_weights_bytes >= 0 and card.kv_bytes_per_token > 0
    as_json = json.loads(json.dumps(card.to_dict()))
    assert {"name", "family", "precision", "device", "source", "max_context", "weights_bytes", "loader"} <= set(as_json)
    assert not {"server", "status", "unknown_remotely", "max_batch", "fast_path"} & set(as_json)


@pytest.mark.parametrize("precision, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precisions_load(tiny_model_dir, precision, dtype):
    loaded = load_model(ModelSpec(str(tiny_model_dir), precision, "cpu"))
    assert next(loaded.model.parameters()).dtype == dtype
    assert loaded.precision.label == precision.upper()


def test_auto_precision_and_device():
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    assert parse_precision("auto", torch.device("cpu")) is Precision.BF16
    assert parse_precision("FP16", torch.device("cpu")) is Precision.FP16
    with pytest.raises(ValueError, match="unknown precision"):
        parse_precision("fp8", torch.device("cpu"))


def _reason(spec) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_model(spec)
    reason = str(info.value)
    assert "\n" not in reason and len(reason) < 400
    return reason


def test_bad_model_paths_give_one_line_reasons(tmp_path, tiny_model_dir):
    assert "no such file" in _reason(ModelSpec(str(tmp_path / "missing")))
    assert "no config.json" in _reason(ModelSpec(str(tmp_path)))
    (tmp_path / "notes.txt").write_text("hello")
    assert "not a .gguf" in _reason(ModelSpec(str(tmp_path / "notes.txt")))
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + b"\x00garbage" * 10)
    assert "GGUF" in _reason(ModelSpec(str(tmp_path / "broken.gguf")))


def test_corrupt_weights_and_missing_tokenizer(tmp_path, tiny_model_dir):
    import shutil

    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_model_dir, corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])  # truncated download
    reason = _reason(ModelSpec(str(corrupt), "fp32", "cpu"))
    assert "weights" in reason and "truncated" in reason
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}" + bytes(64))  # garbage header
    assert "model.safetensors is corrupt" in _reason(ModelSpec(str(corrupt), "int8", "cpu"))

    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(tiny_model_dir / name, no_tokenizer / name)
    assert "tokenizer" in _reason(ModelSpec(str(no_tokenizer), "fp32", "cpu"))

    bad_json = tmp_path / "bad-json"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{not json")
    assert "not valid JSON" in _reason(ModelSpec(str(bad_json)))


def test_unavailable_levels_and_devices_are_refused(tiny_model_dir):
    assert "group size" in _reason(ModelSpec(str(tiny_model_dir), "int4", "cpu", group_size=48))
    if not torch.cuda.is_available():
        assert "CUDA" in _reason(ModelSpec(str(tiny_model_dir), "fp32", "cuda"))
    assert "unknown device" in _reason(ModelSpec(str(tiny_model_dir), "fp32", "tpu"))


def test_chatglm_original_layout_is_recognised(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "chatglm"}))
    assert "ChatGLM" in _reason(ModelSpec(str(tmp_path)))


def test_hub_keeps_the_running_model_when_another_fails(tiny_model_dir, tmp_path):
    hub = BackendHub()
    try:
        spec = ModelSpec(str(tiny_model_dir), "fp32", "cpu")
        engine = hub.load(spec)
        assert hub.load(spec) is engine  # same spec: no reload
        with pytest.raises(ModelLoadError):
            hub.load(ModelSpec(str(tmp_path / "nope")))
        assert hub.engine is engine and "no such file" in hub.last_error
        replacement = hub.load(ModelSpec(str(tiny_model_dir), "bf16", "cpu"))
        assert replacement is not engine and hub.engine is replacement
        with pytest.raises(EngineClosed, match="unloaded or replaced"):
            engine.submit("c", [{"role": "user", "content": "hi"}])  # the old engine was shut down
    finally:
        hub.unload()


def test_settings_from_environment(tmp_path):
    s = load_settings(
        {"GLM_MODEL_PATH": "/m", "GLM_PRECISION": "fp16", "GLM_KV_CACHE_MB": "64", "GLM_CACHE_DIR": str(tmp_path)}
    )
    assert (s.model_path, s.precision, s.device, s.kv_cache_bytes) == ("/m", "fp16", "auto", 64 * 2**20)
    assert load_settings({}).model_path == "embedded"
    with pytest.raises(ValueError, match="GLM_KV_CACHE_MB"):
        load_settings({"GLM_KV_CACHE_MB": "lots"})


def _logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([[1, 500, 9000, 40000, 17, 3, 28]])).logits


@pytest.mark.parametrize("which", ["tiny_loaded", "embedded_fp32"])
def test_streamed_load_equals_from_pretrained(request, which):
    """Hugging Face folders are read tensor by tensor into a meta-built model: same logits as from_pretrained, bit
    for bit (the tiny Llama and the embedded model both tie the output layer to the embedding); the reference's
    layers multiply as the loaded model's do (our dense product where chosen, fused q/k/v and gate/up)."""
    from transformers import AutoModelForCausalLM

    loaded = request.getfixturevalue(which)
    assert loaded.extra["loader"] == STREAMED
    model = loaded.model
    assert model.lm_head.weight is model.get_input_embeddings().weight
    embedded = which == "embedded_fp32"
    folder = convert_gguf(embedded_gguf_path(), load_settings().cache_dir) if embedded else loaded.spec.path
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert torch.equal(_logits(model), _logits(like_a_loaded_model(reference)))
    assert {n: b.dtype for n, b in model.named_buffers()} == {n: b.dtype for n, b in reference.named_buffers()}


def _copy_with_weights(tiny_model_dir, target, edit):
    """The tiny model's folder with its weights rewritten by `edit(state_dict) -> (state_dict, file name)`."""
    import shutil

    from safetensors.torch import load_file

    shutil.copytree(tiny_model_dir, target)
    state, name = edit(load_file(target / "model.safetensors"))
    (target / "model.safetensors").unlink()
    if name.endswith(".bin"):
        torch.save(state, target / name)
    else:
        from safetensors.torch import save_file

        save_file(state, str(target / name))
    return target


def test_folders_the_streaming_loader_does_not_understand_use_from_pretrained(tmp_path, tiny_model_dir, tiny_loaded):
    pickled = _copy_with_weights(tiny_model_dir, tmp_path / "bin", lambda sd: (sd, "pytorch_model.bin"))
    loaded = load_model(ModelSpec(str(pickled), "fp32", "cpu"))
    assert loaded.extra["loader"].startswith("from_pretrained") and ".bin" in loaded.extra["loader"]
    assert torch.equal(_logits(loaded.model), _logits(tiny_loaded.model))

    extra = _copy_with_weights(
        tiny_model_dir,
        tmp_path / "extra",
        lambda sd: ({**sd, "model.adapter.weight": torch.zeros(2)}, "model.safetensors"),
    )
    loaded = load_model(ModelSpec(str(extra), "int8", "cpu"))  # from_pretrained ignores the key, then quantizes
    assert "model.adapter.weight" in loaded.extra["loader"] and loaded.precision is Precision.INT8


def test_incomplete_or_misshapen_hf_weights_give_one_line_reasons(tmp_path, tiny_model_dir):
    def drop_layer_weight(sd):
        del sd["model.layers.1.mlp.down_proj.weight"]
        return sd, "model.safetensors"

    incomplete = _copy_with_weights(tiny_model_dir, tmp_path / "incomplete", drop_layer_weight)
    for level in ("fp32", "int4"):
        reason = _reason(ModelSpec(str(incomplete), level, "cpu"))
        assert "incomplete" in reason and "model.layers.1.mlp.down_proj.weight" in reason

    def narrow_layer_weight(sd):
        sd["model.layers.0.mlp.up_proj.weight"] = sd["model.layers.0.mlp.up_proj.weight"][:100]
        return sd, "model.safetensors"

    misshapen = _copy_with_weights(tiny_model_dir, tmp_path / "misshapen", narrow_layer_weight)
    for level in ("bf16", "int8"):
        assert "do not match config.json" in _reason(ModelSpec(str(misshapen), level, "cpu"))


def test_auto_on_a_cpu_takes_bf16_only_where_it_is_native_and_faster():
    from glm_core.models.precision import auto_cpu_precision

    gib = 2**30
    native, plain = {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}, {"avx2", "fma", "f16c"}
    chosen, why = auto_cpu_precision(1 * gib, 16 * gib, flags=native, speedup=1.8)
    assert chosen is Precision.BF16 and "avx512_bf16, amx_bf16" in why and "1.8x" in why
    chosen, why = auto_cpu_precision(1 * gib, 16 * gib, flags=plain, speedup=0.4)
    assert chosen is Precision.FP32 and "no native BF16" in why and "0.40x" in why
    chosen, why = auto_cpu_precision(1 * gib, 16 * gib, flags=native, speedup=0.9)  # native, yet slower here
    assert chosen is Precision.FP32 and "0.90x" in why
    chosen, why = auto_cpu_precision(12 * gib, 16 * gib, flags=plain, speedup=0.4)  # FP32 would not fit
    assert chosen is Precision.BF16 and "12.0 GiB" in why


def test_auto_on_this_cpu_says_what_it_chose_and_why(tiny_model_dir):
    from glm_core.models.precision import NATIVE_BF16_FLAGS, cpu_flags, measured_bf16_speedup

    loaded = load_model(ModelSpec(str(tiny_model_dir), "auto", "cpu"))
    card = loaded.card()
    native = any(flag in cpu_flags() for flag in NATIVE_BF16_FLAGS) and measured_bf16_speedup() > 1
    assert card.precision == ("BF16" if native else "FP32")
    assert card.precision_source.startswith(f"auto: {card.precision}")
    explicit = load_model(ModelSpec(str(tiny_model_dir), "bf16", "cpu")).card()  # a level asked for is kept
    assert explicit.precision == "BF16" and explicit.precision_source is None
