"""The numerical pieces every transformer here shares: RMSNorm, rotary embeddings, soft-caps and
grouped-query attention. The native decoder (``models/decoder.py``) and the MTP draft head
(``drafter/head.py``, query-only attention over the target's cache) both call these, so the
target and its drafter can never compute attention two different ways.

Must not: hold state or know about caches; tensors in, tensors out, float32 unless given otherwise.
"""
from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm ``x / rms(x) * scale`` (the family's offset is already in ``scale``), in float32."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * scale


def rotary_tables(inv_freq: list[float] | torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[length, 2 * len(inv_freq)]`` for the rotate-half (NeoX) layout."""
    inv = torch.as_tensor(inv_freq, dtype=torch.float32)
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv)  # [S, D/2]
    angles = torch.cat([freqs, freqs], dim=-1)  # [S, D]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, T, H, D]`` by per-position tables ``cos``/``sin`` ``[B, T, 1, D]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """``cap * tanh(x / cap)`` (Gemma 2's attention and final logit soft-caps); cap 0 = none."""
    return x if not cap else torch.tanh(x / cap) * cap


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
           scale: float, cap: float = 0.0) -> torch.Tensor:
    """Grouped-query attention without expanding K/V.

    q [B, T, H, Dh]; keys/values [B, kvh, S, Dh] (cast to q's dtype); mask [B, 1, T, S] or
    [B, T, S] (True = visible); scores soft-capped at ``cap`` when non-zero. A query that sees no
    key attends to nothing (zeros). Returns [B, T, H*Dh].
    """
    batch, steps, heads, head_dim = q.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)  # [B, 1, T, S]
    # heads h = g_kv * group + j share kv head g_kv: fold the group into the query axis
    qg = q.permute(0, 2, 1, 3).reshape(batch, kv_heads, group * steps, head_dim)
    keys, values = keys.to(qg.dtype), values.to(qg.dtype)
    scores = softcap(torch.matmul(qg, keys.transpose(-1, -2)) * scale, cap)  # [B, kvh, group*T, S]
    scores = scores.view(batch, kv_heads, group, steps, -1)
    scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0).view(batch, kv_heads, group * steps, -1)
    out = torch.matmul(probs, values)  # [B, kvh, group*T, Dh]
    out = out.view(batch, heads, steps, head_dim).transpose(1, 2)
    return out.reshape(batch, steps, heads * head_dim)
