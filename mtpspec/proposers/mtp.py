"""The MTP proposer: drafts k tokens with the recurrent head, reading the target's KV cache.

Nothing is prefilled and no cache is kept: every propose() starts from the engine's state (the
target's hidden state before the pending token, and its cache, read-only). The LM head is the
target's own tied embedding, used three ways (``DrafterConfig.head``):
- ``full``: all V logits (exact, costs as much as the target's own head);
- ``clustered``: score C centroids, keep the top-m clusters, exact logits for their tokens only,
  -inf for every other token;
- ``frequency``: exact logits over a fixed set of the most frequent tokens.

Dynamic draft length: with ``min_confidence`` set, a row stops drafting once the drafter's own
estimate that its whole draft so far is accepted falls below it; the batch stops when every row
has. The estimate is the product over the draft of each token's acceptance probability: the head's
top probability (softmax over its candidate tokens) mapped through the head's ``Calibration`` (the
acceptance observed at that confidence on held-out text when it was trained, stored in
``drafter.json``), or the raw top probability for a head without one. The choice uses the
drafter's numbers only, so verification stays exact for any draft length.

On the CPU with a packed target, each draft step (and the clustered head) runs in C++
(``fused.FusedDrafter``, weights packed once at construction); ``DraftHeadLogits`` and
``MTPHead.step`` are the reference it must match, and what runs everywhere else.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from mtpspec import fused
from mtpspec.drafter.head import MTPHead
from mtpspec.models.base import TargetModel
from mtpspec.ops import FORMATS
from mtpspec.proposers.base import Draft, DraftState
from mtpspec.sampling import logits_to_probs, sample


@dataclass(frozen=True)
class Calibration:
    """The head's confidence in a draft (its top probability) -> the probability that
    verification accepts it, as observed on held-out text (``drafter.train.calibration``):
    piecewise linear through (mean confidence, observed acceptance) per confidence bin, made
    non-decreasing (pool-adjacent-violators), flat beyond the first and last bins."""

    predicted: tuple[float, ...]
    observed: tuple[float, ...]

    def __post_init__(self) -> None:  # the knots as tensors once, not per draft step
        object.__setattr__(self, "_xs", torch.tensor(self.predicted, dtype=torch.float32))
        object.__setattr__(self, "_ys", torch.tensor(self.observed, dtype=torch.float32))

    @classmethod
    def from_json(cls, table: dict | None) -> "Calibration | None":
        if not table or not table.get("predicted"):
            return None
        counts = list(table.get("count") or [1] * len(table["predicted"]))
        return cls(tuple(table["predicted"]), tuple(_monotone(table["observed"], counts)))

    def __call__(self, top: torch.Tensor) -> torch.Tensor:
        """top [B] -> calibrated acceptance probability [B]."""
        xs, ys = self._xs, self._ys
        top = top.float().clamp(self.predicted[0], self.predicted[-1])
        right = torch.searchsorted(xs, top).clamp(1, max(1, len(xs) - 1))
        if len(xs) == 1:
            return ys.expand_as(top).clone()
        x0, x1, y0, y1 = xs[right - 1], xs[right], ys[right - 1], ys[right]
        w = ((top - x0) / (x1 - x0).clamp(min=1e-9)).clamp(0, 1)
        return y0 + w * (y1 - y0)


def _monotone(values: list[float], weights: list[int]) -> list[float]:
    """Pool-adjacent-violators: the closest non-decreasing sequence (weighted least squares)."""
    blocks = []  # [mean, weight, length]
    for value, weight in zip(values, weights):
        blocks.append([float(value), float(weight), 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m1, w1, n1), (m2, w2, n2) = blocks[-2], blocks[-1]
            blocks[-2:] = [[(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, n1 + n2]]
    return [mean for mean, _, n in blocks for _ in range(n)]


class DraftHeadLogits:
    """The drafter's LM head over the target's tied embedding."""

    def __init__(self, head: MTPHead, target: TargetModel, kind: str | None = None):
        self.kind = kind or head.cfg.head
        self.target = target
        cfg = head.cfg
        self.cluster_size = cfg.vocab_size // cfg.num_clusters
        self.clusters = (head.token_ordering.view(cfg.num_clusters, self.cluster_size)
                         if self.kind == "clustered" else None)  # [C, S]
        self.centroids = head.centroids.detach().float()  # [C, d]
        self.top = cfg.top_clusters
        self.frequent = head.frequent_tokens
        self.frequent_rows = (target.embed.rows(self.frequent) if self.kind == "frequency"
                              else None)  # [N, d]

    def __call__(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """h [B, d] -> (logits [B, N], token ids [B, N]) or (full logits [B, V], None)."""
        if self.kind == "full":
            return self.target.lm_head(h), None
        if self.kind == "frequency":
            return h @ self.frequent_rows.T, self.frequent.expand(h.shape[0], -1)
        scores = h @ self.centroids.T  # [B, C]
        chosen = scores.topk(self.top, dim=-1).indices  # [B, m]
        ids = self.clusters[chosen].flatten(1)  # [B, m*S]
        rows = self.target.embed.rows(ids.flatten()).view(*ids.shape, -1)  # [B, m*S, d]
        return torch.einsum("bnd,bd->bn", rows, h), ids

    def to_full(self, logits: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        """Scatter subset logits into a full [B, V] row, -inf elsewhere."""
        if ids is None:
            return logits
        full = torch.full((logits.shape[0], self.target.config.vocab_size), float("-inf"))
        return full.scatter_(1, ids, logits)


class MTPProposer:
    name = "mtp"

    def __init__(self, head: MTPHead, target: TargetModel, head_kind: str | None = None,
                 use_fused: bool = True, fused_weights: str = "int8",
                 min_confidence: float | None = None, share_screen: bool = True):
        """use_fused: draft in C++ where it applies (CPU, packed target); fused_weights: the
        format the head's weights are packed in for it (fp32: the reference's numbers; int8, the
        default, halves a draft step and drafted the same tokens on MT-bench: it only moves
        acceptance, never the output);
        min_confidence: stop a row's draft early (see the module docstring); None: draft k;
        share_screen: the fused clustered head reads the target's argmax screen (``fused``)."""
        if min_confidence is not None and not 0.0 < min_confidence < 1.0:
            raise ValueError(f"min_confidence must be in (0, 1), got {min_confidence!r}")
        self.min_confidence = min_confidence
        self.calibration = Calibration.from_json(getattr(head, "calibration", None))
        self.head = head.eval()
        self.target = target
        self.logits = DraftHeadLogits(head, target, head_kind)
        self.fused = self._build_fused(fused_weights, share_screen) if use_fused else None

    def _build_fused(self, weights: str, share_screen: bool) -> fused.FusedDrafter | None:
        on_cpu = all(p.device.type == "cpu" for p in self.head.parameters())
        if not (on_cpu and self.target.weight_format in FORMATS and fused.available()
                and self.target.config.uniform_layers):  # Gemma 4 targets: the Python step
            return None
        try:
            return fused.FusedDrafter(self.head, self.target, self.logits.kind, weights, share_screen)
        except RuntimeError as err:  # a layout the C++ layers do not take
            warnings.warn(f"fused draft step unavailable ({err}); using the Python head")
            return None

    def reset(self) -> None:
        pass

    @torch.inference_mode()
    def propose(self, state: DraftState, k: int) -> Draft:
        cfg, batch, greedy = self.head.cfg, len(state.tokens), state.params.greedy
        fast = self.fused if self.fused is not None and _fused_cache(state.cache) else None
        step = self._fused_step(state) if fast is not None else self._reference_step(state)
        positions = state.positions  # [B] position of the pending token; slots < it are valid
        token = torch.tensor([t[-1] for t in state.tokens])  # [B] the pending token
        h = state.hidden  # [B, d]
        tokens = torch.zeros(batch, k, dtype=torch.long)
        probs = None if greedy else torch.zeros(batch, k, cfg.vocab_size)
        dynamic = self.min_confidence is not None
        reach = torch.ones(batch)  # [B] the drafter's estimate that all drafts so far are accepted
        num_drafts = torch.zeros(batch, dtype=torch.long)  # [B] drafts kept per row
        for i in range(k):
            h = step(token, h, positions if cfg.constant_positions else positions + i)
            best, logits, ids = self._head_logits(h, fast, greedy, want_logits=dynamic)
            if greedy:
                token = best
            else:
                q = logits_to_probs(self.logits.to_full(logits, ids), state.params)
                probs[:, i] = q
                token = sample(q, state.generator)
            tokens[:, i] = token
            if dynamic:  # reach only falls, so a stopped row stays stopped
                top = (torch.softmax(logits.float(), dim=-1) if greedy else q).amax(-1)  # [B]
                reach = reach * (top if self.calibration is None else self.calibration(top))
                keep = reach >= self.min_confidence  # [B]
                num_drafts += keep.long()
                if not bool(keep.any()):
                    break
        if not dynamic:
            return Draft(tokens=tokens, probs=probs)
        width = int(num_drafts.max())  # drafts past every row's stop are never verified
        return Draft(tokens=tokens[:, :width], probs=None if probs is None else probs[:, :width],
                     num_drafts=None if bool((num_drafts == width).all()) else num_drafts)

    def _fused_step(self, state: DraftState):
        """(token [B], h [B, d], query positions [B]) -> h' [B, d], in C++."""
        return lambda token, h, query: self.fused.step(token, h, query, state.positions,
                                                       state.cache)

    def _reference_step(self, state: DraftState):
        """The same step through ``MTPHead.step`` (any device, autograd-free here)."""
        cfg, cache, positions = self.head.cfg, state.cache, state.positions
        batch = len(state.tokens)
        end = int(positions.max())
        start = max(0, int(positions.min()) - cfg.sliding_window) if all(
            not g for g in cfg.layer_is_global) else 0
        kv = [(cache.k[layer, :batch, :, start:end], cache.v[layer, :batch, :, start:end])
              for layer in cfg.target_layers]

        def step(token, h, query):
            embeds = self.target.embed_tokens(token)[:, None]  # [B, 1, d]
            return self.head.step(embeds, h[:, None], query[:, None], positions[:, None], kv,
                                  key_start=start)[:, 0]
        return step

    def _head_logits(self, h: torch.Tensor, fast, greedy: bool, want_logits: bool = False):
        """h [B, d] -> (greedy token [B] or None, logits [B, N] or None, their ids or None)."""
        if fast is not None and fast.kind == "clustered":
            return fast.clustered(h, want_logits=want_logits or not greedy)
        if fast is not None and fast.kind == "frequency":
            logits, ids = fast.frequency(h)
        else:
            logits, ids = self.logits(h)
        if not greedy:
            return None, logits, ids
        best = logits.argmax(-1)  # [B]
        return (best if ids is None else ids.gather(1, best[:, None]).squeeze(1)), logits, ids


def _fused_cache(cache) -> bool:
    """Whether the C++ step can read ``cache``: one stacked CPU float32 tensor per K and V
    (per-layer buffers of Gemma 4 targets and ``HFKVCache`` are read by the Python step)."""
    return (isinstance(cache.k, torch.Tensor) and cache.k.device.type == "cpu"
            and cache.k.dtype == torch.float32 and cache.k.is_contiguous())
