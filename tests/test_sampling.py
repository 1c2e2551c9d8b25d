"""Tests for mtpspec.sampling: parameter validation, temperature/top-k/top-p on hand-made logits,
the greedy argmax path, and seeded reproducibility."""
from __future__ import annotations

import math

import pytest
import torch

from mtpspec.sampling import SamplingParams, logits_to_probs, make_generator, sample, select


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature=math.nan), "temperature"),
        (dict(temperature=math.inf), "temperature"),
        (dict(temperature="1.0"), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=2.0), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=-0.1), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=math.nan), "top_p"),
        (dict(seed=1.5), "seed"),
    ],
)
def test_params_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_params_defaults_and_greedy():
    assert SamplingParams().greedy
    assert not SamplingParams(temperature=0.7).greedy
    params = SamplingParams(temperature=1.0, top_k=5, top_p=0.9, seed=3)
    with pytest.raises(AttributeError):
        params.temperature = 2.0  # frozen


def test_greedy_is_one_hot_argmax():
    logits = torch.tensor([[0.1, 3.0, -1.0, 3.0], [5.0, 1.0, 2.0, 0.0]], dtype=torch.bfloat16)
    probs = logits_to_probs(logits, SamplingParams(temperature=0.0, top_k=1, top_p=0.5))
    assert probs.dtype == torch.float32
    expected = torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])  # ties: first index
    torch.testing.assert_close(probs, expected, rtol=0, atol=0)
    assert make_generator(SamplingParams()) is None
    assert select(logits.float(), SamplingParams(), None).tolist() == [1, 0]


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_temperature_matches_softmax(temperature):
    logits = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(0))  # [..., V]
    probs = logits_to_probs(logits, SamplingParams(temperature=temperature))
    torch.testing.assert_close(probs, torch.softmax(logits / temperature, dim=-1))


def test_top_k_keeps_exactly_k():
    logits = torch.tensor([[1.0, 4.0, 2.0, 3.0]])
    probs = logits_to_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    e3, e4 = math.exp(3.0), math.exp(4.0)
    expected = torch.tensor([[0.0, e4 / (e3 + e4), 0.0, e3 / (e3 + e4)]])
    torch.testing.assert_close(probs, expected)
    # top_k >= V is off
    full = logits_to_probs(logits, SamplingParams(temperature=1.0, top_k=4))
    torch.testing.assert_close(full, torch.softmax(logits, dim=-1))


@pytest.mark.parametrize(
    "top_p, kept",
    [
        (0.01, [0]), (0.39, [0]), (0.45, [0, 1]), (0.69, [0, 1]),
        (0.75, [0, 1, 2]), (0.95, [0, 1, 2, 3]),
    ],
)
def test_top_p_nucleus(top_p, kept):
    target = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = target.log()[[2, 0, 3, 1]]  # shuffled so the nucleus is not a prefix in vocab order
    probs = logits_to_probs(logits, SamplingParams(temperature=1.0, top_p=top_p))
    expected = torch.zeros(4)
    expected[kept] = target[kept] / target[kept].sum()
    torch.testing.assert_close(probs, expected[[2, 0, 3, 1]])


def test_top_k_then_top_p_order():
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    # top-k first renormalises to [4/7, 3/7]; then top_p=0.5 keeps only the first token
    probs = logits_to_probs(logits, SamplingParams(temperature=1.0, top_k=2, top_p=0.5))
    torch.testing.assert_close(probs, torch.tensor([1.0, 0.0, 0.0, 0.0]))
    # without top-k the same top_p keeps two tokens
    probs = logits_to_probs(logits, SamplingParams(temperature=1.0, top_p=0.5))
    torch.testing.assert_close(probs, torch.tensor([4 / 7, 3 / 7, 0.0, 0.0]))


def test_temperature_applies_before_top_p():
    logits = torch.tensor([2.0, 1.0, 0.0])
    # at T=0.25 the top token alone has mass > 0.9; at T=1 it has ~0.67
    cold = logits_to_probs(logits, SamplingParams(temperature=0.25, top_p=0.9))
    assert cold.tolist() == [1.0, 0.0, 0.0]
    warm = logits_to_probs(logits, SamplingParams(temperature=1.0, top_p=0.9))
    assert (warm > 0).tolist() == [True, True, False]


def test_masked_logits_and_normalisation():
    logits = torch.tensor([[-math.inf, 0.0, 1.0, -math.inf]])
    probs = logits_to_probs(logits, SamplingParams(temperature=0.7, top_k=3, top_p=0.99))
    assert probs[0, 0] == 0 and probs[0, 3] == 0
    torch.testing.assert_close(probs.sum(-1), torch.ones(1))


def test_seeded_reproducibility():
    params = SamplingParams(temperature=1.0, seed=1234)
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(1))  # [B, V]
    a = select(logits, params, make_generator(params))
    b = select(logits, params, make_generator(params))
    assert torch.equal(a, b)
    other = SamplingParams(temperature=1.0, seed=1235)
    assert not torch.equal(a, select(logits, other, make_generator(other)))
    # seed None draws a fresh seed each time
    unseeded = SamplingParams(temperature=1.0)
    s1, s2 = make_generator(unseeded).initial_seed(), make_generator(unseeded).initial_seed()
    assert s1 != s2


def test_sample_respects_support_and_shape():
    probs = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.0, 0.0, 0.0, 1.0]]).repeat(500, 1)  # [B, V]
    tokens = sample(probs, torch.Generator().manual_seed(0))
    assert tokens.shape == (1000,) and tokens.dtype == torch.int64
    assert set(tokens[0::2].tolist()) == {1, 2}
    assert set(tokens[1::2].tolist()) == {3}


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.999])
def test_top_p_from_a_partial_sort_equals_the_full_sort(top_p):
    """Peaked rows are decided from their 1,024 likeliest tokens, flat rows by a full sort: both
    keep exactly the tokens a full sort keeps."""
    from mtpspec.sampling import _top_p_mask
    gen = torch.Generator().manual_seed(0)
    peaked = torch.randn(3, 50_000, generator=gen) * 4.0
    flat = torch.randn(3, 50_000, generator=gen) * 0.1
    probs = torch.softmax(torch.cat([peaked, flat]), dim=-1)  # [6, V]
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    inside = (torch.cumsum(sorted_probs, -1) - sorted_probs) < top_p
    inside[:, 0] = True
    want = torch.zeros_like(inside).scatter_(-1, order, inside)
    assert torch.equal(_top_p_mask(probs, top_p), want)


def test_sample_frequencies_follow_the_distribution():
    probs = torch.tensor([0.5, 0.0, 0.3, 0.2, 0.0])
    gen = torch.Generator().manual_seed(1)
    draws = sample(probs.expand(40_000, -1), gen)
    counts = torch.bincount(draws, minlength=5).float() / draws.numel()
    assert counts[1] == 0 and counts[4] == 0  # never a token without mass
    assert torch.allclose(counts, probs, atol=0.01)


@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.95, 0.999])
def test_nucleus_from_screened_tokens_equals_the_full_sort(top_p):
    """``nucleus`` sorts only the likeliest tokens when they hold top_p, else the whole row: the
    same tokens as the full-sort rule either way (peaked rows, flat rows, a row of ties)."""
    from mtpspec.sampling import _top_p_mask, nucleus
    gen = torch.Generator().manual_seed(3)
    rows = torch.cat([torch.randn(3, 50_000, generator=gen) * 4.0,
                      torch.randn(3, 50_000, generator=gen) * 0.1, torch.zeros(1, 50_000)])
    probs = torch.softmax(rows, dim=-1)  # [7, V]
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    inside = (torch.cumsum(sorted_probs, -1) - sorted_probs) < top_p
    inside[:, 0] = True
    want = torch.zeros_like(inside).scatter_(-1, order, inside)
    for row in range(probs.shape[0]):
        if row == probs.shape[0] - 1:  # ties: which tied tokens make the cut is the sort's choice
            assert nucleus(probs[row], top_p).numel() == int(want[row].sum())
            continue
        assert torch.equal(nucleus(probs[row], top_p), torch.nonzero(want[row]).flatten())
        assert torch.equal(torch.nonzero(_top_p_mask(probs[row:row + 1], top_p)[0]).flatten(),
                           nucleus(probs[row], top_p))


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.7, top_p=0.95),
                                    SamplingParams(temperature=1.0),
                                    SamplingParams(temperature=0.8, top_k=50, top_p=0.9),
                                    SamplingParams()])
def test_sample_from_logits_is_the_inverse_cdf_of_logits_to_probs(params):
    """The nucleus-only draw picks the token that the full renormalised distribution picks at the
    same uniform (but within float rounding of a boundary between two tokens)."""
    from mtpspec.sampling import inverse_cdf, sample_from_logits
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(64, 20_000, generator=gen) * 3.0  # [B, V]
    u = torch.rand(64, generator=gen, dtype=torch.float64)  # [B]
    for trial in range(8):
        u = torch.rand(64, generator=gen, dtype=torch.float64)
        got = sample_from_logits(logits, params, u)
        want = inverse_cdf(logits_to_probs(logits, params), u)
        assert (got != want).sum() <= 1, trial
