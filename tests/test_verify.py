"""Tests for mtpspec.verify: greedy exactness on hand-made logits, rejection sampling that reduces
to greedy on one-hot p, and the statistical losslessness test.

The statistical test simulates a whole speculative decoder on a toy language: the target is a
first-order Markov chain (first token ~ p0, then x_t ~ P2[x_{t-1}]) and the proposer is another
Markov chain (q0, Q2). Each of N batch rows is an independent trial; rows that emit only one token
in the first block run a second block from that token, exactly as a decoder would. The first
emitted token must follow p0 and the first two tokens must follow p0[x1] * P2[x1, x2]. A
chi-square test and a total-variation bound check this, and two deliberately wrong verifiers must
fail the very same check, so the test is proven able to fail.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from mtpspec.sampling import SamplingParams, inverse_cdf, logits_to_probs, sample
from mtpspec.verify import (VerifyResult, coupled_verify, coupled_verify_lazy, greedy_verify,
                            rejection_verify)

V = 8  # toy vocabulary
N = 100_000  # independent trials per statistical check
MIN_PVALUE = 1e-4  # chi-square acceptance level for a correct verifier (fixed seeds: no flakes)
TV_DELTA = 1e-6  # failure probability allowed by the total-variation bound


def _logits_with_argmax(argmax: torch.Tensor, vocab: int = 6) -> torch.Tensor:
    """[B, k+1] target argmax ids -> [B, k+1, V] logits with a clear winner at each position."""
    noise = torch.randn(*argmax.shape, vocab, generator=torch.Generator().manual_seed(0))
    return noise.scatter(-1, argmax[..., None], 10.0)  # [B, k+1, V]


# ---------------------------------------------------------------- greedy on hand-made logits


def test_greedy_all_accepted_emits_bonus():
    logits = _logits_with_argmax(torch.tensor([[3, 1, 4, 5]]))
    result = greedy_verify(logits, torch.tensor([[3, 1, 4]]))
    assert isinstance(result, VerifyResult)
    assert result.num_accepted.tolist() == [3]
    assert result.tokens.tolist() == [[3, 1, 4, 5]]
    assert result.tokens.dtype == torch.int64 and result.num_accepted.dtype == torch.int64


def test_greedy_first_mismatch_and_mismatch_at_zero():
    logits = _logits_with_argmax(torch.tensor([[3, 1, 4, 5], [2, 2, 2, 2], [0, 1, 2, 3]]))
    drafts = torch.tensor([[3, 0, 4], [5, 2, 2], [0, 1, 5]])
    result = greedy_verify(logits, drafts)
    assert result.num_accepted.tolist() == [1, 0, 2]
    assert result.tokens.tolist() == [[3, 1, -1, -1], [2, -1, -1, -1], [0, 1, 2, -1]]


def test_greedy_ragged_num_drafts():
    logits = _logits_with_argmax(torch.tensor([[3, 1, 4, 5], [3, 1, 4, 5], [3, 1, 4, 5]]))
    drafts = torch.tensor([[3, 1, 4], [3, 1, -7], [0, -1, -1]])  # padding may be junk
    result = greedy_verify(logits, drafts, num_drafts=torch.tensor([3, 2, 0]))
    assert result.num_accepted.tolist() == [3, 2, 0]
    assert result.tokens.tolist() == [[3, 1, 4, 5], [3, 1, 4, -1], [3, -1, -1, -1]]


def test_greedy_zero_drafts():
    logits = _logits_with_argmax(torch.tensor([[4], [1]]))
    result = greedy_verify(logits, torch.empty(2, 0, dtype=torch.long))
    assert result.num_accepted.tolist() == [0, 0] and result.tokens.tolist() == [[4], [1]]


def test_shape_and_num_drafts_validation():
    logits = torch.zeros(2, 3, V)
    with pytest.raises(ValueError, match="does not match"):
        greedy_verify(logits, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="num_drafts"):
        greedy_verify(logits, torch.zeros(2, 2, dtype=torch.long), torch.tensor([3, 0]))
    drafts = torch.zeros(2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="q must be"):
        rejection_verify(logits.softmax(-1), drafts, torch.zeros(2, 3, V), None)


# ---------------------------------------------------------------- rejection sampling, exact cases


@pytest.mark.parametrize("q_kind", ["random", "point", "zero_at_draft"])
def test_one_hot_p_reproduces_greedy(q_kind):
    g = torch.Generator().manual_seed(7)
    batch, k = 4096, 3
    logits = torch.randn(batch, k + 1, V, generator=g)  # [B, k+1, V]
    argmax = logits.argmax(-1)  # [B, k+1]
    guess = torch.randint(0, V, (batch, k), generator=g)
    drafts = torch.where(torch.rand(batch, k, generator=g) < 0.7, argmax[:, :k], guess)  # [B, k]
    num_drafts = torch.randint(0, k + 1, (batch,), generator=g)
    q = torch.softmax(torch.randn(batch, k, V, generator=g), -1)  # [B, k, V]
    if q_kind == "point":
        q = None
    elif q_kind == "zero_at_draft":  # the proposer claims it could not produce its own draft
        q = q.scatter(-1, drafts[..., None], 0.0)
        q = q / q.sum(-1, keepdim=True)
    p = logits_to_probs(logits, SamplingParams(temperature=0.0))  # one-hot
    expected = greedy_verify(logits, drafts, num_drafts)
    got = rejection_verify(p, drafts, q, torch.Generator().manual_seed(1), num_drafts)
    assert torch.equal(got.num_accepted, expected.num_accepted)
    assert torch.equal(got.tokens, expected.tokens)


def test_zero_target_prob_never_accepted_nor_emitted():
    g = torch.Generator().manual_seed(3)
    batch, k = 2000, 2
    p = logits_to_probs(torch.randn(batch, k + 1, V, generator=g), SamplingParams(1.0, top_k=3))
    outside = torch.multinomial((p[:, :k] == 0).float().reshape(-1, V), 1, generator=g)
    drafts = outside.reshape(batch, k)  # [B, k] every draft has p(x) = 0
    q = torch.full((batch, k, V), 1.0 / V)
    result = rejection_verify(p, drafts, q, g)
    assert (result.num_accepted == 0).all()
    assert (p[:, 0].gather(-1, result.tokens[:, :1]) > 0).all()


def test_target_equal_to_draft_accepts_everything():
    g = torch.Generator().manual_seed(4)
    batch, k = 1000, 3
    q = logits_to_probs(torch.randn(batch, k, V, generator=g), SamplingParams(1.0, top_k=5))
    p = torch.cat([q, torch.softmax(torch.randn(batch, 1, V, generator=g), -1)], 1)  # [B, k+1, V]
    drafts = sample(q.reshape(-1, V), g).reshape(batch, k)
    result = rejection_verify(p, drafts, q, g)
    assert (result.num_accepted == k).all()
    assert torch.equal(result.tokens[:, :k], drafts)


def test_zero_residual_falls_back_to_p():
    # p == q and the draft is outside both supports: rejected, and max(0, p - q) sums to 0
    p = torch.tensor([[[0.0, 0.25, 0.75, 0.0], [0.25, 0.25, 0.25, 0.25]]]).repeat(4000, 1, 1)
    q = p[:, :1].clone()  # [B, 1, V]
    drafts = torch.full((4000, 1), 3)
    result = rejection_verify(p, drafts, q, torch.Generator().manual_seed(0))
    assert (result.num_accepted == 0).all()
    first = result.tokens[:, 0]
    assert set(first.tolist()) == {1, 2}
    assert abs((first == 2).float().mean().item() - 0.75) < 0.03  # 4000 draws: sd ~ 0.007


def test_rejection_zero_drafts_is_plain_sampling():
    p = torch.tensor([[[0.0, 1.0, 0.0]], [[0.0, 0.0, 1.0]]])  # [B, 1, V]
    result = rejection_verify(p, torch.empty(2, 0, dtype=torch.long), None, torch.Generator())
    assert result.num_accepted.tolist() == [0, 0] and result.tokens.tolist() == [[1], [2]]


def test_rejection_verify_seeded_and_ragged_layout():
    g = torch.Generator().manual_seed(5)
    batch, k = 512, 4
    p = torch.softmax(torch.randn(batch, k + 1, V, generator=g), -1)
    q = torch.softmax(torch.randn(batch, k, V, generator=g), -1)
    drafts = sample(q.reshape(-1, V), g).reshape(batch, k)
    num_drafts = torch.randint(0, k + 1, (batch,), generator=g)
    drafts = torch.where(torch.arange(k) < num_drafts[:, None], drafts, -1)  # junk padding
    a = rejection_verify(p, drafts, q, torch.Generator().manual_seed(9), num_drafts)
    b = rejection_verify(p, drafts, q, torch.Generator().manual_seed(9), num_drafts)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.num_accepted, b.num_accepted)
    assert (a.num_accepted <= num_drafts).all()
    pos = torch.arange(k + 1)
    n = a.num_accepted[:, None]
    assert torch.equal(a.tokens[:, :k][pos[:k] < n], drafts[pos[:k] < n])
    assert ((a.tokens >= 0) == (pos <= n)).all()


# ---------------------------------------------------------------- the statistical test


def _wrong_resample_from_p(p, draft_tokens, q, generator, num_drafts=None):
    """WRONG: correct acceptance rule, but on rejection it samples from p, not the residual."""
    batch, k = draft_tokens.shape
    p_x = p[:, :k].gather(-1, draft_tokens[..., None]).squeeze(-1)  # [B, k]
    q_x = torch.ones_like(p_x) if q is None else q.gather(-1, draft_tokens[..., None]).squeeze(-1)
    accepted = torch.rand(batch, k, generator=generator) * q_x < p_x  # [B, k]
    n = accepted.long().cumprod(-1).sum(-1)  # [B]
    return _emit(p, draft_tokens, n, generator)


def _wrong_accept_if_possible(p, draft_tokens, q, generator, num_drafts=None):
    """WRONG: accepts every draft the target could have produced (p(x) > 0)."""
    p_x = p[:, :-1].gather(-1, draft_tokens[..., None]).squeeze(-1)  # [B, k]
    n = (p_x > 0).long().cumprod(-1).sum(-1)  # [B]
    return _emit(p, draft_tokens, n, generator)


def _emit(p, draft_tokens, n, generator) -> VerifyResult:
    """Accepted drafts, then a token sampled from p[n] (the part the wrong verifiers share)."""
    batch, k = draft_tokens.shape
    last = sample(p[torch.arange(batch), n], generator)  # [B]
    padded = torch.cat([draft_tokens, torch.full((batch, 1), -1)], 1)  # [B, k+1]
    pos = torch.arange(k + 1)
    tokens = torch.where(pos < n[:, None], padded, -1).scatter(1, n[:, None], last[:, None])
    return VerifyResult(num_accepted=n, tokens=tokens)


@dataclass(frozen=True)
class Case:
    """One toy target/proposer pair for the statistical test."""

    target: SamplingParams
    draft: SamplingParams
    k: int = 2
    drafts: str = "q"  # "q": pass q; "point": sample from q, pass None; "argmax": argmax q, None
    ragged: bool = False  # random num_drafts in [0, k] per row
    seed: int = 0


CASES = {
    "t1": Case(SamplingParams(1.0), SamplingParams(1.0)),
    "t0.5": Case(SamplingParams(0.5), SamplingParams(1.0), seed=1),
    "t2_k3": Case(SamplingParams(2.0), SamplingParams(0.7), k=3, seed=2),
    "target_top_p": Case(SamplingParams(1.0, top_p=0.7), SamplingParams(1.0), seed=3),
    "draft_top_k": Case(SamplingParams(0.8), SamplingParams(1.0, top_k=3), seed=4),
    "point_mass": Case(SamplingParams(1.0), SamplingParams(1.0), drafts="point", seed=5),
    "point_argmax": Case(
        SamplingParams(0.7, top_p=0.9), SamplingParams(0.0), drafts="argmax", seed=10
    ),
    "ragged": Case(SamplingParams(1.0), SamplingParams(1.0), k=3, ragged=True, seed=7),
}


@dataclass(frozen=True)
class Chains:
    """Target (p0, P2) and proposer (q0, Q2) Markov chains over V tokens."""

    p0: torch.Tensor  # [V]
    P2: torch.Tensor  # [V, V] P2[a, b] = p(next = b | prev = a)
    q0: torch.Tensor  # [V]
    Q2: torch.Tensor  # [V, V]


def _chains(case: Case) -> Chains:
    g = torch.Generator().manual_seed(100 + case.seed)
    target_logits = 1.5 * torch.randn(V + 1, V, generator=g)  # row 0: first token, rows 1..V: P2
    draft_logits = target_logits + torch.randn(V + 1, V, generator=g)  # a correlated proposer
    p = logits_to_probs(target_logits, case.target)  # [V+1, V]
    q = logits_to_probs(draft_logits, case.draft)  # [V+1, V]
    return Chains(p0=p[0], P2=p[1:], q0=q[0], Q2=q[1:])


def _inverse_cdf(probs: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Sample ids [N] from probs [N, V] by inverting the CDF (the proposer's own sampler; much
    faster than multinomial for N = 100k rows and a tiny V)."""
    cdf = probs.double().cumsum(-1)  # [N, V]
    u = torch.rand(probs.shape[0], 1, generator=g, dtype=torch.float64) * cdf[:, -1:]  # [N, 1]
    return (cdf <= u).sum(-1).clamp(max=probs.shape[-1] - 1)  # first index with cdf > u


def _block(verifier, case: Case, chains: Chains, p_first, q_first, g) -> VerifyResult:
    """One speculative block per row, from first-position distributions p_first, q_first [N, V]."""
    draft_dist, q_rows, drafts = q_first, [], []
    for _ in range(case.k):  # the proposer runs its own chain on its own drafts
        q_rows.append(draft_dist)
        x = draft_dist.argmax(-1) if case.drafts == "argmax" else _inverse_cdf(draft_dist, g)  # [N]
        drafts.append(x)
        draft_dist = chains.Q2[x]  # [N, V]
    draft_tokens = torch.stack(drafts, 1)  # [N, k]
    p = torch.stack([p_first] + [chains.P2[x] for x in drafts], 1)  # [N, k+1, V] target on drafts
    q = torch.stack(q_rows, 1) if case.drafts == "q" else None  # [N, k, V]
    num_drafts = torch.randint(0, case.k + 1, (N,), generator=g) if case.ragged else None
    return verifier(p, draft_tokens, q, g, num_drafts)


def _first_two_tokens(verifier, case: Case, chains: Chains) -> torch.Tensor:
    """[N, 2]: the first two tokens a speculative decoder emits, one independent row per trial."""
    g = torch.Generator().manual_seed(case.seed)
    first = _block(verifier, case, chains, chains.p0.expand(N, V), chains.q0.expand(N, V), g)
    x1 = first.tokens[:, 0]  # [N]
    second = _block(verifier, case, chains, chains.P2[x1], chains.Q2[x1], g)  # next block from x1
    x2 = torch.where(first.num_accepted >= 1, first.tokens[:, 1], second.tokens[:, 0])  # [N]
    return torch.stack([x1, x2], 1)


def _distribution_check(samples: torch.Tensor, target: torch.Tensor) -> tuple[float, float, float]:
    """Chi-square p-value, total variation and its tolerance for flat cell ids vs target [m].

    Cells with target 0 must be empty (else p-value 0). The TV tolerance: for the empirical
    distribution of N draws, E[TV] <= 1/2 sum_i sqrt(t_i / N) <= 1/2 sqrt(m / N) (Cauchy-Schwarz
    over the m support cells), and one draw moves TV by at most 1/N, so by McDiarmid
    P(TV > E[TV] + s) <= exp(-2 N s^2); s = sqrt(ln(1/delta) / (2N)) with delta = TV_DELTA.
    """
    target = target.double()
    counts = torch.bincount(samples, minlength=target.numel()).double()  # [m]
    n = counts.sum()
    support = target > 0
    if (counts[~support] > 0).any():
        return 0.0, 1.0, 0.0
    expected = n * target[support]
    chi2 = ((counts[support] - expected) ** 2 / expected).sum()
    dof = int(support.sum()) - 1
    pvalue = float(torch.special.gammaincc(torch.tensor(dof / 2.0), chi2 / 2.0))
    tv = 0.5 * float((counts / n - target).abs().sum())
    m = int(support.sum())
    tol = 0.5 * math.sqrt(m / n) + math.sqrt(math.log(1 / TV_DELTA) / (2 * n))
    return pvalue, tv, tol


def _assert_lossless(verifier, case: Case) -> None:
    chains = _chains(case)
    tokens = _first_two_tokens(verifier, case, chains)  # [N, 2]
    pair_target = (chains.p0[:, None] * chains.P2).flatten()  # [V*V] p(x1) p(x2 | x1)
    checks = {
        "first token": (tokens[:, 0], chains.p0),
        "first two tokens": (tokens[:, 0] * V + tokens[:, 1], pair_target),
    }
    for name, (samples, target) in checks.items():
        pvalue, tv, tol = _distribution_check(samples, target)
        verdict = f"{name}: p-value {pvalue:.3g} (> {MIN_PVALUE}?), TV {tv:.4f} (< {tol:.4f}?)"
        assert pvalue > MIN_PVALUE and tv < tol, verdict


@pytest.mark.parametrize("name", list(CASES))
def test_rejection_verify_is_lossless(name):
    _assert_lossless(rejection_verify, CASES[name])


@pytest.mark.parametrize(
    "wrong, name",
    [
        (_wrong_resample_from_p, "draft_top_k"),
        (_wrong_resample_from_p, "point_mass"),
        (_wrong_accept_if_possible, "target_top_p"),
    ],
)
def test_wrong_verifier_fails_the_same_check(wrong, name):
    with pytest.raises(AssertionError, match="first token: p-value 0 "):
        _assert_lossless(wrong, CASES[name])


def test_coupled_verify_lazy_asks_only_for_positions_that_can_be_emitted():
    """The lazy form emits what the eager one does, and asks for position t of a row only while
    every draft before t matched."""
    gen = torch.Generator().manual_seed(4)
    p = torch.softmax(torch.randn(64, 4, V, generator=gen) * 3, dim=-1)  # [B, k+1, V]
    u = torch.rand(64, 4, generator=gen, dtype=torch.float64)  # [B, k+1]
    other = torch.randint(0, V, (64, 3), generator=gen)  # [B, k] drafts that may be wrong
    exact = inverse_cdf(p, u)  # [B, k+1] the sample at every position
    drafts = torch.where(torch.rand(64, 3, generator=gen) < 0.6, exact[:, :3], other)
    counts = torch.randint(0, 4, (64,), generator=gen)
    asked = []

    def token_at(t, rows):
        asked.append((t, rows.tolist()))
        return inverse_cdf(p[rows, t], u[rows, t])
    lazy = coupled_verify_lazy(token_at, drafts, counts)
    eager = coupled_verify(p, drafts, u, counts)
    assert torch.equal(lazy.tokens, eager.tokens) and torch.equal(lazy.num_accepted, eager.num_accepted)
    for t, rows in asked:
        for row in rows:  # every earlier draft of that row was real and matched
            assert all(int(drafts[row, s]) == int(exact[row, s]) and s < int(counts[row])
                       for s in range(t))
    assert sum(len(rows) for _, rows in asked) < 64 * 4  # it spared some positions
