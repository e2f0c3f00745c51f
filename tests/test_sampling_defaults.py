"""Sampling defaults per model: generation_config.json, then the family's documented defaults, then ours; and a
workspace's own changes on top (glm_core.sampling_defaults is torch-free and tested directly)."""

import json

import pytest

from glm_core.sampling_defaults import (
    GENERATION_CONFIG,
    OURS,
    REQUEST,
    YOURS,
    clean_overrides,
    compose_params,
    describe_sources,
    effective_controls,
    from_generation_config,
    model_defaults,
    read_generation_config,
    server_defaults,
)


def test_generation_config_wins_field_by_field(tmp_path):
    (tmp_path / GENERATION_CONFIG).write_text(
        json.dumps(
            {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_length": 128000, "eos_token_id": 2}
        )
    )
    defaults = model_defaults("qwen2", "Qwen-tiny", read_generation_config(tmp_path), max_context=32768)
    assert (defaults["temperature"], defaults["top_p"], defaults["top_k"]) == (0.6, 0.95, 20)
    assert defaults["sources"]["temperature"] == GENERATION_CONFIG and defaults["source"] == GENERATION_CONFIG
    assert defaults["repetition_penalty"] == 1.1 and defaults["sources"]["repetition_penalty"] == OURS
    # More than the model's context: capped, and the source says so.
    assert defaults["max_length"] == 32768 and defaults["sources"]["max_length"] == "the model's context length"


def test_family_documented_defaults_and_ours():
    glm2 = model_defaults("ChatGLM2", "chatglm2-6b", {})
    assert (glm2["temperature"], glm2["top_p"], glm2["max_length"]) == (0.8, 0.8, 8192)
    # The original chat() penalises nothing and uses no top-k: written out, so ours (1.1) never fills them in.
    assert (glm2["repetition_penalty"], glm2["top_k"]) == (1.0, 0)
    assert glm2["sources"]["top_p"] == glm2["sources"]["repetition_penalty"] == "ChatGLM2/3 documented defaults"
    glm6b = model_defaults("ChatGLM-6B", "chatglm-6b", {}, max_context=2048)
    assert (glm6b["temperature"], glm6b["top_p"], glm6b["max_length"]) == (0.95, 0.7, 2048)
    assert glm6b["max_new_tokens"] == 1024 and glm6b["repetition_penalty"] == 1.0
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
        "ChatGLM2/3 documented defaults: max length 8192, top p 0.8, top k 0, repetition penalty 1",
        "this app's defaults: max new tokens 1024",
        "your settings: temperature 0.3 (model: 0.8)",
    ]
    # A default beyond what the page's controls offer is brought within them.
    assert effective_controls(model_defaults("x", "y", {"max_new_tokens": 100_000, "max_length": 200_000}), {})[
        "max_new_tokens"
    ] == (4096, GENERATION_CONFIG)


def test_one_composition_for_every_door():
    """The request's own field, else the person's saved setting, else the model's defaults; what was set is
    named (a remote backend sends only that)."""
    defaults = model_defaults("ChatGLM2", "chatglm2-6b", {"top_k": 5, "do_sample": True})
    params, sources = compose_params(
        defaults, {"temperature": 0, "top_p": None}, {"temperature": 0.3, "top_p": 0.5}, seed=4
    )
    assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty) == (0, 0.5, 5, 1.0)
    assert (sources["temperature"], sources["top_p"], sources["top_k"]) == (REQUEST, YOURS, GENERATION_CONFIG)
    assert params.explicit == {"temperature", "top_p"} and params.seed == 4
    assert params.is_explicit("top_p") and not params.is_explicit("repetition_penalty")
    # Nothing set: the model's defaults, nothing explicit; the reply's room fits a smaller max_length.
    params, _ = compose_params(defaults, {"max_length": 100})
    assert params.max_new_tokens == 99 and params.explicit == {"max_length"}
    # A bad request value is refused with its reason; a bad saved one (an older version's) is dropped.
    with pytest.raises(ValueError, match="top_p"):
        compose_params(defaults, {"top_p": 1.5})
    with pytest.raises(ValueError, match="unknown sampling controls: min_p"):
        compose_params(defaults, {"min_p": 0.1})
    assert compose_params(defaults, saved={"top_p": 7, "x": 1})[0].top_p == 0.8
    # The page's stored reply parameters stay JSON: `explicit` is not one of them.
    assert "explicit" not in params.as_dict()


def test_a_servers_announced_defaults():
    announced = {
        "temperature": 0.8,
        "top_p": 0.8,
        "top_k": 0,
        "repetition_penalty": 1.0,
        "max_new_tokens": 1024,
        "max_length": 8192,
        "sources": {"temperature": "ChatGLM2/3 documented defaults"},
    }
    defaults = server_defaults("h:1", announced)
    assert (defaults["temperature"], defaults["repetition_penalty"]) == (0.8, 1.0)
    assert defaults["sources"]["temperature"] == "h:1: ChatGLM2/3 documented defaults"
    unknown = server_defaults("h:1", {"temperature": "hot"})  # a server that says nothing (or nonsense)
    assert unknown["sources"]["temperature"] == "h:1's own (not known here, not sent)"
