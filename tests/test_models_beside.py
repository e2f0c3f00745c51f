"""Several local models loaded at once (the chat's Compare mode): within GLM_MODELS_MEMORY_MB, refused with the
estimator's figures when they would not fit, and taking turns on the device."""

import uuid

import pytest

from glm_core import ModelSpec, SamplingParams
from glm_core.backends.hub import BackendHub, ModelDoesNotFit
from glm_core.bench.estimator import spec_weights_bytes


@pytest.fixture
def hub(monkeypatch):
    monkeypatch.setenv("GLM_KV_CACHE_MB", "64")
    monkeypatch.setenv("GLM_COMPILE", "off")
    hub = BackendHub(predict_weights=spec_weights_bytes)
    yield hub
    hub.close()


@pytest.mark.slow  # over 4 s here: left out of `make test-fast`
def test_a_level_beside_the_main_model_within_the_budget(hub, tiny_model_dir, monkeypatch):
    main = hub.load(ModelSpec(str(tiny_model_dir), "fp32", "cpu"))
    bf16 = ModelSpec(str(tiny_model_dir), "bf16", "cpu")
    plan = hub.memory_plan()
    (charged,) = plan["models"]
    assert charged["name"] == "local" and charged["weights_bytes"] == main.loaded.weights["total"]
    assert charged["kv_budget_bytes"] == 2 * 64 * 2**20  # the kept caches' budget and the running batch's
    # the estimator's prediction of the BF16 weights, before loading: what the loader then really holds
    predicted = spec_weights_bytes(bf16)
    need = predicted + 2 * 64 * 2**20
    monkeypatch.setenv("GLM_MODELS_MEMORY_MB", str((charged["bytes"] + need) // 2**20 - 1))
    with pytest.raises(ModelDoesNotFit, match="GLM_MODELS_MEMORY_MB allows") as refused:
        hub.load_beside(bf16)
    assert "local" in str(refused.value) and not hub.beside()  # the figures, and nothing loaded
    monkeypatch.setenv("GLM_MODELS_MEMORY_MB", str((charged["bytes"] + need) // 2**20 + 1))
    label, backend = hub.load_beside(bf16)
    assert backend.loaded.weights["total"] == predicted
    assert hub.load_beside(bf16) == (label, backend)  # loaded once
    assert hub.load_beside(ModelSpec(str(tiny_model_dir), "fp32", "cpu"))[1] is main  # the main one is reused
    assert set(hub.local_models()) == {"local", label} and label.endswith("BF16")
    with pytest.raises(ModelDoesNotFit, match="allows"):  # the budget is full now
        hub.load_beside(ModelSpec(str(tiny_model_dir), "int8", "cpu"))
    hub.unload_beside(label)
    assert not hub.beside() and backend.loaded.model is None


def test_a_model_that_cannot_be_predicted_is_not_loaded_beside(hub, tmp_path, tiny_model_dir):
    with pytest.raises(ModelDoesNotFit, match="cannot be predicted"):
        hub.load_beside(ModelSpec(str(tmp_path / "nothing-here"), "bf16", "cpu"))
    without_estimator = BackendHub()
    with pytest.raises(ModelDoesNotFit, match="no memory estimator"):
        without_estimator.load_beside(ModelSpec(str(tiny_model_dir), "bf16", "cpu"))
    assert not without_estimator.beside()


@pytest.mark.slow  # over 4 s here: left out of `make test-fast`
def test_local_models_take_turns_on_the_device(hub, tiny_model_dir):
    """Two models decoding at once step alternately: each waits at most one step of the other."""
    hub.load(ModelSpec(str(tiny_model_dir), "fp32", "cpu"))
    _, beside = hub.load_beside(ModelSpec(str(tiny_model_dir), "bf16", "cpu"))
    params = SamplingParams(temperature=0, max_new_tokens=80)
    messages = [{"role": "user", "content": "Tell me a long story."}]
    hub.turns.recent.clear()
    requests = [backend.submit(uuid.uuid4().hex, messages, params) for backend in (hub.engine, beside)]
    replies = [r.wait(300) for r in requests]
    assert all(r is not None and r.stats.completion_tokens == 80 for r in replies)
    turns = list(hub.turns.recent)
    names = {hub.engine.turn_name, beside.turn_name}
    assert set(turns) == names
    # while both were decoding (until the first of them had its last turn), no engine took two turns in a row
    # more than once (a worker that is between its turns when the other releases may miss one alternation)
    overlap_end = min(max(i for i, t in enumerate(turns) if t == name) for name in names)
    repeats = sum(1 for a, b in zip(turns[:overlap_end], turns[1:overlap_end]) if a == b)
    assert repeats <= 3, turns
    counts = {name: turns[:overlap_end].count(name) for name in names}
    assert max(counts.values()) - min(counts.values()) <= 3, counts
