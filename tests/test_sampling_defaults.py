"""Sampling defaults per model: generation_config.json, then the family's documented defaults, then ours; and a
workspace's own changes on top (glm_core.sampling_defaults is torch-free and tested directly)."""

import json

from glm_core.sampling_defaults import (
    GENERATION_CONFIG, OURS, clean_overrides, describe_sources, effective_controls, from_generation_config,
    model_defaults, read_generation_config,
)


def test_generation_config_wins_field_by_field(tmp_path):
    (tmp_path / GENERATION_CONFIG).write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_length": 128000, "eos_token_id": 2}))
    defaults = model_defaults("qwen2", "Qwen-tiny", read_generation_config(tmp_path), max_context=32768)
    assert (defaults["temperature"], defaults["top_p"], defaults["top_k"]) == (0.6, 0.95, 20)
    assert defaults["sources"]["temperature"] == GENERATION_CONFIG and defaults["source"] == GENERATION_CONFIG
    assert defaults["repetition_penalty"] == 1.1 and defaults["sources"]["repetition_penalty"] == OURS
    # More than the model's context: capped, and the source says so.
    assert defaults["max_length"] == 32768 and defaults["sources"]["max_length"] == "the model's context length"


def test_family_documented_defaults_and_ours():
    glm2 = model_defaults("ChatGLM2", "chatglm2-6b", {})
    assert (glm2["temperature"], glm2["top_p"], glm2["max_length"]) == (0.8, 0.8, 8192)
    assert glm2["sources"]["top_p"] == "ChatGLM2/3 documented defaults" and glm2["repetition_penalty"] == 1.1
    glm6b = model_defaults("ChatGLM-6B", "chatglm-6b", {}, max_context=2048)
    assert (glm6b["temperature"], glm6b["top_p"], glm6b["max_length"]) == (0.95, 0.7, 2048)
    assert glm6b["max_new_tokens"] == 1024
    smol = model_defaults("llama", "SmolLM2-135M-Instruct", {})
    assert (smol["temperature"], smol["top_p"], smol["sources"]["temperature"]) == (0.2, 0.9, "SmolLM2 model card")
    other = model_defaults("llama", "some-model", {})
    assert other["source"] == OURS and set(other["sources"].values()) == {OURS}


def test_what_a_generation_config_does_not_recommend(tmp_path):
    assert from_generation_config({"_from_model_config": True, "temperature": 1.0, "top_k": 50}) == {}
    assert from_generation_config({"do_sample": False, "temperature": 0.7, "top_k": 5}) == {"temperature": 0.0}
    # Values out of range or of the wrong type are ignored, not trusted.
    assert from_generation_config({"temperature": "hot", "top_p": 7, "top_k": True, "max_length": float("nan")}) == {}
    assert read_generation_config(tmp_path) == {}  # no file
    (tmp_path / GENERATION_CONFIG).write_text("[1, 2]")
    assert read_generation_config(tmp_path) == {}


def test_a_workspace_keeps_its_own_changes_over_the_defaults():
    defaults = model_defaults("ChatGLM3", "chatglm3-6b", {})
    overrides = clean_overrides({"temperature": 0.3, "top_p": 0.8, "top_k": -4, "bogus": 1}, defaults)
    assert overrides == {"temperature": 0.3}  # unchanged and invalid ones are not kept
    controls = effective_controls(defaults, overrides)
    assert controls["temperature"] == (0.3, "your setting")
    assert controls["top_p"] == (0.8, "ChatGLM2/3 documented defaults")
    assert describe_sources(controls, defaults) == [
        "ChatGLM2/3 documented defaults: max length 8192, top p 0.8",
        "this app's defaults: max new tokens 1024, top k 0, repetition penalty 1.1",
        "your settings: temperature 0.3 (model: 0.8)",
    ]
    # A default beyond what the page's controls offer is brought within them.
    assert effective_controls(model_defaults("x", "y", {"max_new_tokens": 100_000, "max_length": 200_000}), {})[
        "max_new_tokens"] == (4096, GENERATION_CONFIG)
