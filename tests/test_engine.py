"""Losslessness of the engine: greedy equality with many proposers, stops inside accepted blocks,
seeded reproducibility, and a distribution test of speculative sampling against plain sampling."""
from __future__ import annotations

import pytest
import torch

from mtpspec.engine import Engine, GenerateOptions
from mtpspec.proposers.base import Draft
from mtpspec.proposers.draft_model import DraftModelProposer
from mtpspec.proposers.ngram import NgramProposer
from mtpspec.sampling import SamplingParams, logits_to_probs

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
    engine = Engine(tiny, proposer=proposer)
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
        engine = Engine(tiny, proposer=oracle)
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
    # exact joint distribution of the first two tokens under the target
    cache = target.new_cache(1, 16)
    logits, _ = target(torch.tensor([prompt]), torch.arange(4)[None], cache)
    p1 = logits_to_probs(logits[0, -1], params)
    expected = torch.zeros(vocab * vocab)
    for x in range(vocab):
        if p1[x] == 0:
            continue
        c = target.new_cache(1, 16)
        l2, _ = target(torch.tensor([prompt + [x]]), torch.arange(5)[None], c)
        expected[x * vocab:(x + 1) * vocab] = p1[x] * logits_to_probs(l2[0, -1], params)
    trials = 6000
    spec = _joint_counts(Engine(target, proposer=DraftModelProposer(drafter)), prompt, params,
                         trials, vocab)
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
    results = Engine(tiny, proposer=proposer).generate(prompts, spec)
    assert [r.token_ids for r in results] == expected
    single = Engine(tiny, proposer=proposer).generate(prompts[:1], spec)[0]
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
