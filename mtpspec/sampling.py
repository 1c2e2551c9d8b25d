"""Sampling parameters and the logits -> probabilities -> token path.

Speculative decoding is lossless only if the verifier sees exactly the distribution that plain
sampling would draw from. This module is the single place that turns logits into that
distribution (temperature, then top-k, then top-p, then renormalise), so the target's p and the
proposer's q are always processed the same way. Greedy decoding (``temperature == 0``) is a real
argmax path, not a tiny temperature: ``logits_to_probs`` returns the one-hot of the argmax, which
makes rejection sampling collapse to exact greedy verification.

It must not call models, hold state, or touch caches.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch import Tensor


GREEDY_BELOW = 1e-5  # temperatures below this decode greedily
SEED_MODULUS = 1 << 63  # seeds are folded into [0, 2^63), what torch.Generator takes


@dataclass(frozen=True)
class SamplingParams:
    """How to turn logits into a next-token distribution."""

    temperature: float = 0.0  # below GREEDY_BELOW means greedy (argmax); else logits / it
    top_k: int = 0  # keep only the k most likely tokens; 0 turns it off
    top_p: float = 1.0  # nucleus: smallest set with cumulative prob >= top_p; 1.0 turns it off
    seed: int | None = None  # seed for make_generator; None draws one from os.urandom

    def __post_init__(self) -> None:
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise ValueError(f"temperature must be a number, got {self.temperature!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(
                f"temperature must be finite and >= 0 (0 means greedy), got {self.temperature!r}"
            )
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise ValueError(f"top_k must be an int, got {self.top_k!r}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)):
            raise ValueError(f"top_p must be a number, got {self.top_p!r}")
        if not (0.0 < self.top_p <= 1.0):  # also rejects NaN
            raise ValueError(f"top_p must be in (0, 1] (1.0 turns it off), got {self.top_p!r}")
        seed_is_int = isinstance(self.seed, int) and not isinstance(self.seed, bool)
        if self.seed is not None and not seed_is_int:
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        """Whether decoding is deterministic argmax: temperature 0, or so small (< GREEDY_BELOW)
        that ``logits / T`` would overflow (vLLM's rule)."""
        return self.temperature < GREEDY_BELOW


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """A seeded CPU generator for ``params``, or None for greedy params (nothing is random).

    With ``params.seed is None`` the seed is drawn from ``os.urandom``, so runs differ. Any int
    seed is accepted: it is folded into [0, 2^63) (negative and huge seeds included).
    """
    if params.greedy:
        return None
    seed = params.seed
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little")
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed % SEED_MODULUS)
    return generator


def _top_k_mask(logits: Tensor, k: int) -> Tensor:
    """Boolean mask of the k largest logits per row (exactly k, ties broken by topk)."""
    top_idx = torch.topk(logits, k, dim=-1).indices  # [..., k]
    keep = torch.zeros_like(logits, dtype=torch.bool)  # [..., V]
    return keep.scatter_(-1, top_idx, True)


def _top_p_mask(probs: Tensor, top_p: float, head: int = 1024) -> Tensor:
    """Boolean mask of the nucleus: the smallest highest-prob set with cumulative prob >= top_p.

    A token is kept iff the mass of the tokens strictly more likely than it (in sorted order) is
    still below top_p; the most likely token always has 0 mass before it, so one is always kept.
    Rows whose ``head`` most likely tokens already hold top_p are decided from those alone (a
    partial sort; the same tokens as a full sort), the others by a full sort.
    """
    flat = probs.reshape(-1, probs.shape[-1])  # [B, V]
    keep = torch.zeros_like(flat, dtype=torch.bool)  # [B, V]

    def nucleus(rows: Tensor, sorted_probs: Tensor, sorted_idx: Tensor) -> None:
        """keep[rows] from those rows' likeliest tokens in descending order [b, n]."""
        inside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top_p  # mass before < top_p
        inside[:, 0] = True
        keep[rows] = keep[rows].scatter_(-1, sorted_idx, inside)

    top_probs, top_idx = torch.topk(flat, min(head, flat.shape[-1]), dim=-1)  # [B, head]
    before_last = torch.cumsum(top_probs, dim=-1)[:, -1] - top_probs[:, -1]  # [B] as nucleus() sums
    decided = before_last + top_probs[:, -1] >= top_p  # [B] the nucleus lies in the head
    if bool(decided.any()):
        nucleus(decided, top_probs[decided], top_idx[decided])
    rest = ~decided
    if bool(rest.any()):
        nucleus(rest, *torch.sort(flat[rest], dim=-1, descending=True))
    return keep.view(probs.shape)


def logits_to_probs(logits: Tensor, params: SamplingParams) -> Tensor:
    """Target distribution of plain sampling: float32 probs ``[..., V]`` from logits ``[..., V]``.

    Order: divide by temperature, keep the top-k logits, softmax, keep the top-p nucleus,
    renormalise. Greedy params give the one-hot of the argmax (first index on ties).
    """
    logits = logits.float()  # [..., V]
    vocab = logits.shape[-1]
    if params.greedy:
        top = logits.argmax(dim=-1, keepdim=True)  # [..., 1]
        return torch.zeros_like(logits).scatter_(-1, top, 1.0)
    logits = logits / params.temperature
    if 0 < params.top_k < vocab:
        logits = logits.masked_fill(~_top_k_mask(logits, params.top_k), -math.inf)
    probs = torch.softmax(logits, dim=-1)  # [..., V]
    if params.top_p < 1.0:
        probs = probs.masked_fill(~_top_p_mask(probs, params.top_p), 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """Draw one token per row: probs ``[B, V]`` (need not be normalised) -> ids ``[B]`` int64.

    Inverse transform: the first token whose cumulative mass (float64) exceeds u * total, with
    u ~ U[0, 1) from ``generator``; a token of zero probability is never drawn. (torch.multinomial
    does the same job ~20x slower on a 262k vocabulary.)"""
    rows = probs.numel() // probs.shape[-1]
    u = torch.rand(rows, generator=generator, dtype=torch.float64)  # [B]
    return inverse_cdf(probs, u.view(probs.shape[:-1]))


def inverse_cdf(probs: Tensor, u: Tensor) -> Tensor:
    """The token each row's uniform picks: probs ``[..., V]`` (need not be normalised) and u
    ``[...]`` in [0, 1) -> ids ``[...]``: the first token whose cumulative mass (float64)
    exceeds u * total; a token of zero probability is never picked."""
    flat = probs.reshape(-1, probs.shape[-1]).double()  # [B, V]
    cdf = torch.cumsum(flat, dim=-1)  # [B, V]
    scaled = u.reshape(-1, 1).double() * cdf[:, -1:]  # [B, 1]
    tokens = torch.searchsorted(cdf, scaled, right=True).clamp_(max=flat.shape[-1] - 1)  # [B, 1]
    empty = flat.gather(1, tokens)[:, 0] <= 0  # u * total rounded up to total: rare
    for row in torch.nonzero(empty).flatten().tolist():  # the last token with mass instead
        tokens[row, 0] = int(torch.nonzero(flat[row] > 0).max())
    return tokens.reshape(probs.shape[:-1])


NUCLEUS_SCREEN = 2.0 ** -16  # candidates of a nucleus first: tokens with p >= this * max p


def nucleus(probs: Tensor, top_p: float) -> Tensor:
    """Token ids of one row's top-p nucleus, ascending: probs ``[V]`` -> ``[n]`` int64.

    The same rule as ``_top_p_mask`` (a token is kept iff the float32 cumulative mass of the tokens
    sorted before it is below top_p): it sorts only the tokens with p >= ``NUCLEUS_SCREEN`` * max p,
    which are the likeliest tokens, and keeps that answer when their cumulative mass reaches top_p
    (every other token sorts after them, so it would be cut); else it sorts the whole row."""
    screen = torch.nonzero(probs >= probs.max() * NUCLEUS_SCREEN).flatten()  # [c]
    values, order = torch.sort(probs[screen], descending=True)  # [c]
    cumulative = torch.cumsum(values, dim=-1)  # [c]
    if float(cumulative[-1]) < top_p:  # the nucleus may reach past the screened tokens
        values, screen = torch.sort(probs, descending=True)
        order = torch.arange(probs.shape[-1])
        cumulative = torch.cumsum(values, dim=-1)
    inside = cumulative - values < top_p  # [c] mass before < top_p
    inside[0] = True
    return torch.sort(screen[order[inside]]).values


def sample_from_logits(logits: Tensor, params: SamplingParams, u: Tensor) -> Tensor:
    """The token each row's uniform picks under ``params``: logits ``[B, V]``, u ``[B]`` in
    [0, 1) -> ids ``[B]``. Greedy params: the argmax.

    The same distribution as ``inverse_cdf(logits_to_probs(logits, params), u)`` without making
    the renormalised ``[B, V]`` tensor: temperature, top-k and the softmax as there, then the
    inverse CDF (float64, token id order) over the nucleus alone (``nucleus``). Both plain and
    speculative decoding of a coupled row draw through here, so a seed gives the same tokens."""
    if params.greedy:
        return logits.argmax(dim=-1)
    x = logits.float() / params.temperature  # [B, V]
    vocab = x.shape[-1]
    if 0 < params.top_k < vocab:
        x = x.masked_fill(~_top_k_mask(x, params.top_k), -math.inf)
    probs = torch.softmax(x, dim=-1)  # [B, V]
    if params.top_p >= 1.0:
        return inverse_cdf(probs, u)
    tokens = torch.empty(probs.shape[0], dtype=torch.long)
    for row in range(probs.shape[0]):
        ids = nucleus(probs[row], params.top_p)  # [n]
        tokens[row] = ids[inverse_cdf(probs[row, ids], u[row])]
    return tokens


def select(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> Tensor:
    """Next token per row from logits ``[B, V]`` -> ``[B]``: argmax for greedy, else a sample."""
    if params.greedy:
        return logits.argmax(dim=-1)
    return sample(logits_to_probs(logits, params), generator)
