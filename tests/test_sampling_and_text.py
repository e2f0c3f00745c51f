"""Next-token sampling and streaming detokenization."""

import pytest
import torch

from glm_core import SamplingParams
from glm_core.engine.sampling import sample_next
from glm_core.engine.textstream import IncrementalDecoder

LOGITS = torch.tensor([1.0, 3.0, 2.5, -1.0, 0.0])


def test_temperature_zero_is_greedy():
    assert sample_next(LOGITS, SamplingParams(temperature=0)) == 1


def test_top_k_one_and_tiny_top_p_are_greedy():
    for params in (SamplingParams(temperature=1.5, top_k=1, top_p=1.0), SamplingParams(temperature=1.5, top_p=0.01)):
        assert {sample_next(LOGITS, params) for _ in range(50)} == {1}


def test_top_p_keeps_only_the_nucleus():
    # softmax mass: token 1 ~0.55, token 2 ~0.33; top_p 0.8 keeps exactly these two.
    picks = {sample_next(LOGITS, SamplingParams(temperature=1.0, top_p=0.8)) for _ in range(300)}
    assert picks == {1, 2}


@pytest.mark.parametrize(
    "temperature, top_k, top_p, spread",
    [(0.2, 0, 0.9, 3.0), (1.0, 0, 0.95, 1.0), (1.3, 0, 0.99, 0.3), (0.7, 50, 0.8, 2.0), (1.0, 40, 1.0, 1.0)],
)
def test_the_tokens_left_to_sample_are_transformers_warpers_own(temperature, top_k, top_p, spread):
    """The nucleus found without sorting the vocabulary (grown from the top candidates) keeps the tokens, with the
    probabilities, that transformers' own temperature, top-k and top-p warpers leave: at a chat's temperature (a
    few tokens) and at a flat distribution (thousands, past the first guess of candidates)."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    from glm_core.engine.sampling import _nucleus

    logits = torch.randn(49152, generator=torch.Generator().manual_seed(3)) * spread
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    warpers += [TopKLogitsWarper(top_k)] if top_k else []
    warpers += [TopPLogitsWarper(top_p)] if top_p < 1 else []
    warped = warpers(torch.zeros(1, 1, dtype=torch.long), logits[None].clone())[0]
    expected = torch.isfinite(warped).nonzero().flatten()
    values, indices = _nucleus(logits / temperature, top_k, top_p)
    assert sorted(indices.tolist()) == expected.tolist()
    ours = torch.zeros_like(logits).index_put_((indices,), torch.softmax(values, dim=-1))
    torch.testing.assert_close(ours, torch.softmax(warped, dim=-1))


def test_seeded_sampling_is_reproducible():
    params = SamplingParams(temperature=1.0, top_p=1.0)

    def run(seed):
        generator = torch.Generator().manual_seed(seed)
        return [sample_next(LOGITS, params, generator=generator) for _ in range(30)]

    assert run(7) == run(7)
    assert len(set(run(7))) > 1  # it really samples


def test_draws_follow_the_probabilities():
    """Sampled tokens come as often as their probability says: a chi-square over 100 tokens at temperature 1, about
    80 draws expected of each (its value per degree of freedom is 1 +- 0.14 for a right sampler; a sampler that
    drew at temperature 0.9 or 1.1 instead lands near 2.5 with these logits)."""
    logits = torch.randn(100, generator=torch.Generator().manual_seed(5)) * 1.5
    generator = torch.Generator().manual_seed(11)
    draws = 8_000
    counts = torch.bincount(
        torch.tensor(
            [sample_next(logits, SamplingParams(temperature=1.0, top_p=1.0), generator=generator) for _ in range(draws)]
        ),
        minlength=100,
    ).double()
    expected = torch.softmax(logits.double(), dim=-1) * draws
    chi2_per_degree = float(((counts - expected) ** 2 / expected).sum()) / 99
    assert 0.6 < chi2_per_degree < 1.4


def test_one_token_more_in_the_nucleus_does_not_change_the_seeded_reply():
    """A batched forward rounds differently from a lone one, so the nucleus can hold one token more (a near tie at
    its edge). The same seed still draws the same tokens, unless that extra token is the one drawn."""
    from glm_core.engine.sampling import _nucleus

    logits = torch.randn(49152, generator=torch.Generator().manual_seed(8)) * 2
    probs = torch.softmax(logits.double(), dim=-1).sort(descending=True).values
    edge_mass = float(probs[:400].sum())  # the mass before the 401st most likely token
    narrow, wide = (
        SamplingParams(temperature=1.0, top_p=edge_mass - 1e-6),
        SamplingParams(temperature=1.0, top_p=edge_mass + 1e-6),
    )
    assert len(_nucleus(logits, 0, narrow.top_p)[1]) == 400 and len(_nucleus(logits, 0, wide.top_p)[1]) == 401
    edge = int(_nucleus(logits, 0, wide.top_p)[1][-1])

    def run(params):
        generator = torch.Generator().manual_seed(21)
        return [sample_next(logits, params, generator=generator) for _ in range(300)]

    alone, batched = run(narrow), run(wide)
    differ = [i for i, (a, b) in enumerate(zip(alone, batched)) if a != b]
    assert all(batched[i] == edge for i in differ) and len(differ) < 10


def test_repetition_penalty_discourages_seen_tokens():
    params = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert sample_next(LOGITS, params, seen_ids=torch.tensor([1])) == 2


@pytest.fixture(scope="module")
def tokenizer(tiny_loaded):
    return tiny_loaded.tokenizer


@pytest.mark.parametrize(
    "text", ["你好，世界！这是一个测试。", "Emoji 🌍🚀 and accents: naïve café", "plain words, spaces  twice"]
)
def test_streamed_deltas_add_up_and_never_split_a_character(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decoder = IncrementalDecoder(tokenizer)
    deltas = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)
    assert sum(1 for d in deltas if d) > 1  # it really streams
