"""How much a compact weight format changes the model: perplexity and agreement with float32.

Speculation is lossless *within* a format (greedy speculative output equals plain output in the
same format; ``tests/test_formats.py``), but bf16/int8/int4 weights change the model itself. This
module measures by how much, with two figures per format (``bench/quality.py`` runs them on the
default model):

* ``score_text``: teacher-forced perplexity of a fixed text, plus the top-1 prediction at every
  position (so two formats can be compared on the same contexts: ``top1_agreement``);
* ``greedy_agreement``: free-running greedy continuations of the same prompts against float32's:
  how many are identical, where the first divergence falls, and the fraction of tokens before it.

Nothing here times anything or loads a model; callers pass a ``TargetModel`` and token ids.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch

from mtpspec.batch import BatchSession
from mtpspec.models.base import TargetModel
from mtpspec.sequence import FinishEvent, GenerateOptions

TEXT_CHUNK = 256  # positions per forward pass: logits [256, V] float32 is 268 MB at V = 262,144


@dataclass(frozen=True)
class TextScore:
    """Teacher-forced score of one text under one model."""

    tokens: int            # predicted positions: len(ids) - 1
    mean_nll: float        # mean negative log-likelihood per predicted token, nats
    top1: list[int]        # argmax prediction at each predicted position

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)


@torch.inference_mode()
def score_text(model: TargetModel, ids: list[int], chunk: int = TEXT_CHUNK) -> TextScore:
    """Perplexity of ``ids`` (one sequence, the bos token first): the prompt log-probabilities
    the engine's own session computes while it prefills ``ids`` in chunks of ``chunk``."""
    if len(ids) < 2:
        raise ValueError("need at least two tokens to score a text")
    session = BatchSession(model, None, None, max_batch_size=1, max_len=len(ids) + 2,
                           max_draft_k=0, prefill_chunk=chunk)
    session.add(ids, GenerateOptions(max_new_tokens=1, draft_k=0, prompt_logprobs=1,
                                     ignore_eos=True))
    result = None
    while result is None:
        result = next((e.result for e in session.step() if isinstance(e, FinishEvent)), None)
    scored = result.prompt_logprobs[1:]  # position t predicts token t + 1
    nll = -sum(entry.logprob for entry in scored)
    return TextScore(tokens=len(ids) - 1, mean_nll=nll / (len(ids) - 1),
                     top1=[entry.top[0][0] for entry in scored])


def top1_agreement(reference: TextScore, candidate: TextScore) -> float:
    """Fraction of positions where both models predict the same next token (same contexts)."""
    if reference.tokens != candidate.tokens:
        raise ValueError("scores of different texts")
    return sum(a == b for a, b in zip(reference.top1, candidate.top1)) / reference.tokens


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix: the position of the first divergence."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@dataclass(frozen=True)
class Agreement:
    """Greedy continuations of the same prompts by a candidate format against a reference."""

    prompts: int
    identical: int               # continuations equal token for token
    mean_first_divergence: float  # mean common-prefix length (= length when identical)
    min_first_divergence: int
    prefix_fraction: float       # mean over prompts of common prefix / reference length
    token_match_fraction: float  # position-wise equal tokens / reference tokens (after a
                                 # divergence the texts are shifted, so this is mostly a floor)


def greedy_agreement(reference: list[list[int]], candidate: list[list[int]]) -> Agreement:
    if len(reference) != len(candidate) or not reference:
        raise ValueError("need one candidate continuation per reference continuation")
    prefixes = [common_prefix(r, c) for r, c in zip(reference, candidate)]
    same = sum(r == c for r, c in zip(reference, candidate))
    matched = sum(sum(a == b for a, b in zip(r, c)) for r, c in zip(reference, candidate))
    total = sum(len(r) for r in reference)
    return Agreement(
        prompts=len(reference), identical=same,
        mean_first_divergence=statistics.fmean(prefixes), min_first_divergence=min(prefixes),
        prefix_fraction=statistics.fmean(p / max(len(r), 1) for p, r in zip(prefixes, reference)),
        token_match_fraction=matched / max(total, 1),
    )
