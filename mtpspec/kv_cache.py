"""Preallocated key/value cache shared by a target and the drafters that read it.

Buffers are allocated once, ``[layers, B, kv_heads, max_len, head_dim]``, and cache slot ``s`` of a
sequence always holds position ``s``. A forward pass writes the slots of the positions it is given;
how far each sequence has got is the engine's bookkeeping (its position), not the cache's: rolling
back rejected draft tokens is moving that position back, and nothing is copied. Stale slots past a
position are never read, because attention only looks at slots at or before the query's own
position, and they are overwritten when the sequence gets there again.
"""
from __future__ import annotations

import torch

from mtpspec.config import ModelConfig


class CacheFullError(ValueError):
    """A request needs more positions than the cache (or the model's context) holds."""


class KVCache:
    """Per-layer K/V buffers for ``batch_size`` sequences of up to ``max_len`` positions."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if max_len > config.max_position_embeddings:
            raise CacheFullError(
                f"cache of {max_len} positions exceeds the model's context of "
                f"{config.max_position_embeddings}"
            )
        shape = (config.num_layers, batch_size, config.num_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, B, kvh, S, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # [L, B, kvh, S, D]
        self.max_len = max_len
        self.batch_size = batch_size

    def check_room(self, needed: int) -> None:
        """Raise a clear error unless ``needed`` positions fit."""
        if needed > self.max_len:
            raise CacheFullError(
                f"sequence needs {needed} positions but the cache holds {self.max_len} "
                f"(prompt plus new tokens exceed the context; shorten the prompt or max_new_tokens)"
            )

    def write(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k``/``v`` ``[B, kvh, T, D]`` at ``positions`` ``[B, T]`` of ``layer``."""
        batch, steps = positions.shape
        start = int(positions[0, 0])
        expected = start + torch.arange(steps, device=positions.device)  # [T]
        if bool((positions == expected).all()):  # the common case: one block at the same offset
            self.k[layer, :batch, :, start:start + steps] = k
            self.v[layer, :batch, :, start:start + steps] = v
            return
        rows = torch.arange(batch, device=positions.device)[:, None].expand(batch, steps)  # [B, T]
        self.k[layer].permute(0, 2, 1, 3)[rows, positions] = k.permute(0, 2, 1, 3)
        self.v[layer].permute(0, 2, 1, 3)[rows, positions] = v.permute(0, 2, 1, 3)

    @property
    def nbytes(self) -> int:
        return self.k.element_size() * self.k.numel() * 2
