"""MTP + prompt lookup: copy from the context when it clearly repeats, else draft with the head.

A base model's greedy output often loops, and extraction-style answers copy spans of the prompt;
there an n-gram match of length >= ``min_match`` predicts the continuation better than the head,
for free. Everywhere else the MTP head drafts. The choice is made per step for the whole batch
(n-gram only when every row has a long enough match), so the draft stays one tensor.
"""
from __future__ import annotations

import numpy as np

from mtpspec.proposers.base import Draft, DraftState
from mtpspec.proposers.ngram import NgramProposer, lookup


class HybridProposer:
    name = "mtp+ngram"

    def __init__(self, mtp, min_match: int = 3, max_ngram: int = 4):
        self.mtp = mtp
        self.ngram = NgramProposer(max_ngram=max_ngram, min_ngram=min_match)
        self.min_match = min_match

    def reset(self) -> None:
        self.mtp.reset()

    def propose(self, state: DraftState, k: int) -> Draft:
        if state.params.greedy and all(
                len(lookup(np.asarray(t), k, self.ngram.max_ngram, self.min_match)) == k
                for t in state.tokens):
            return self.ngram.propose(state, k)
        return self.mtp.propose(state, k)
