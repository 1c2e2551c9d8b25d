"""The draft policy: it turns drafting off where acceptance is 0, keeps it on with an always-right
drafter, re-probes, and never changes what is emitted (greedy tokens, seeded sampled tokens,
the sampled distribution)."""
from __future__ import annotations

import pytest
import torch

from mtpspec.draft_policy import (PRIOR_WIDTH, DraftPolicy, PolicyConfig, RowAcceptance, StepCosts,
                                  prior_pass)
from mtpspec.engine import BatchSession, Engine, GenerateOptions
from mtpspec.proposers.draft_model import DraftModelProposer
from mtpspec.sampling import SamplingParams

from conftest import tiny_model
from test_engine import OracleProposer, _assert_sampled_rows_follow_the_target, prompts_for


def measured_costs(plain_ms=10.0, drafting_ms=14.0, sampled_drafting_ms=None) -> StepCosts:
    """Step costs as if measured, for one row."""
    costs = StepCosts()
    for sampled in (False, True):
        costs.observe(1, False, sampled, plain_ms)
        costs.observe(1, True, sampled, sampled_drafting_ms if sampled and sampled_drafting_ms
                      else drafting_ms)
    return costs


def simulate(policy: DraftPolicy, rate_of_truth: float, steps: int, cap: int = 6) -> list[int]:
    """Drive one row for ``steps`` steps; each draft is accepted iff its position's coin says so
    (a seeded stream with acceptance ``rate_of_truth``). Returns the lengths chosen."""
    gen = torch.Generator().manual_seed(0)
    row = policy.new_row(sampled=False)
    chosen = []
    for _ in range(steps):
        (k,) = policy.lengths([row], [cap], [False], sampled=False)
        accepted = 0
        while accepted < k and float(torch.rand(1, generator=gen)) < rate_of_truth:
            accepted += 1
        policy.update(row, False, k, accepted)
        chosen.append(k)
    return chosen


def test_acceptance_counts():
    row = RowAcceptance(0.0, 0.0)
    assert row.per_step == 1.0
    row.update(4, 2, decay=1.0)  # two accepted: three tokens
    row.update(3, 3, decay=1.0)  # all three accepted: four tokens
    assert (row.tokens, row.steps, row.per_step) == (7.0, 2.0, 3.5)
    row.update(0, 0, decay=1.0)
    assert row.idle == 1 and row.steps == 2.0


def test_policy_turns_drafting_off_at_zero_acceptance_and_probes():
    config = PolicyConfig(probe_every=8, probe_k=2, probe_most=32)
    chosen = simulate(DraftPolicy(measured_costs(), config), rate_of_truth=0.0, steps=200)
    assert chosen[0] > 0  # a new row starts optimistic
    late = chosen[20:]
    probes = [i for i, k in enumerate(late) if k > 0]
    assert probes and max(late) <= config.probe_k  # it probes, with short drafts
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert gaps == sorted(gaps) and max(gaps) <= config.probe_most + 1  # ever rarer, to a limit


def test_cost_cells_are_medians_of_recent_timings():
    costs = StepCosts(window=3)
    for ms in (10.0, 50.0, 11.0, 12.0):  # a slow outlier, then it leaves the window
        costs.observe(1, True, False, ms)
    assert costs.step_ms(1, True, False) == 12.0
    costs.observe(1, True, False, 90.0)
    assert costs.step_ms(1, True, False) == 12.0


def test_policy_keeps_full_drafts_with_an_always_right_drafter():
    chosen = simulate(DraftPolicy(measured_costs()), rate_of_truth=1.0, steps=30, cap=6)
    assert chosen == [6] * 30


def test_policy_follows_the_cost_of_a_step():
    """The same acceptance pays on a cheap drafting step and not on a dear one (a sampled pass
    here), and a row that opted out drafts its cap regardless."""
    policy = DraftPolicy(measured_costs(plain_ms=10.0, drafting_ms=13.0, sampled_drafting_ms=18.0))
    row = RowAcceptance(tokens=15.0, steps=10.0)  # 1.5 tokens per drafting step
    assert policy.lengths([row], [6], [False], sampled=False) == [6]
    assert policy.lengths([row], [6], [False], sampled=True) == [0]
    assert policy.lengths([row], [6], [True], sampled=True) == [6]


def test_batch_rows_draft_together_or_not_at_all():
    """In a batch, rows that gain draft when the batch's gain pays; a row that gains nothing
    does not draft beside them."""
    costs = StepCosts()
    costs.observe(3, False, False, 30.0)
    costs.observe(3, True, False, 40.0)
    policy = DraftPolicy(costs)
    good, useless = RowAcceptance(30.0, 10.0), RowAcceptance(10.0, 10.0)
    assert policy.lengths([good, useless, good], [4, 4, 2], [False] * 3, False) == [4, 0, 2]
    weak = RowAcceptance(11.0, 10.0)  # 0.1 tokens gained per step cannot pay for 33% more time
    assert policy.lengths([weak, useless, weak], [4, 4, 4], [False] * 3, False) == [0, 0, 0]


def test_unmeasured_cells_follow_the_prior_shape():
    costs = StepCosts()
    assert costs.step_ms(1, True, False) is None
    costs.observe(1, False, False, 10.0)
    ratio = prior_pass(1 + PRIOR_WIDTH) / prior_pass(1)
    assert costs.step_ms(1, True, False) == pytest.approx(10.0 * ratio)
    assert costs.step_ms(1, True, True) is None  # another kind of pass: not estimated from it


@pytest.mark.parametrize("wrong", [False, True])
def test_policy_keeps_greedy_output_and_drops_useless_drafts(tiny, wrong):
    prompts = prompts_for(tiny.config.vocab_size, count=2)
    options = GenerateOptions(max_new_tokens=40, ignore_eos=True, draft_k=4)
    expected = [r.token_ids for r in Engine(tiny).generate(prompts, options)]
    oracle = OracleProposer(prompts, expected, tiny.config.vocab_size, wrong=wrong)
    fixed = Engine(tiny, proposer=oracle, policy=False).generate(prompts, options)
    engine = Engine(tiny, proposer=oracle)
    engine.generate(prompts, options)  # the engine measures its costs
    adaptive = engine.generate(prompts, options)
    assert [r.token_ids for r in fixed] == expected
    assert [r.token_ids for r in adaptive] == expected
    proposed = sum(r.stats.draft_proposed for r in adaptive)
    if wrong:  # acceptance 0: drafting off but for the first steps and the probes
        assert proposed < sum(r.stats.draft_proposed for r in fixed) / 3
    else:  # always right: it drafts
        assert proposed >= sum(r.stats.draft_proposed for r in fixed) / 2
        assert all(r.stats.tau > 2 for r in adaptive)


def test_seeded_sampling_ignores_the_policy(tiny, tiny_drafter_model):
    """Sampled rows of Engine.generate draw per-position uniforms from their own seeds: the same
    tokens with the policy on or off, with drafting or without."""
    prompts = prompts_for(tiny.config.vocab_size, count=2)
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=11)
    options = GenerateOptions(max_new_tokens=20, sampling=params, ignore_eos=True, draft_k=3)
    runs = [[r.token_ids for r in Engine(tiny, proposer=proposer, policy=policy)
             .generate(prompts, options)]
            for proposer, policy in ((None, True), (DraftModelProposer(tiny_drafter_model), True),
                                     (DraftModelProposer(tiny_drafter_model), False))]
    assert runs[0] == runs[1] == runs[2]
    assert runs[0][0] != runs[0][1]  # the rows' seeds differ


def test_policy_keeps_the_sampled_distribution():
    """Rows drafting under the policy (cheap passes: it drafts) still sample the target exactly."""
    vocab, trials = 12, 4000
    target = tiny_model(seed=5, vocab_size=vocab)
    drafter = tiny_model(seed=6, vocab_size=vocab, num_layers=1)
    prompt = [2, 5, 7, 3]
    params = SamplingParams(temperature=0.8)
    costs = StepCosts()  # as if measured: drafting costs next to nothing
    costs.observe(trials + 1, False, True, 10.0)
    costs.observe(trials + 1, True, True, 10.0)
    session = BatchSession(target, None, DraftModelProposer(drafter, max_len=16),
                           max_batch_size=trials + 1, max_len=16, max_draft_k=2,
                           policy=DraftPolicy(costs))
    session.add(prompt, GenerateOptions(max_new_tokens=4, ignore_eos=True, draft_k=2))  # greedy
    for seed in range(trials):
        session.add(prompt, GenerateOptions(max_new_tokens=4, ignore_eos=True, draft_k=2,
                                            sampling=SamplingParams(temperature=0.8, seed=seed)))
    assert session.policy.costs is costs
    _assert_sampled_rows_follow_the_target(session, target, prompt, params, vocab, trials)
