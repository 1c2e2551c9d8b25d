"""The MTP drafter: a small recurrent head on a frozen target (after Gemma 4's assistant drafters).

One application of the head (a "draft step"):

    x  = pre_projection(concat(embed(token) * sqrt(d_target), h))      # [B, d_draft]
    x  = draft layers: query-only attention over the TARGET's KV cache, then an MLP
    h' = out_norm(post_projection(norm(x)))                             # [B, d_target]
    logits = target's tied LM head (full, clustered, or a fixed frequent subset) of h'

Step 0 uses the target's final hidden state at the last accepted position; step i > 0 feeds the
head's own h' back (one head applied k times). The head owns no KV cache and runs no prefill: each
draft layer reads the K/V that one target layer already wrote (``target_layers``), and never writes
them. By default draft layer j reads the last target layer of its attention type (sliding-window or
global), as Gemma 4 does: those layers hold the most processed keys, and a sliding draft layer only
needs the recent window. The drafted tokens are not in the cache, so every draft step attends to
the committed slots ``< p`` only; ``constant_positions`` keeps the query's rotary position at p.

Google's Gemma 4 assistants (``drafter/gemma4_assistant.py``) are the same body with a few
switches, all off by default: per-layer head sizes (Gemma 4's global layers are wider), a scalar on
each layer's output, norms that store their scale directly (``norm_offset = 0``), no norm after
the post-projection, partial ("proportional") rotary on global layers, and an LM head of their own
(``lm_head_source = "draft"``): logits of the normed draft state against an embedding
``[V, d_draft]``, full or clustered, while the post-projected state is only the recurrence.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mtpspec.config import ModelConfig
from mtpspec.config import RopeScaling
from mtpspec.models.attention import apply_rotary, attend, rms_norm, rotary_tables

HEAD_KINDS = ("clustered", "full", "frequency")
LM_HEAD_SOURCES = ("target", "draft")  # whose embedding scores the draft state


@dataclass(frozen=True)
class DrafterConfig:
    target_hidden: int
    vocab_size: int
    head_dim: int                      # must equal the target's: draft queries meet target keys
    target_kv_heads: int
    target_layers: tuple[int, ...]     # target layer whose K/V draft layer j reads
    layer_is_global: tuple[bool, ...]  # attention type of each draft layer (that target layer's)
    d_draft: int = 512
    num_heads: int = 4
    intermediate_size: int = 2048
    sliding_window: int = 512
    rope_theta_local: float = 10_000.0
    rope_theta_global: float = 1_000_000.0
    rope_scaling_factor: float = 1.0
    query_scale: float = 1 / 16        # the target's query_pre_attn_scalar ** -0.5
    rms_norm_eps: float = 1e-6
    constant_positions: bool = True
    head: str = "clustered"
    num_clusters: int = 2048
    top_clusters: int = 32
    frequency_vocab: int = 16_384
    target_name: str = ""
    target_hash: str = ""
    extra: dict = field(default_factory=dict)
    # Gemma 4 assistant switches (the defaults are the original mtpspec head)
    layer_head_dims: tuple[int, ...] = ()   # per draft layer (empty: head_dim everywhere)
    layer_kv_heads: tuple[int, ...] = ()    # per draft layer (empty: target_kv_heads everywhere)
    layer_scalars: tuple[float, ...] = ()   # each layer's output is scaled by this (empty: 1)
    norm_offset: float = 1.0                # RMSNorm scale = norm_offset + weight
    out_norm: bool = True                   # RMSNorm after post_projection
    lm_head_source: str = "target"          # "draft": the head's own embedding [V, d_draft]
    rope_partial_global: float = 1.0        # rotated fraction of the head on global layers

    def __post_init__(self) -> None:
        if len(self.target_layers) != len(self.layer_is_global) or not self.target_layers:
            raise ValueError("target_layers and layer_is_global must be non-empty and equally long")
        for name in ("layer_head_dims", "layer_kv_heads", "layer_scalars"):
            if getattr(self, name) and len(getattr(self, name)) != len(self.target_layers):
                raise ValueError(f"{name} needs one value per draft layer")
        if any(self.num_heads % self.kv_heads_of(i) for i in range(self.num_layers)):
            raise ValueError("num_heads must be a multiple of the target's kv heads")
        if self.lm_head_source not in LM_HEAD_SOURCES:
            raise ValueError(f"lm_head_source must be one of {LM_HEAD_SOURCES}")
        if self.head not in HEAD_KINDS:
            raise ValueError(f"head must be one of {HEAD_KINDS}, got {self.head!r}")

    @property
    def num_layers(self) -> int:
        return len(self.target_layers)

    def head_dim_of(self, layer: int) -> int:
        return self.layer_head_dims[layer] if self.layer_head_dims else self.head_dim

    def kv_heads_of(self, layer: int) -> int:
        return self.layer_kv_heads[layer] if self.layer_kv_heads else self.target_kv_heads

    @property
    def logit_dim(self) -> int:
        """Width of the state the LM head scores (and of the centroids)."""
        return self.d_draft if self.lm_head_source == "draft" else self.target_hidden

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict) -> "DrafterConfig":
        raw = dict(raw)
        for key in ("target_layers", "layer_is_global", "layer_head_dims", "layer_kv_heads",
                    "layer_scalars"):
            if key in raw:
                raw[key] = tuple(raw[key])
        return cls(**raw)

    @classmethod
    def for_target(cls, target: ModelConfig, num_layers: int = 2, kv_shape=None,
                   **overrides) -> "DrafterConfig":
        """Draft layers alternate sliding/global, each reading the last target layer of its type.

        kv_shape: layer -> (kv heads, head size) for targets whose layers differ (an ``HFModel``
        of Gemma 4); None: every layer has the config's."""
        last_global = max(i for i in range(target.num_layers) if target.is_global(i))
        last_local = max((i for i in range(target.num_layers) if not target.is_global(i)),
                         default=last_global)
        kinds = [(last_local, False), (last_global, True)] * num_layers
        chosen = kinds[:num_layers] if num_layers > 1 else [(last_global, True)]
        shapes = [kv_shape(layer) if kv_shape else (target.num_kv_heads, target.head_dim)
                  for layer, _ in chosen]
        if any(shape != (target.num_kv_heads, target.head_dim) for shape in shapes):
            overrides = {"layer_kv_heads": tuple(h for h, _ in shapes),
                         "layer_head_dims": tuple(d for _, d in shapes), **overrides}
        fields = dict(
            target_hidden=target.hidden_size, vocab_size=target.vocab_size,
            head_dim=target.head_dim, target_kv_heads=target.num_kv_heads,
            target_layers=tuple(layer for layer, _ in chosen),
            layer_is_global=tuple(is_global for _, is_global in chosen),
            sliding_window=target.sliding_window, rope_theta_local=target.rope_theta_local,
            rope_theta_global=target.rope_theta_global,
            rope_scaling_factor=target.rope_scaling_factor,
            # the draft queries rotate as the target's keys on global layers (Gemma 4: partly)
            rope_partial_global=target.rope_partial_global,
            query_scale=target.query_scale, rms_norm_eps=target.rms_norm_eps,
            target_name=target.name)
        return cls(**{**fields, **overrides})


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, offset: float = 1.0):
        super().__init__()
        # Gemma 3 convention: scale = 1 + weight (offset 1); Gemma 4 stores the scale (offset 0)
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.offset + self.weight, self.eps)


class DraftLayer(nn.Module):
    """Query-only attention over one target layer's K/V, then a GeGLU MLP; sandwich norms."""

    def __init__(self, cfg: DrafterConfig, index: int):
        super().__init__()
        self.cfg, self.index = cfg, index
        self.target_layer = cfg.target_layers[index]
        self.is_global = cfg.layer_is_global[index]
        self.head_dim, self.kv_heads = cfg.head_dim_of(index), cfg.kv_heads_of(index)
        self.scalar = cfg.layer_scalars[index] if cfg.layer_scalars else 1.0
        d, eps, off = cfg.d_draft, cfg.rms_norm_eps, cfg.norm_offset
        self.attn_norm, self.post_attn_norm = RMSNorm(d, eps, off), RMSNorm(d, eps, off)
        self.mlp_norm, self.post_mlp_norm = RMSNorm(d, eps, off), RMSNorm(d, eps, off)
        self.q_norm = RMSNorm(self.head_dim, eps, off)
        self.q_proj = nn.Linear(d, cfg.num_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * self.head_dim, d, bias=False)
        self.gate_up = nn.Linear(d, 2 * cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, d, bias=False)

    def forward(self, x: torch.Tensor, rope, keys: torch.Tensor, values: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        # x [B, T, d]; rope cos/sin [B, T, 1, Dh]; keys/values [B, kvh, S, Dh]; mask [B, T, S]
        cfg, dh = self.cfg, self.head_dim
        batch, steps, _ = x.shape
        q = self.q_proj(self.attn_norm(x)).view(batch, steps, cfg.num_heads, dh)
        q = apply_rotary(self.q_norm(q), *rope)
        # a query with no visible key (position 0) attends to nothing
        attn = attend(q, keys, values, mask, cfg.query_scale)  # [B, T, H*Dh]
        x = x + self.post_attn_norm(self.o_proj(attn))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        x = x + self.post_mlp_norm(self.down(F.gelu(gate, approximate="tanh") * up))
        return x * self.scalar if self.scalar != 1.0 else x


class MTPHead(nn.Module):
    """The recurrent drafter body; the LM head lives in ``DraftLMHead`` (it needs the target)."""

    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        self.cfg = cfg
        self.pre_projection = nn.Linear(2 * cfg.target_hidden, cfg.d_draft, bias=False)
        self.layers = nn.ModuleList(DraftLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.d_draft, cfg.rms_norm_eps, cfg.norm_offset)
        self.post_projection = nn.Linear(cfg.d_draft, cfg.target_hidden, bias=False)
        self.out_norm = RMSNorm(cfg.target_hidden, cfg.rms_norm_eps, cfg.norm_offset)
        if cfg.lm_head_source == "draft":  # the head's own LM head over the normed draft state
            self.embedding = nn.Parameter(torch.zeros(cfg.vocab_size, cfg.d_draft))
        # clustered LM head: a permutation of the vocabulary into equal clusters, and centroids
        self.register_buffer("token_ordering", torch.arange(cfg.vocab_size))
        self.centroids = nn.Parameter(torch.zeros(cfg.num_clusters, cfg.logit_dim))
        self.register_buffer("frequent_tokens", torch.arange(min(cfg.frequency_vocab,
                                                                   cfg.vocab_size)))
        self._rope: dict = {}

    def rope_tables(self, needed: int, is_global: bool, device: torch.device,
                    head_dim: int | None = None):
        """Whole cos/sin tables ``[len >= needed, Dh]`` for one attention type."""
        cfg = self.cfg
        head_dim = head_dim or cfg.head_dim
        key = (is_global, head_dim)
        cached = self._rope.get(key)
        if cached is None or cached[0].shape[0] < needed or cached[0].device != device:
            length = max(needed, 2048, 2 * (cached[0].shape[0] if cached else 0))
            theta = cfg.rope_theta_global if is_global else cfg.rope_theta_local
            factor = cfg.rope_scaling_factor if is_global else 1.0
            partial = cfg.rope_partial_global if is_global else 1.0
            if partial == 1.0:
                cos, sin = rotary_tables(RopeScaling("linear", factor).inv_freq(theta, head_dim),
                                         length)
            else:
                cos, sin = partial_rotary_tables(theta, head_dim, length, factor, partial)
            cached = (cos.to(device), sin.to(device))
            self._rope[key] = cached
        return cached

    def rope(self, positions: torch.Tensor, is_global: bool, head_dim: int | None = None):
        """cos/sin ``[B, T, 1, Dh]`` for query positions ``[B, T]``."""
        cos, sin = self.rope_tables(int(positions.max()) + 1, is_global, positions.device, head_dim)
        return cos[positions].unsqueeze(2), sin[positions].unsqueeze(2)

    def step(self, token_embeds: torch.Tensor, hidden: torch.Tensor, query_positions: torch.Tensor,
             context_end: torch.Tensor, kv: list[tuple[torch.Tensor, torch.Tensor]],
             key_start: int = 0) -> torch.Tensor:
        """One draft step; returns the head's output state h' [B, T, d_t] (see ``step_states``)."""
        return self.step_states(token_embeds, hidden, query_positions, context_end, kv,
                                key_start)[0]

    def step_states(self, token_embeds: torch.Tensor, hidden: torch.Tensor,
                    query_positions: torch.Tensor, context_end: torch.Tensor,
                    kv: list[tuple[torch.Tensor, torch.Tensor]], key_start: int = 0):
        """One draft step for queries ``[B, T]``.

        token_embeds [B, T, d_t] (already scaled by sqrt(d_t)); hidden [B, T, d_t];
        query_positions [B, T] (rotary positions); context_end [B, T]: each query sees key slots
        ``key_start <= s < context_end`` (within the window on sliding layers);
        kv: per draft layer (keys, values) ``[B, kvh, S, Dh]`` covering slots key_start.. .
        Returns (h' [B, T, d_t], the state the LM head scores: h', or with ``lm_head_source =
        "draft"`` the normed draft state [B, T, d_draft]).
        """
        x = self.pre_projection(torch.cat([token_embeds, hidden], dim=-1).to(
            self.pre_projection.weight.dtype))
        slots = torch.arange(key_start, key_start + kv[0][0].shape[2], device=x.device)  # [S]
        end = context_end.unsqueeze(-1)  # [B, T, 1]
        causal = slots < end
        windowed = causal & (slots > end - self.cfg.sliding_window)  # the target's window at p
        for layer, (keys, values) in zip(self.layers, kv):
            mask = causal if layer.is_global else windowed
            x = layer(x, self.rope(query_positions, layer.is_global, layer.head_dim), keys, values,
                      mask)
        normed = self.norm(x)
        state = self.post_projection(normed)
        if self.cfg.out_norm:
            state = self.out_norm(state)
        return state, (normed if self.cfg.lm_head_source == "draft" else state)

    def init_from_kmeans(self, ordering: torch.Tensor, centroids: torch.Tensor,
                         frequent: torch.Tensor | None = None) -> None:
        with torch.no_grad():
            self.token_ordering.copy_(ordering)
            self.centroids.copy_(centroids)
            if frequent is not None:
                self.frequent_tokens = frequent.clone()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def partial_rotary_tables(theta: float, head_dim: int, length: int, factor: float, partial: float):
    """cos/sin ``[length, head_dim]`` rotating only the first ``partial`` of the frequencies
    (Gemma 4's "proportional" rotary: the exponents keep the whole head size; the rest stay put)."""
    angles = int(partial * head_dim // 2)
    inv_freq = torch.zeros(head_dim // 2)
    inv_freq[:angles] = 1.0 / (theta ** (torch.arange(0, 2 * angles, 2, dtype=torch.float32)
                                         / head_dim))
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq / factor)  # [S, D/2]
    both = torch.cat([freqs, freqs], dim=-1)
    return both.cos(), both.sin()


def init_weights(head: MTPHead, seed: int = 0) -> None:
    """Small normal init for projections (norms start at scale 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in head.modules():
            if isinstance(module, nn.Linear):
                std = 1.0 / math.sqrt(module.in_features)
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)
