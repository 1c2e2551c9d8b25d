"""Preallocated key/value cache shared by a target and the drafters that read it.

Buffers are allocated once, ``[layers, B, kv_heads, max_len, head_dim]``, and cache slot ``s`` of a
sequence always holds position ``s``. A forward pass writes the slots of the positions it is given;
how far each sequence has got is the engine's bookkeeping (its position), not the cache's: rolling
back rejected draft tokens is moving that position back, and nothing is copied. Stale slots past a
position are never read, because attention only looks at slots at or before the query's own
position, and they are overwritten when the sequence gets there again.

Decoders whose layers differ in K/V shape or share K/V (Gemma 4: wider global layers, the last
layers reusing an earlier layer's K/V) get one buffer per layer that computes K/V instead
(``LayerBuffers``): ``cache.k[layer]`` resolves a sharing layer to its source's buffer, so drafters
read any layer the same way, and ``cache.k[:, rows, ...]`` moves rows of every buffer at once.
"""
from __future__ import annotations

import torch

from mtpspec.config import ModelConfig


class CacheFullError(ValueError):
    """A request needs more positions than the cache (or the model's context) holds."""


class LayerBuffers:
    """Per-layer buffers ``[B, kvh_l, S, D_l]`` that index like a stacked ``[L, B, kvh, S, D]``.

    ``buffers[layer]`` is None for a layer that reuses another's K/V; ``source[layer]`` names the
    layer that owns the buffer it reads. ``x[layer, ...]`` indexes that buffer; ``x[:, ...]`` is
    a ``LayerSlices`` over every owned buffer, and assigning one to ``x[:, ...]`` copies layer by
    layer (the batch session moves rows this way).
    """

    def __init__(self, buffers: list[torch.Tensor | None], source: list[int]):
        self.buffers = buffers
        self.source = source

    def __getitem__(self, index):
        layer, rest = (index[0], index[1:]) if isinstance(index, tuple) else (index, ())
        if isinstance(layer, slice):
            if layer != slice(None):
                raise IndexError("select all layers (:) or one layer")
            return LayerSlices({i: b[rest] for i, b in enumerate(self.buffers) if b is not None})
        if isinstance(layer, (list, tuple)):  # layers of one shape, stacked: [len, ...]
            return torch.stack([self[(i, *rest)] for i in layer])
        buffer = self.buffers[self.source[int(layer)]]
        return buffer[rest] if rest else buffer

    def __setitem__(self, index, value: "LayerSlices") -> None:
        layer, rest = (index[0], index[1:]) if isinstance(index, tuple) else (index, ())
        if layer != slice(None) or not isinstance(value, LayerSlices):
            raise IndexError("assign a LayerSlices to all layers (:)")
        for i, part in value.parts.items():
            self.buffers[i][rest] = part


class LayerSlices:
    """The same index applied to every owned layer buffer: ``{layer: tensor}``."""

    def __init__(self, parts: dict[int, torch.Tensor]):
        self.parts = parts


class KVCache:
    """Per-layer K/V buffers for ``batch_size`` sequences of up to ``max_len`` positions: one
    stacked tensor ``[L, B, kvh, S, D]`` when every layer has its own K/V of one shape, else
    ``LayerBuffers`` (see the module docstring)."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if max_len > config.max_position_embeddings:
            raise CacheFullError(
                f"cache of {max_len} positions exceeds the model's context of "
                f"{config.max_position_embeddings}"
            )
        layers = range(config.num_layers)
        shapes = [(config.layer_kv_heads(i), config.layer_head_dim(i)) for i in layers]
        source = [config.kv_source(i) for i in layers]
        if len(set(shapes)) == 1 and source == list(layers):
            shape = (config.num_layers, batch_size, *shapes[0][:1], max_len, shapes[0][1])
            self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, B, kvh, S, D]
            self.v = torch.zeros(shape, dtype=dtype, device=device)  # [L, B, kvh, S, D]
        else:
            def buffers():  # [B, kvh_l, S, D_l] for each layer that computes K/V
                return [torch.zeros(batch_size, heads, max_len, dim, dtype=dtype, device=device)
                        if source[i] == i else None for i, (heads, dim) in enumerate(shapes)]
            self.k = LayerBuffers(buffers(), source)
            self.v = LayerBuffers(buffers(), source)
        self.source = source
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
        if self.source[layer] != layer:
            raise ValueError(f"layer {layer} reuses layer {self.source[layer]}'s K/V; it writes none")
        keys, values = self.k[layer], self.v[layer]  # [B, kvh, S, D]
        if bool((positions == expected).all()):  # the common case: one block at the same offset
            keys[:batch, :, start:start + steps] = k
            values[:batch, :, start:start + steps] = v
            return
        rows = torch.arange(batch, device=positions.device)[:, None].expand(batch, steps)  # [B, T]
        keys.permute(0, 2, 1, 3)[rows, positions] = k.permute(0, 2, 1, 3)
        values.permute(0, 2, 1, 3)[rows, positions] = v.permute(0, 2, 1, 3)

    @property
    def stacked(self) -> bool:
        """Whether ``k``/``v`` are single ``[L, B, kvh, S, D]`` tensors (what fused code reads)."""
        return isinstance(self.k, torch.Tensor)

    @property
    def nbytes(self) -> int:
        parts = [self.k] if self.stacked else [b for b in self.k.buffers if b is not None]
        return 2 * sum(t.element_size() * t.numel() for t in parts)
