"""The proposer protocol: what a drafter sees and what it returns.

A proposer only proposes. It reads the engine's state (token histories, the target's last hidden
states, the target's KV cache, read-only) and returns ``Draft``: k tokens per sequence and, for
sampling, the distributions q they were drawn from (None means point-mass drafts). Verification,
cache writes and rollbacks belong to the engine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from mtpspec.kv_cache import KVCache
from mtpspec.sampling import SamplingParams


@dataclass
class DraftState:
    """The engine's view of B sequences just before a verification step.

    ``tokens[b]`` is the whole history of sequence b: prompt, generated tokens, and last the
    pending token (emitted, not yet in the cache), which sits at position ``positions[b]``.
    ``hidden[b]`` is the target's final hidden state at position ``positions[b] - 1`` (the state
    that predicted the pending token); the cache holds valid K/V for slots < ``positions[b]``.
    """

    tokens: list[list[int]]
    hidden: torch.Tensor      # [B, d]
    positions: torch.Tensor   # [B] int64
    cache: KVCache            # the target's cache: read it, never write it
    params: SamplingParams
    generator: torch.Generator | None


@dataclass
class Draft:
    tokens: torch.Tensor                   # [B, k] int64
    probs: torch.Tensor | None = None      # [B, k, V] q, processed like the target's p; None: point mass
    num_drafts: torch.Tensor | None = None  # [B] valid drafts per row (ragged); None: all k

    @property
    def k(self) -> int:
        return self.tokens.shape[1]


class Proposer(Protocol):
    name: str

    def propose(self, state: DraftState, k: int) -> Draft:
        """Draft up to ``k`` tokens for each sequence of ``state``."""
        ...

    def reset(self) -> None:
        """Forget any per-sequence state (a new batch of prompts starts)."""
        ...


def empty_draft(batch: int) -> Draft:
    return Draft(tokens=torch.zeros(batch, 0, dtype=torch.long))
