"""Exact greedy tokens of the int8 tied LM head without computing every logit ("argmax screen").

What: ``ArgmaxScreen(embed)`` answers ``argmax_n logits[r, n]`` for rows of final hidden states,
where ``logits = embed(hidden)`` is exactly what ``ops.PackedLinear`` (int8) computes, bit for bit,
first index on ties (torch.argmax's rule) - without computing all V logits in float32:
1. screen: every token's logit is estimated with integer arithmetic (activations rounded to 6 bits
   per group of 32 inputs, weights int8 stored offset by 128 in a VNNI-like layout, AVX2
   ``maddubs``/``madd``), with a rigorous bound ``|approx_n - exact_n| <= beta_n * R_r`` (below);
2. every token whose upper bound ``approx + beta R`` reaches the largest lower bound
   ``max(approx - beta R)`` (less 2^-140) is a candidate (a handful: see ``last_candidates``);
3. candidates' logits are recomputed by the very kernel of the full product (one accumulator per
   output in k order, the same for any row count or panel), so they are the full product's bits;
   the best of them is the argmax, since every other token is strictly below it.

The bound (u = 2^-24, g(n) = n u / (1 - n u); x = a row [K], K inputs in ng = ceil(K/32) groups;
token n: int8 row q (q_k = 0 past K), scale s, beta = s ||q|| rounded up):
- The full product computes ``exact = fl(fl-FMA-chain_k(x_k q_k) * s)``: one rounding per FMA and
  one for the scale, so ``|exact - s sum_k x_k q_k| <= g(K+1) s sum_k |x_k q_k| <= g(K+1) beta ||x||``
  (Cauchy-Schwarz).
- The screen rounds x to ``xh_k = a_k sc_g`` (a_k integer in [-63, 63], sc_g = max|x_g| / 63 per
  group); ``e = x - xh`` is computed exactly enough in double. The integer sums D_g = sum q_k a_k
  are exact (|D_g| <= 32*127*63 < 2^24, no int16 saturation: 2*255*63 < 2^15), and
  ``approx = fl(fl-FMA-chain_g(D_g sc_g) * s)``, so ``|approx - s sum_k xh_k q_k| <= g(ng+1) beta ||xh||``
  with ``||xh|| <= ||x|| + ||e||``. The real difference of the two sums is
  ``s |sum_k e_k q_k| <= beta ||e||``.
- So ``|exact - approx| <= beta R0`` with ``R0 = ||e|| + g(K+1) ||x|| + g(ng+1) (||x|| + ||e||)``.
  The bounds are themselves float32 FMAs ``approx -/+ beta R``: each rounding moves them by at most
  ``u (|approx| + beta R) <= u beta (1.011 (||x|| + ||e||) + R)`` (K u <= 0.01), which
  ``R = (1.001 ||e|| + (g(K+1) + g(ng+1) + 3u)(||x|| + ||e||) + (K + ng) 2^-149) / (1 - 4u)``,
  rounded up, covers. The (K + ng) 2^-149 term covers the absolute error of sums that go
  subnormal (at most 2^-150 per operation, times s <= beta for a nonzero row; a zero row gives 0
  on both sides); the 2^-140 taken off the threshold covers the few final roundings below 2^-126.
  Then for the true argmax m and any token n: computed lower bound of n <= exact_n <= exact_m <=
  computed upper bound of m, so m is always a candidate.
- The slack grows with K (4e-5 ||x|| at K = 640, 1.5e-4 at 2,560, 3.2e-4 at 5,376): the old fixed
  ``1e-4 ||h||`` did not hold past K ~ 1,600. Heads with K u > 0.01 are refused.
- Overflow: a row whose sums could leave float32 (``2 ||x|| max(beta, 127 sqrt(K)) > 1e37``) or
  that holds a non-finite value goes to the full product, whose argmax is the reference.

Why: a verification pass over k+1 tokens is arithmetic-bound on 2 cores, and the float32 LM head
(262,144 x 640) is most of it: the integer screen does 32 multiply-adds in 3 instructions where the
float path needs ~6, so the head of a 4-8 row pass costs about one read of its weights again.
Greedy output stays bit-identical to plain decoding (tests/test_screen.py). The C++ is
``mtpspec/csrc/screen.cpp``.

Costs: a second copy of the head (V x K bytes, 168 MB for Gemma 3) plus two floats per token. A
clustered MTP drafter on the same target reads this copy for its own LM head (built in its cluster
order, ``ordering``), so speculative decoding holds one extra copy, not two.
Must not: be used where probabilities are needed (sampling needs every logit), for non-int8
heads, or under a final logit soft-cap (``cap * tanh(l / cap)`` rounds distinct logits to equal
values, up to every token past tanh's saturation, so the candidate set would have to be every token
whose capped value can tie: refused, the full head runs).
"""
from __future__ import annotations

import torch
from torch import Tensor

from mtpspec import native, ops
from mtpspec.ops import PackedLinear

GROUP = 32          # inputs per activation scale
MAX_ROWS = 64       # rows per C++ call (its per-chunk bounds live on the stack)
MAX_INPUTS = int(0.01 * 2**24)  # K u <= 0.01: the bound's constants hold (see the docstring)
OVERFLOW = 1e37     # rows whose sums may come this close to float32's range take the full head


def check_ordering(ordering: Tensor, vocab: int, padded: bool = True) -> None:
    """Raise ``ValueError`` unless ``ordering`` holds every token id in [0, vocab) exactly once
    (with -1 padding entries when ``padded``): a token missing from it would be invisible to
    greedy verification, a duplicate would hide another."""
    ids = ordering.detach().to(torch.long).cpu().reshape(-1)
    real = ids[ids >= 0] if padded else ids
    bad = ids[(ids < -1) | (ids >= vocab)] if padded else ids[(ids < 0) | (ids >= vocab)]
    if bad.numel():
        raise ValueError(f"token ordering holds ids outside [0, {vocab}): {bad[:5].tolist()}")
    counts = torch.bincount(real, minlength=vocab)
    if bool((counts > 1).any()):
        dup = torch.nonzero(counts > 1).flatten()[:5].tolist()
        raise ValueError(f"token ordering is not a permutation: ids {dup} appear more than once")
    if bool((counts == 0).any()):
        missing = torch.nonzero(counts == 0).flatten()[:5].tolist()
        raise ValueError(f"token ordering is not a permutation: ids {missing} are missing")

class ArgmaxScreen:
    """Exact argmax of an int8 ``PackedLinear`` head's logits (see the module docstring)."""

    def __init__(self, embed: PackedLinear, ordering: Tensor | None = None, chunk: int = 4096,
                 final_logit_softcap: float = 0.0):
        """embed: the int8 tied head; ordering: optional [V'] token ids giving the screen's row
        order (-1: a padding row), e.g. a clustered drafter's cluster order, checked to hold
        every token once; chunk: tokens packed at a time (bounds the temporary memory);
        final_logit_softcap: the model's (> 0 is refused, see the module docstring)."""
        if embed.fmt != "int8":
            raise ValueError(f"the argmax screen needs an int8 head, got {embed.fmt}")
        if final_logit_softcap > 0:
            raise ValueError("the argmax screen cannot bound ties under a final logit soft-cap")
        if embed.in_features > MAX_INPUTS:
            raise ValueError(f"the argmax screen's bound needs K <= {MAX_INPUTS}")
        self.embed = embed
        vocab, k = embed.out_features, embed.in_features
        if ordering is not None:
            check_ordering(ordering, vocab)
        rows = torch.arange(vocab) if ordering is None else ordering.to(torch.long).cpu()
        total = -(-rows.numel() // 16) * 16
        rows = torch.cat([rows, rows.new_full((total - rows.numel(),), -1)])  # [T]
        kp = -(-k // GROUP) * GROUP
        # [P, 2, Kp/4, 8, 4]: per panel of 16 rows, two halves of 8, each k-quad-major
        self.u = torch.empty(total // 16, 2, kp // 4, 8, 4, dtype=torch.uint8)
        self.scale = torch.zeros(total)  # [T] each row's int8 scale (0: padding)
        self.beta = torch.zeros(total)   # [T] scale * ||q||_2 rounded up (inf: padding)
        for begin in range(0, total, chunk):
            ids = rows[begin:begin + chunk]  # [n], n % 16 == 0
            valid = ids >= 0
            src = ids.clamp(min=0)
            q = embed.packed[src // 16, :, src % 16].to(torch.int16) * valid[:, None]  # [n, K]
            q = torch.nn.functional.pad(q, (0, kp - k))
            u = (q + 128).to(torch.uint8).view(-1, 2, 8, kp // 4, 4).permute(0, 1, 3, 2, 4)
            self.u[begin // 16:(begin + ids.numel()) // 16] = u
            s = torch.where(valid, embed.scales[src].double(), 0.0)
            norm = q.double().pow(2).sum(1).sqrt()
            self.scale[begin:begin + ids.numel()] = s.float()
            beta = torch.where(valid, s * norm * (1 + 1e-6), float("inf"))
            self.beta[begin:begin + ids.numel()] = beta.float()
        self.order = torch.empty(0, dtype=torch.long) if ordering is None else rows  # [T]
        # rows with 2 ||x|| * limit > OVERFLOW may overflow a float32 sum: full head
        self._norm_limit = OVERFLOW / (2 * max(float(self.beta[self.beta.isfinite()].max()),
                                                127 * k ** 0.5))
        self.last_candidates: Tensor | None = None  # [N] candidates per row of the last call

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.u, self.scale, self.beta, self.order))

    @staticmethod
    def available() -> bool:
        return native.extension() is not None

    def __call__(self, hidden: Tensor) -> Tensor:
        """hidden [..., d] -> the argmax token of each row's logits [...] (int64)."""
        lead = hidden.shape[:-1]
        x = hidden.reshape(-1, hidden.shape[-1]).to(torch.float32).contiguous()  # [N, d]
        ext = native.extension()
        if ext is None or not self._bounded(x):
            return self.embed(x).argmax(-1).reshape(lead)
        weight = self.embed.kernel_weight()
        tokens, counts = [], []
        for begin in range(0, x.shape[0], MAX_ROWS):  # the C++ call takes up to MAX_ROWS rows
            t, c = ext.screen_argmax(x[begin:begin + MAX_ROWS], weight, self.u, self.scale,
                                     self.beta, self.order, ops.get_num_threads(),
                                     ops._CHUNK_BYTES)
            tokens.append(t)
            counts.append(c)
        self.last_candidates = torch.cat(counts)
        return torch.cat(tokens).reshape(lead)

    def _bounded(self, x: Tensor) -> bool:
        """Whether the screen's bound holds for rows x [N, d]: finite, no overflow possible."""
        if x.shape[0] == 0 or not bool(torch.isfinite(x).all()):
            return False
        return float(x.double().norm(dim=-1).max()) <= self._norm_limit
