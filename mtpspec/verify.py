"""Verification of draft tokens against the target: greedy and lossless rejection sampling.

Pure tensor code, no model calls, in the papers' notation (Leviathan et al. 2022, "Fast Inference
from Transformers via Speculative Decoding"; Chen et al. 2023, "Accelerating Large Language Model
Decoding with Speculative Sampling"):

- ``p``: target distribution at each of the k+1 verified positions, ``[B, k+1, V]``; position j
  is the target's next-token distribution after the prefix plus drafts ``x_0 .. x_{j-1}``.
- ``q``: the proposer's distribution for each draft, ``[B, k, V]`` (None: point-mass drafts).
- ``n``: number of accepted drafts per sequence.

Vocabulary as in vLLM's rejection sampler: *accepted* draft tokens are kept; at the first
rejection a *recovered* token is sampled from the residual ``normalize(max(0, p - q))``; if every
draft is accepted, a *bonus* token is sampled from ``p`` at the position after the last draft.
Either way each sequence emits ``n + 1`` tokens.

``coupled_verify`` is the variant whose output does not depend on the drafts at all: the token
at output position t is the inverse CDF of p_t at a uniform u_t fixed in advance (per sequence
and position), and a point-mass draft is accepted iff it equals that token. Each emitted token is
then exactly a sample of p (acceptance probability p(x), as rejection sampling with q = one-hot),
and a seeded sequence gives the same tokens whatever its draft lengths or batch neighbours.

This module must not call models, touch caches, or decide how p and q were made (that is
``sampling.logits_to_probs``, applied identically to target and proposer).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from mtpspec.sampling import inverse_cdf, sample


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of verifying one block of drafts for a batch."""

    num_accepted: Tensor  # [B] int64: n, the number of draft tokens accepted
    tokens: Tensor  # [B, k+1] int64: n accepted drafts, then the recovered/bonus token; then -1


def _check_shapes(target: Tensor, draft_tokens: Tensor, name: str) -> tuple[int, int]:
    """Validate ``target [B, k+1, V]`` against ``draft_tokens [B, k]``; return (B, k)."""
    if target.dim() != 3:
        raise ValueError(f"{name} must be [B, k+1, V], got shape {tuple(target.shape)}")
    if draft_tokens.dim() != 2:
        raise ValueError(f"draft_tokens must be [B, k], got shape {tuple(draft_tokens.shape)}")
    batch, k = draft_tokens.shape
    if target.shape[0] != batch or target.shape[1] != k + 1:
        raise ValueError(
            f"{name} shape {tuple(target.shape)} does not match draft_tokens shape "
            f"{tuple(draft_tokens.shape)}: expected [{batch}, {k + 1}, V]"
        )
    return batch, k


def _valid_mask(num_drafts: Tensor | None, batch: int, k: int, device: torch.device) -> Tensor:
    """``[B, k]`` bool: which draft slots are real (all of them when num_drafts is None)."""
    if num_drafts is None:
        return torch.ones(batch, k, dtype=torch.bool, device=device)
    if num_drafts.shape != (batch,):
        raise ValueError(f"num_drafts must be [B]=[{batch}], got shape {tuple(num_drafts.shape)}")
    if bool(((num_drafts < 0) | (num_drafts > k)).any()):
        raise ValueError(f"num_drafts must lie in [0, k={k}], got {num_drafts.tolist()}")
    return torch.arange(k, device=device) < num_drafts.to(device)[:, None]  # [B, k]


def _leading_true(mask: Tensor) -> Tensor:
    """``[B, k]`` bool -> ``[B]`` int64: length of the all-True prefix of each row."""
    return mask.long().cumprod(dim=-1).sum(dim=-1)


def _assemble(draft_tokens: Tensor, n: Tensor, last: Tensor) -> Tensor:
    """``[B, k+1]`` tokens: drafts before index n, ``last`` at n, -1 after."""
    batch, k = draft_tokens.shape
    pos = torch.arange(k + 1, device=draft_tokens.device)  # [k+1]
    padded = torch.cat([draft_tokens.long(), draft_tokens.new_full((batch, 1), -1).long()], dim=1)
    tokens = torch.where(pos < n[:, None], padded, torch.full_like(padded, -1))  # [B, k+1]
    return tokens.scatter_(1, n[:, None], last.long()[:, None])


def greedy_verify(
    target_logits: Tensor, draft_tokens: Tensor, num_drafts: Tensor | None = None
) -> VerifyResult:
    """Accept drafts while they equal the target's argmax; emit the argmax at the first mismatch.

    target_logits ``[B, k+1, V]`` (position j predicts the token after draft j-1), draft_tokens
    ``[B, k]``, num_drafts ``[B]`` (optional, ragged batches: only the first num_drafts[b] drafts
    of row b are real; its bonus is the argmax at position num_drafts[b]).
    """
    _check_shapes(target_logits, draft_tokens, "target_logits")
    return greedy_verify_argmax(target_logits.argmax(dim=-1), draft_tokens, num_drafts)


def greedy_verify_argmax(
    target_argmax: Tensor, draft_tokens: Tensor, num_drafts: Tensor | None = None
) -> VerifyResult:
    """``greedy_verify`` given the target's argmax tokens ``[B, k+1]`` instead of its logits
    (what ``greedy_tokens`` of a model returns without computing every logit)."""
    if target_argmax.dim() != 2 or draft_tokens.dim() != 2 or (
            target_argmax.shape != (draft_tokens.shape[0], draft_tokens.shape[1] + 1)):
        raise ValueError(f"target_argmax must be [B, k+1] for draft_tokens [B, k], got "
                         f"{tuple(target_argmax.shape)} and {tuple(draft_tokens.shape)}")
    batch, k = draft_tokens.shape
    valid = _valid_mask(num_drafts, batch, k, draft_tokens.device)  # [B, k]
    target_argmax = target_argmax.long()
    matches = (draft_tokens.long() == target_argmax[:, :k]) & valid  # [B, k]
    n = _leading_true(matches)  # [B]
    last = target_argmax.gather(1, n[:, None]).squeeze(1)  # [B] recovered or bonus argmax
    return VerifyResult(num_accepted=n, tokens=_assemble(draft_tokens, n, last))


def rejection_verify(
    p: Tensor,
    draft_tokens: Tensor,
    q: Tensor | None,
    generator: torch.Generator | None,
    num_drafts: Tensor | None = None,
) -> VerifyResult:
    """Lossless speculative sampling: the emitted tokens are distributed exactly as under p.

    p ``[B, k+1, V]``: target probs (after ``logits_to_probs``). draft_tokens ``[B, k]``.
    q ``[B, k, V]``: proposer probs the drafts were sampled from, processed the same way; None
    means point-mass drafts (q = one-hot of the draft), which is lossless for drafts chosen by any
    rule independent of this call's randomness. num_drafts ``[B]``: optional ragged batch.

    Draft x_i is accepted iff ``u_i * q(x_i) < p(x_i)`` with u_i ~ U[0, 1), which is
    ``u_i < min(1, p(x_i) / q(x_i))`` written without division. Edge cases:

    - p(x) = 0: never accepted (so a one-hot p reproduces ``greedy_verify`` exactly).
    - q(x) = 0 < p(x): accepted (the limit p/q -> inf). Under a correct proposer this has
      probability 0, so either choice is lossless; accepting keeps greedy p exact when q
      underflowed to 0 at the proposer's own draft, and never yields NaN.
    - residual ``max(0, p - q)`` summing to 0 means p == q, where a rejection can only follow
      an off-support draft (p(x) = q(x) = 0); the recovered token is then sampled from p.
    """
    batch, k = _check_shapes(p, draft_tokens, "p")
    vocab = p.shape[-1]
    if q is not None and q.shape != (batch, k, vocab):
        raise ValueError(f"q must be [B, k, V]=[{batch}, {k}, {vocab}], got {tuple(q.shape)}")
    device = p.device
    valid = _valid_mask(num_drafts, batch, k, device)  # [B, k]
    x = torch.where(valid, draft_tokens.long(), 0)  # [B, k] padding slots point at token 0

    p = p.float()
    p_x = p[:, :k].gather(-1, x[..., None]).squeeze(-1)  # [B, k]
    if q is None:
        q_x = torch.ones_like(p_x)  # [B, k] point mass at the draft
    else:
        q = q.float()
        q_x = q.gather(-1, x[..., None]).squeeze(-1)  # [B, k]
    u = torch.rand(batch, k, generator=generator, device=device)  # [B, k]
    accepted = (u * q_x < p_x) & valid  # [B, k]
    n = _leading_true(accepted)  # [B]

    rows = torch.arange(batch, device=device)
    p_n = p[rows, n]  # [B, V] target at the first non-accepted position
    k_valid = valid.sum(dim=-1)  # [B]
    rejected = n < k_valid  # [B] False: all real drafts accepted, p_n is the bonus distribution
    if k > 0:
        n_draft = n.clamp(max=k - 1)  # [B] rows without a rejection are masked below
        if q is None:
            x_n = x[rows, n_draft]  # [B]
            residual = p_n.scatter(-1, x_n[:, None], 0.0)  # [B, V] p with x zeroed
        else:
            residual = (p_n - q[rows, n_draft]).clamp_min(0.0)  # [B, V]
        mass = residual.sum(dim=-1, keepdim=True)  # [B, 1]
        use_residual = rejected[:, None] & (mass > 0)  # [B, 1]
        residual = residual / mass.clamp_min(torch.finfo(mass.dtype).tiny)  # [B, V]
        dist = torch.where(use_residual, residual, p_n)  # [B, V]
    else:
        dist = p_n  # [B, V]
    last = sample(dist, generator)  # [B] recovered or bonus token
    return VerifyResult(num_accepted=n, tokens=_assemble(draft_tokens, n, last))


def coupled_verify(
    p: Tensor, draft_tokens: Tensor, u: Tensor, num_drafts: Tensor | None = None
) -> VerifyResult:
    """Verification against tokens fixed by per-position uniforms (see the module docstring).

    p ``[B, k+1, V]``: target probs (after ``logits_to_probs``). draft_tokens ``[B, k]``: point
    masses, chosen without looking at u. u ``[B, k+1]``: the uniform of each verified position.
    Row b emits ``x_t = inverse_cdf(p[b, t], u[b, t])`` for t <= n, where n counts the leading
    drafts equal to those tokens."""
    batch, k = _check_shapes(p, draft_tokens, "p")
    if u.shape != (batch, k + 1):
        raise ValueError(f"u must be [B, k+1]=[{batch}, {k + 1}], got {tuple(u.shape)}")
    return coupled_verify_lazy(lambda t, rows: inverse_cdf(p[rows, t], u[rows, t]),
                               draft_tokens, num_drafts)


def coupled_verify_lazy(
    token_at: Callable[[int, Tensor], Tensor], draft_tokens: Tensor,
    num_drafts: Tensor | None = None
) -> VerifyResult:
    """``coupled_verify`` that asks for the target's token of a position only while it can still
    be emitted: ``token_at(t, rows)`` gives rows' tokens ``[r]`` at position t (rows ``[r]`` int64),
    and is called for t = 0, 1, ... with the rows whose drafts before t all matched. A sampled
    token costs a softmax over the vocabulary, so a rejection at t spares positions t+1..k."""
    batch, k = draft_tokens.shape
    valid = _valid_mask(num_drafts, batch, k, draft_tokens.device)  # [B, k]
    target = torch.full((batch, k + 1), -1, dtype=torch.long)  # [B, k+1]; -1: never asked
    rows = torch.arange(batch)  # [r] rows whose drafts so far all matched
    for t in range(k + 1):
        target[rows, t] = token_at(t, rows)
        if t == k:
            break
        rows = rows[valid[rows, t] & (draft_tokens[rows, t].long() == target[rows, t])]
        if rows.numel() == 0:
            break
    return greedy_verify_argmax(target, draft_tokens, num_drafts)
