"""The one interface every target model implements, and the only one the rest of the code uses.

The engine, the batch session, the proposers, drafter training and the benchmark talk to a
``TargetModel``: the native ``DecoderModel`` (every family of ``families``, packed CPU kernels,
the fused C++ stack) and ``HFModel`` (any transformers causal LM).
Nothing outside ``models/`` names a model class. A new architecture is a row in ``families`` plus
a parity test, never a new path through the engine.

The cache contract: ``new_cache`` returns a preallocated cache indexed by position; ``forward``
writes the K/V of exactly the positions it is given and never changes sequence lengths (the engine
owns those; rolling back is a length move). Drafters read ``cache.k[layer]`` / ``cache.v[layer]``.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from mtpspec.config import ModelConfig


@runtime_checkable
class EmbeddingRows(Protocol):
    """The embedding (or tied LM head) weight as drafters read it."""

    def rows(self, ids: torch.Tensor) -> torch.Tensor:  # [L] -> [L, d] float32
        ...

    def dequantized(self) -> torch.Tensor:  # [V, d] float32
        ...


@runtime_checkable
class TargetModel(Protocol):
    """A frozen causal LM behind the engine (see the module docstring)."""

    config: ModelConfig
    weight_format: str
    embed: EmbeddingRows

    def new_cache(self, batch_size: int = 1, max_len: int = 4096):
        """A preallocated KV cache for ``batch_size`` sequences of up to ``max_len`` positions."""
        ...

    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor, cache,
                num_logits: int | None = 1) -> tuple[torch.Tensor | None, torch.Tensor]:
        """token_ids, positions [B, T] -> (logits [B, n, V] of the last n positions (None: all,
        0: no logits), hidden [B, T, d] after the final norm), writing K/V at ``positions``."""
        ...

    def forward_hidden(self, token_ids: torch.Tensor, positions: torch.Tensor, cache,
                       num_logits: int | None = 1) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``forward`` without inference mode (callers that manage autograd themselves)."""
        ...

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:  # [*] -> [*, d] (scaled)
        ...

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:  # [*, d] -> [*, V] float32
        ...

    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """``lm_head(hidden).argmax(-1)`` [*], bit for bit, possibly without every logit."""
        ...

    def enable_argmax_screen(self, ordering: torch.Tensor | None = None):
        """Turn on exact greedy tokens without every logit where the model can (else None)."""
        ...

    @property
    def screen_nbytes(self) -> int:
        ...
