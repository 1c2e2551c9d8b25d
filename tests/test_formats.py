"""Each weight format on its own terms: greedy speculative output equals plain greedy output *in
the same format* (fp32, bf16, int8, int4), on the packed kernels and the fused C++ path when it
builds; plus the default format and the quality metrics of ``mtpspec.bench.quality``.

A compact format changes the model (bench/quality.py measures how much against float32); it must
never change what speculation emits relative to plain decoding of that same model.
"""
from __future__ import annotations

import pytest
import torch

from mtpspec import native
from mtpspec.bench.quality import common_prefix, greedy_agreement, score_text, top1_agreement
from mtpspec.engine import Engine, GenerateOptions
from mtpspec.ops import FORMATS
from mtpspec.proposers.hybrid import HybridProposer
from mtpspec.proposers.mtp import MTPProposer
from mtpspec.proposers.ngram import NgramProposer
from mtpspec.runtime import DEFAULT_WEIGHTS

from conftest import tiny_model
from test_engine import OracleProposer
from test_fused import tiny_drafter

NEW_TOKENS = 20


def prompts_for(vocab: int) -> list[list[int]]:
    """Ragged prompts, some repetitive (for prompt lookup), one past the sliding window of 8."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randint(3, vocab, (4,), generator=gen).tolist()
    return [[2] + base * 3, [2, 400], [2] + torch.randint(3, vocab, (12,), generator=gen).tolist()]


@pytest.fixture(scope="module", params=FORMATS)
def format_case(request):
    """(format, tiny model in it, prompts, plain greedy continuations one prompt at a time)."""
    model = tiny_model(seed=21, fmt=request.param)
    prompts = prompts_for(model.config.vocab_size)
    options = GenerateOptions(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    plain = [Engine(model).generate([p], options)[0].token_ids for p in prompts]
    return request.param, model, prompts, plain


def proposer(kind: str, model, prompts, plain):
    if kind in ("right", "wrong"):  # the known plain continuation, or one shifted by one id
        return OracleProposer(prompts, plain, model.config.vocab_size, wrong=kind == "wrong")
    if kind == "ngram":
        return NgramProposer()
    head = tiny_drafter(model, num_clusters=16, seed=3)
    mtp = MTPProposer(head, model, "clustered")
    return mtp if kind == "mtp" else HybridProposer(mtp, min_match=2)


@pytest.mark.parametrize("k", [1, 3, 6])
@pytest.mark.parametrize("kind", ["right", "wrong", "ngram", "mtp", "mtp+ngram"])
def test_greedy_speculative_equals_plain_in_each_format(format_case, kind, k):
    fmt, model, prompts, plain = format_case
    assert model.weight_format == fmt
    engine = Engine(model, proposer=proposer(kind, model, prompts, plain))
    options = GenerateOptions(max_new_tokens=NEW_TOKENS, ignore_eos=True, draft_k=k)
    singles = [engine.generate([p], options)[0] for p in prompts]
    assert [r.token_ids for r in singles] == plain, (fmt, kind, k)
    batched = engine.generate(prompts, options)  # ragged acceptance across rows
    assert [r.token_ids for r in batched] == plain, (fmt, kind, k)
    if kind == "right":
        assert all(r.stats.tau > 1.0 for r in singles)
    if kind == "wrong":
        assert all(r.stats.draft_accepted == 0 for r in singles)


def test_tiny_models_take_the_fused_path():
    if native.portable_reason() is not None:
        pytest.skip(f"portable path: {native.portable_reason()}")
    for fmt in FORMATS:
        model = tiny_model(seed=21, fmt=fmt)
        with torch.no_grad():  # the engine runs under inference mode
            stack = model._fused_stack(torch.tensor([[2, 3]]), model.new_cache(1, 8))
        assert stack is not None, fmt


def test_default_format_is_one_constant_the_cli_uses():
    from mtpspec.cli import build_parser

    assert DEFAULT_WEIGHTS in FORMATS
    args = build_parser().parse_args(["generate", "hello"])
    assert args.weights == DEFAULT_WEIGHTS
    args = build_parser().parse_args(["bench"])
    assert args.weights == DEFAULT_WEIGHTS


# ---- quality metrics


def test_text_score_does_not_depend_on_the_chunking():
    model = tiny_model(seed=22)
    ids = [2] + torch.randint(3, model.config.vocab_size, (40,),
                              generator=torch.Generator().manual_seed(1)).tolist()
    whole, chunked = score_text(model, ids, chunk=1000), score_text(model, ids, chunk=7)
    assert whole.tokens == chunked.tokens == 40
    assert abs(whole.mean_nll - chunked.mean_nll) < 1e-4
    assert top1_agreement(whole, chunked) == 1.0
    # by hand: mean -log p(next token) from one full forward pass
    logits, _ = model(torch.tensor([ids]), torch.arange(len(ids))[None],
                      model.new_cache(1, len(ids)), num_logits=None)
    logp = torch.log_softmax(logits[0, :-1], -1)
    want = -logp.gather(1, torch.tensor(ids[1:])[:, None]).mean().item()
    assert abs(whole.mean_nll - want) < 1e-4
    assert whole.perplexity == pytest.approx(torch.tensor(want).exp().item(), rel=1e-4)


def test_compact_formats_stay_close_on_a_tiny_model():
    ids = [2] + torch.randint(3, 256, (60,), generator=torch.Generator().manual_seed(2)).tolist()
    ref = score_text(tiny_model(seed=23, fmt="fp32"), ids)
    for fmt, tol in (("bf16", 0.01), ("int8", 0.02), ("int4", 0.15)):
        got = score_text(tiny_model(seed=23, fmt=fmt), ids)
        assert abs(got.mean_nll - ref.mean_nll) < tol * ref.mean_nll, fmt


def test_greedy_agreement_figures():
    ref = [[1, 2, 3, 4], [5, 6, 7, 8]]
    got = [[1, 2, 3, 4], [5, 9, 7, 8]]
    a = greedy_agreement(ref, got)
    assert (a.prompts, a.identical, a.min_first_divergence) == (2, 1, 1)
    assert a.mean_first_divergence == 2.5 and a.prefix_fraction == (1 + 0.25) / 2
    assert a.token_match_fraction == 7 / 8
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    with pytest.raises(ValueError):
        greedy_agreement(ref, got[:1])
