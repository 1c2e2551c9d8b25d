"""Prompt-lookup (n-gram) proposer: no model, only the sequence's own history.

Find the most recent earlier occurrence of the last n tokens (n from ``max_ngram`` down to
``min_ngram``) and propose the tokens that followed it. Rows with no match draft nothing (a
ragged draft), so they cost the engine nothing extra.
"""
from __future__ import annotations

import numpy as np
import torch

from mtpspec.proposers.base import Draft, DraftState, empty_draft


def lookup(history: np.ndarray, k: int, max_ngram: int, min_ngram: int) -> list[int]:
    """Up to k tokens that followed the latest earlier match of the longest suffix n-gram."""
    length = len(history)
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        suffix = history[length - n:]
        # candidate starts: positions whose token equals the suffix's first token
        starts = np.flatnonzero(history[:length - n] == suffix[0])
        for start in starts[::-1]:
            if np.array_equal(history[start:start + n], suffix):
                follow = history[start + n:start + n + k]
                if len(follow):
                    return follow.tolist()
    return []


class NgramProposer:
    name = "ngram"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def reset(self) -> None:
        pass

    def propose(self, state: DraftState, k: int) -> Draft:
        proposals = [lookup(np.asarray(tokens), k, self.max_ngram, self.min_ngram)
                     for tokens in state.tokens]
        width = max(len(p) for p in proposals)
        if width == 0:
            return empty_draft(len(proposals))
        tokens = torch.zeros(len(proposals), width, dtype=torch.long)
        for b, proposal in enumerate(proposals):
            tokens[b, :len(proposal)] = torch.tensor(proposal, dtype=torch.long)
        counts = torch.tensor([len(p) for p in proposals])
        return Draft(tokens=tokens, probs=None, num_drafts=None if bool((counts == width).all())
                     else counts)
