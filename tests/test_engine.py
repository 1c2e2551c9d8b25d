"""Losslessness of the engine: greedy equality with many proposers, stops inside accepted blocks,
seeded reproducibility, and a distribution test of speculative sampling against plain sampling;
and of continuous batching: sequences that join, wait, leave and are cancelled at different steps
decode exactly as they do alone, beside sampled rows too."""
from __future__ import annotations

import pytest
import torch

from mtpspec.engine import BatchSession, Engine, FinishEvent, GenerateOptions
from mtpspec.kv_cache import CacheFullError
from mtpspec.proposers.base import Draft
from mtpspec.proposers.draft_model import DraftModelProposer
from mtpspec.proposers.ngram import NgramProposer
from mtpspec.sampling import SamplingParams, logits_to_probs, make_generator

from conftest import tiny_model


class OracleProposer:
    """Proposes the known greedy continuation (always right), or a corrupted one (always wrong)."""

    def __init__(self, prompts, continuations, vocab, wrong=False):
        self.name = "oracle"
        self.full = [list(p) + list(c) for p, c in zip(prompts, continuations)]
        self.vocab, self.wrong = vocab, wrong

    def reset(self):
        pass

    def propose(self, state, k):
        rows = []
        for tokens in state.tokens:
            full = next(f for f in self.full if f[:len(tokens)] == tokens)
            future = full[len(tokens):len(tokens) + k]
            future += [0] * (k - len(future))
            rows.append([(t + 1) % self.vocab if self.wrong else t for t in future])
        return Draft(tokens=torch.tensor(rows, dtype=torch.long))


class RandomProposer:
    name = "random"

    def __init__(self, vocab, seed=0):
        self.vocab, self.gen = vocab, torch.Generator().manual_seed(seed)

    def reset(self):
        pass

    def propose(self, state, k):
        tokens = torch.randint(0, self.vocab, (len(state.tokens), k), generator=self.gen)
        counts = torch.randint(0, k + 1, (len(state.tokens),), generator=self.gen)
        return Draft(tokens=tokens, num_drafts=counts)  # ragged on purpose


def prompts_for(vocab, count=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # repetitive prompts give the n-gram proposer something to find
    out = []
    for i in range(count):
        base = torch.randint(3, vocab, (3 + i,), generator=gen).tolist()
        out.append([2] + base * 3 + base[:2])
    return out


@pytest.fixture(scope="module")
def plain_outputs(tiny):
    prompts = prompts_for(tiny.config.vocab_size)
    options = GenerateOptions(max_new_tokens=24, ignore_eos=True)
    results = Engine(tiny).generate(prompts, options)
    singles = [Engine(tiny).generate([p], options)[0].token_ids for p in prompts]
    assert [r.token_ids for r in results] == singles  # batching does not change greedy output
    return prompts, singles, options


@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("kind", ["oracle", "wrong", "random", "ngram", "draft-model"])
def test_greedy_speculative_equals_plain(tiny, tiny_drafter_model, plain_outputs, kind, k):
    prompts, expected, options = plain_outputs
    vocab = tiny.config.vocab_size
    proposer = {
        "oracle": lambda: OracleProposer(prompts, expected, vocab),
        "wrong": lambda: OracleProposer(prompts, expected, vocab, wrong=True),
        "random": lambda: RandomProposer(vocab, seed=k),
        "ngram": lambda: NgramProposer(),
        "draft-model": lambda: DraftModelProposer(tiny_drafter_model),
    }[kind]()
    spec = GenerateOptions(max_new_tokens=options.max_new_tokens, ignore_eos=True, draft_k=k)
    engine = Engine(tiny, proposer=proposer, policy=False)
    batched = engine.generate(prompts, spec)
    assert [r.token_ids for r in batched] == expected
    for prompt, want in zip(prompts[:2], expected):
        single = engine.generate([prompt], spec)[0]
        assert single.token_ids == want
        if kind == "oracle":
            assert single.stats.tau > min(k, 4) * 0.5 + 1 - 1e-9
            assert sum(single.from_draft) > 0
        if kind == "wrong":
            assert single.stats.draft_accepted == 0 and not any(single.from_draft)
            assert single.stats.tau == 1.0


def test_stops_inside_an_accepted_block(tiny, plain_outputs):
    prompts, expected, _ = plain_outputs
    prompt, full = prompts[0], expected[0]
    eos = full[9]
    cut = full.index(eos)
    for k in (4, 8):
        oracle = OracleProposer([prompt], [full], tiny.config.vocab_size)
        engine = Engine(tiny, proposer=oracle, policy=False)
        # max_new_tokens in the middle of a block
        out = engine.generate([prompt], GenerateOptions(max_new_tokens=7, ignore_eos=True,
                                                        draft_k=k))[0]
        assert out.token_ids == full[:7] and out.finish_reason == "length"
        # EOS in the middle of a block: nothing after it, EOS itself not emitted
        out = engine.generate([prompt], GenerateOptions(max_new_tokens=20, draft_k=k,
                                                        stop_token_ids=(eos,)))[0]
        assert out.token_ids == full[:cut] and out.finish_reason == "stop"


def test_seeded_sampling_is_reproducible(tiny, tiny_drafter_model):
    prompts = prompts_for(tiny.config.vocab_size, count=2)
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=123)
    options = GenerateOptions(max_new_tokens=16, sampling=params, ignore_eos=True, draft_k=3)
    for proposer in (None, DraftModelProposer(tiny_drafter_model)):
        first = Engine(tiny, proposer=proposer).generate(prompts, options)
        second = Engine(tiny, proposer=proposer).generate(prompts, options)
        assert [r.token_ids for r in first] == [r.token_ids for r in second]


def _joint_counts(engine, prompt, params, trials, vocab):
    # 4 tokens: the first comes from prefill, then a step drafts k=2 for tokens 2 and 3
    options = GenerateOptions(max_new_tokens=4, sampling=params, ignore_eos=True, draft_k=2)
    results = engine.generate([prompt] * trials, options)
    assert sum(r.stats.draft_proposed for r in results) >= trials  # speculation really ran
    counts = torch.zeros(vocab * vocab)
    for r in results:
        counts[r.token_ids[0] * vocab + r.token_ids[1]] += 1
    return counts


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.6, 1.0), (1.0, 0.8)])
def test_speculative_sampling_keeps_the_target_distribution(temperature, top_p):
    vocab = 12
    target = tiny_model(seed=5, vocab_size=vocab)
    drafter = tiny_model(seed=6, vocab_size=vocab, num_layers=1)
    prompt = [2, 5, 7, 3]
    params = SamplingParams(temperature=temperature, top_p=top_p, seed=7)
    expected = _expected_joint(target, prompt, params, vocab)
    trials = 6000
    engine = Engine(target, proposer=DraftModelProposer(drafter), policy=False)  # drafts always
    spec = _joint_counts(engine, prompt, params, trials, vocab)
    keep = expected * trials >= 5
    chi2 = (((spec - expected * trials) ** 2) / (expected * trials).clamp(min=1e-9))[keep].sum()
    dof = int(keep.sum()) - 1
    # mean dof, sd sqrt(2 dof): 5 sd above the mean fails only with negligible probability
    assert chi2 < dof + 5 * (2 * dof) ** 0.5, (float(chi2), dof)
    assert float(spec[~keep].sum()) <= max(10.0, 3 * float(expected[~keep].sum() * trials))


@pytest.mark.parametrize("kind", ["oracle", "wrong", "ngram"])
def test_adaptive_draft_length_stays_lossless_and_adapts(tiny, plain_outputs, kind):
    prompts, expected, options = plain_outputs
    vocab = tiny.config.vocab_size
    proposer = {"oracle": OracleProposer(prompts, expected, vocab),
                "wrong": OracleProposer(prompts, expected, vocab, wrong=True),
                "ngram": NgramProposer()}[kind]
    spec = GenerateOptions(max_new_tokens=options.max_new_tokens, ignore_eos=True, draft_k=8,
                           adaptive_k=True)
    results = Engine(tiny, proposer=proposer, policy=False).generate(prompts, spec)
    assert [r.token_ids for r in results] == expected
    single = Engine(tiny, proposer=proposer, policy=False).generate(prompts[:1], spec)[0]
    if kind == "oracle":  # grows towards the cap: far fewer steps than fixed k=3
        assert single.stats.steps <= 1 + options.max_new_tokens // 4
    if kind == "wrong":  # shrinks to one draft per step
        assert single.stats.draft_proposed <= single.stats.steps + 2


def test_adaptive_draft_length_rule():
    from mtpspec.engine import AdaptiveDraftLength

    schedule = AdaptiveDraftLength(6)
    assert schedule.k == 3
    schedule.update(3, 3)
    assert schedule.k == 5
    schedule.update(5, 5)
    assert schedule.k == 6
    schedule.update(6, 1)
    assert schedule.k == 2
    schedule.update(2, 0)
    assert schedule.k == 1
    schedule.update(0, 0)
    assert schedule.k == 1


# --- continuous batching (BatchSession) --------------------------------------------------------

def _run_session(session, plan, cancel_at=None):
    """Add plan[j] = (join_step, prompt, options) at its step; optionally cancel one sequence at a
    step: cancel_at = (step, j). Returns (results by j, most rows live at once)."""
    ids, results, busiest, step = {}, {}, 0, 0
    while step == 0 or not session.idle or len(ids) < len(plan):
        for j, (join, prompt, options) in enumerate(plan):
            if join == step:
                ids[session.add(prompt, options)] = j
        if cancel_at is not None and cancel_at[0] == step:
            seq = next(s for s, j in ids.items() if j == cancel_at[1])
            assert session.cancel(seq)
        for event in session.step():
            if isinstance(event, FinishEvent):
                results[ids[event.row]] = event.result
        busiest = max(busiest, len(session.live))
        step += 1
    return results, busiest


@pytest.mark.parametrize("kind", ["plain", "ngram", "oracle", "random", "oracle-capped"])
def test_continuous_batching_equals_solo_greedy(tiny, plain_outputs, kind, monkeypatch):
    """Sequences join at different steps, wait for a free row, leave early (length, cancel):
    every greedy output equals the prompt's solo greedy output."""
    prompts, expected, _ = plain_outputs
    vocab = tiny.config.vocab_size
    proposer = {"plain": None, "ngram": NgramProposer(),
                "oracle": OracleProposer(prompts, expected, vocab),
                "random": RandomProposer(vocab, seed=3),
                "oracle-capped": OracleProposer(prompts, expected, vocab)}[kind]
    budgets = [24, 24, 17, 5, 24, 13, 8]
    joins = [0, 0, 2, 3, 3, 9, 12]
    plan = [(join, prompts[j % len(prompts)],
             GenerateOptions(max_new_tokens=budget, ignore_eos=True, draft_k=3 + j % 3,
                             adaptive_k=j == 4))
            for j, (join, budget) in enumerate(zip(joins, budgets))]
    rows = 6 if kind == "oracle-capped" else None  # 3 live rows: 1 draft each; 2 rows: 2
    shapes = []  # [rows, drafts + 1] of every verification pass
    session = BatchSession(tiny, None, proposer, max_batch_size=3, max_len=64, max_draft_k=5,
                           max_verify_rows=rows, policy=False)
    verify = session._verify

    def spy(logits, target, tokens, probs, counts):
        shapes.append(tuple(target.shape))
        return verify(logits, target, tokens, probs, counts)
    monkeypatch.setattr(session, "_verify", spy)
    results, busiest = _run_session(session, plan, cancel_at=(2, 1))
    assert busiest == (2 if kind == "oracle" else 3)  # the oracle finishes sequences fast
    assert set(results) == set(range(len(plan))) - {1}
    for j, result in results.items():
        assert result.token_ids == expected[j % len(prompts)][:budgets[j]], j
        assert result.finish_reason == "length"
    if kind.startswith("oracle"):
        assert sum(r.stats.draft_accepted for r in results.values()) > 0
    assert len(shapes) == session.steps
    if kind == "oracle-capped":
        assert all(n * width <= rows for n, width in shapes)
        assert any(width > 2 for _, width in shapes)  # fewer rows, longer drafts


def test_mixed_sampling_rows_keep_greedy_rows_exact(tiny, plain_outputs):
    """Greedy rows beside sampled rows (each with its own generator) stay exact, and a seeded
    sampled sequence run alone twice gives the same tokens."""
    prompts, expected, _ = plain_outputs
    greedy = GenerateOptions(max_new_tokens=24, ignore_eos=True, draft_k=3)
    sampled = [GenerateOptions(max_new_tokens=20, ignore_eos=True, draft_k=3,
                               sampling=SamplingParams(temperature=t, top_p=0.9, seed=s))
               for t, s in ((0.7, 1), (1.0, 2))]
    plan = [(0, prompts[0], greedy), (0, prompts[1], sampled[0]), (1, prompts[2], greedy),
            (2, prompts[3], sampled[1])]
    session = BatchSession(tiny, None, NgramProposer(), max_batch_size=4, max_len=64,
                           max_draft_k=3)
    results, _ = _run_session(session, plan)
    assert results[0].token_ids == expected[0] and results[2].token_ids == expected[2]
    assert len(results[1].token_ids) == 20 and len(results[3].token_ids) == 20

    def alone():
        return Engine(tiny, proposer=NgramProposer()).generate([prompts[1]], sampled[0])[0]
    assert alone().token_ids == alone().token_ids


def _expected_joint(target, prompt, params, vocab):
    """Exact joint distribution of the first two tokens under the target: [V * V]."""
    cache = target.new_cache(1, 16)
    logits, _ = target(torch.tensor([prompt]), torch.arange(len(prompt))[None], cache)
    p1 = logits_to_probs(logits[0, -1], params)
    expected = torch.zeros(vocab * vocab)
    for x in range(vocab):
        if p1[x] == 0:
            continue
        c = target.new_cache(1, 16)
        l2, _ = target(torch.tensor([prompt + [x]]), torch.arange(len(prompt) + 1)[None], c)
        expected[x * vocab:(x + 1) * vocab] = p1[x] * logits_to_probs(l2[0, -1], params)
    return expected


def _assert_sampled_rows_follow_the_target(session, target, prompt, params, vocab, trials):
    """Run ``session`` (a greedy row 0, then ``trials`` sampled rows of ``prompt``) to the end;
    the sampled rows' first two tokens pass a chi-square test against the target's joint."""
    results = {}
    while not session.idle:
        results.update((e.row, e.result) for e in session.step() if isinstance(e, FinishEvent))
    sampled = [results[seq] for seq in range(1, trials + 1)]
    assert sum(r.stats.draft_proposed for r in sampled) >= trials  # speculation really ran
    counts = torch.zeros(vocab * vocab)
    for r in sampled:
        counts[r.token_ids[0] * vocab + r.token_ids[1]] += 1
    expected = _expected_joint(target, prompt, params, vocab)
    keep = expected * trials >= 5
    chi2 = (((counts - expected * trials) ** 2) / (expected * trials).clamp(min=1e-9))[keep].sum()
    dof = int(keep.sum()) - 1
    assert chi2 < dof + 5 * (2 * dof) ** 0.5, (float(chi2), dof)
    return results


def test_point_mass_drafts_beside_greedy_rows_keep_the_distribution():
    """With a greedy row in the batch the proposer drafts greedily for everyone and sampled rows
    verify those drafts as point masses: still exactly the target's distribution."""
    vocab, trials = 12, 6000
    target = tiny_model(seed=5, vocab_size=vocab)
    drafter = tiny_model(seed=6, vocab_size=vocab, num_layers=1)
    prompt = [2, 5, 7, 3]
    params = SamplingParams(temperature=0.8, seed=11)
    session = BatchSession(target, None, DraftModelProposer(drafter, max_len=16),
                           max_batch_size=trials + 1, max_len=16, max_draft_k=2,
                           policy=False)
    session.add(prompt, GenerateOptions(max_new_tokens=4, ignore_eos=True, draft_k=2))
    shared = make_generator(params)  # one group (verified in one call), beside the greedy row
    options = GenerateOptions(max_new_tokens=4, ignore_eos=True, draft_k=2, sampling=params)
    for _ in range(trials):
        session.add(prompt, options, shared)
    _assert_sampled_rows_follow_the_target(session, target, prompt, params, vocab, trials)


def test_session_refuses_what_does_not_fit(tiny):
    session = BatchSession(tiny, None, NgramProposer(), max_batch_size=2, max_len=32,
                           max_draft_k=4)
    assert session.max_new_tokens_for(10) == 32 - 10 - 4 - 1
    with pytest.raises(CacheFullError, match="the context holds 32"):
        session.add([2] * 10, GenerateOptions(max_new_tokens=18))
    with pytest.raises(ValueError):
        session.add([], GenerateOptions())
    with pytest.raises(ValueError, match="draft_k"):
        session.add([2, 3], GenerateOptions(max_new_tokens=4, draft_k=8))
    assert session.idle and not session.cancel(12345)


@pytest.mark.slow
@pytest.mark.real
def test_continuous_batching_real_model_mtp(real_target):
    """The default model with its MTP drafter: joining and leaving does not change greedy output."""
    from mtpspec.proposers.factory import ProposerRequest, make_proposer

    tokenizer = real_target.tokenizer
    proposer = make_proposer("mtp", real_target, ProposerRequest()).proposer
    texts = ["Question: What is the capital of France?\nAnswer:",
             "def fibonacci(n):\n", "The three primary colors are",
             "Question: Why do cats purr?\nAnswer:"]
    prompts = [tokenizer.encode(t) for t in texts]
    budgets = [40, 24, 32, 16]
    engine = Engine(real_target.model, tokenizer, proposer, max_len=256)
    solo = [engine.generate([p], GenerateOptions(max_new_tokens=b, draft_k=4))[0].token_ids
            for p, b in zip(prompts, budgets)]
    plan = [(join, p, GenerateOptions(max_new_tokens=b, draft_k=4))
            for join, p, b in zip([0, 1, 1, 4], prompts, budgets)]
    results, busiest = _run_session(engine.session(3, 4), plan)
    assert busiest == 3
    assert [results[j].token_ids for j in range(len(plan))] == solo


def test_per_request_seeds_keep_the_distribution_and_ignore_the_batch():
    """Sequences added without a shared generator sample by per-position uniforms from their own
    seed (``coupled_verify``): each is exactly the target's distribution, and a seed gives the
    same tokens alone, beside other sequences, and with any draft length."""
    vocab, trials = 12, 6000
    target = tiny_model(seed=5, vocab_size=vocab)
    drafter = tiny_model(seed=6, vocab_size=vocab, num_layers=1)
    prompt = [2, 5, 7, 3]
    params = SamplingParams(temperature=0.8)
    session = BatchSession(target, None, DraftModelProposer(drafter, max_len=16),
                           max_batch_size=trials + 1, max_len=16, max_draft_k=2, policy=False)
    session.add(prompt, GenerateOptions(max_new_tokens=4, ignore_eos=True, draft_k=2))  # greedy
    for seed in range(trials):
        session.add(prompt, GenerateOptions(max_new_tokens=4, ignore_eos=True, draft_k=2,
                                            sampling=SamplingParams(temperature=0.8, seed=seed)))
    results = _assert_sampled_rows_follow_the_target(session, target, prompt, params, vocab, trials)

    for seed in (3, 77):  # alone, plain and with drafts of 1 or 2 tokens: the same tokens
        options = lambda k: GenerateOptions(  # noqa: E731
            max_new_tokens=4, ignore_eos=True, draft_k=k,
            sampling=SamplingParams(temperature=0.8, seed=seed))
        runs = []
        for proposer, k in ((None, 0), (DraftModelProposer(drafter, max_len=16), 1),
                            (DraftModelProposer(drafter, max_len=16), 2)):
            alone = BatchSession(target, None, proposer, max_batch_size=1, max_len=16,
                                 max_draft_k=k, policy=False)
            alone.add(prompt, options(k))
            while not alone.idle:
                runs += [e.result.token_ids for e in alone.step() if isinstance(e, FinishEvent)]
        assert runs[0] == runs[1] == runs[2] == results[1 + seed].token_ids
