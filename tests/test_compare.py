"""The chat's Compare mode in the core: one prompt to two levels of a model at once, each reply with its figures,
saved as a comparison and voted on blind."""

import pytest

from glm_core import ModelSpec, SamplingParams
from glm_core.backends.hub import BackendHub
from glm_core.bench.estimator import spec_weights_bytes
from glm_core.conversations.arena import Arena, ArenaError, ranking
from glm_core.conversations.compare import CompareRun, CompareTarget


@pytest.fixture(scope="module")
def two_levels():
    """The embedded model at INT8 (the main slot) and INT4 (beside it)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GLM_COMPILE", "off")
        hub = BackendHub(predict_weights=spec_weights_bytes)
        main = hub.load(ModelSpec("embedded", "int8", "cpu"))
        label, beside = hub.load_beside(ModelSpec("embedded", "int4", "cpu"))
    yield [CompareTarget("SmolLM2 INT8", main), CompareTarget(label, beside)]
    hub.close()


@pytest.mark.slow  # over 4 s here: left out of `make test-fast`
def test_one_prompt_streams_from_two_levels_at_once(two_levels, data_dir):
    run = CompareRun(
        two_levels,
        [{"role": "user", "content": "Describe a lighthouse at night."}],
        SamplingParams(temperature=0, max_new_tokens=24),
        owner="ws",
        blind=True,
        seed=1,
    ).start()
    seen_both_running = False
    while not run.wait(0.01):
        texts = [c.text for c in run.columns]
        seen_both_running |= all(texts) and not any(c.done for c in run.columns)
    assert seen_both_running  # both columns had text before either had finished
    assert [run.heading(i) for i in range(2)] == ["Answer A", "Answer B"]
    for column in run.columns:
        stats = column.stats()
        assert stats["completion_tokens"] == 24 and stats["ttft_s"] > 0 and stats["decode_tokens_per_s"] > 0
        assert stats["memory_bytes"] >= stats["weights_bytes"] > 0
        assert column.describe().startswith(f"{stats['model']} · {stats['precision']} · 24 tokens")
    arena = Arena()
    with pytest.raises(ArenaError, match="save the comparison"):
        run.vote(arena, "ws", 0)
    comparison_id = run.finish(arena, "ws")
    stored = arena.comparison("ws", comparison_id)
    assert stored.blind and [c.config for c in stored.columns] == [c.target.label for c in run.columns]
    assert stored.columns[0].text == run.columns[0].text and stored.columns[0].stats["completion_tokens"] == 24
    run.vote(arena, "ws", 1)
    assert run.heading(1) == run.columns[1].target.label  # revealed after the vote
    assert stored.prompt == "Describe a lighthouse at night." and arena.comparison(
        "ws", comparison_id
    ).best == run.heading(1)
    (first, second) = ranking(arena.votes())
    assert first.config == run.columns[1].target.label and first.wins == 1 and second.losses == 1


def test_blind_order_is_shuffled_per_comparison(two_levels):
    orders = {
        tuple(c.target.label for c in CompareRun(two_levels, [], SamplingParams(), blind=True, seed=s).columns)
        for s in range(20)
    }
    assert len(orders) == 2
    plain = CompareRun(two_levels, [], SamplingParams(), blind=False, seed=3)
    assert [plain.heading(i) for i in range(2)] == [t.label for t in two_levels]


def test_one_configuration_alone_is_no_comparison(two_levels):
    with pytest.raises(ArenaError, match="2 to 4"):
        CompareRun(two_levels[:1], [], SamplingParams())
