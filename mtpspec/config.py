"""Model configuration for native targets: one declarative description of a decoder architecture.

One frozen dataclass describes a pre-norm decoder-only transformer of the families the native engine
runs (Gemma 2/3/4 text, Llama, Mistral, Qwen2/2.5, Qwen3). The architecture fields below say how
the family differs; the defaults are Gemma 3's. It is filled from a GGUF file's metadata or from a
Hugging Face ``config.json`` (see ``loading``), and never holds weights.

Architecture fields (what a family changes):
- ``norm_offset``: RMSNorm scale is ``norm_offset + w`` (Gemma: 1.0; Llama/Qwen/Mistral: 0.0).
- ``sandwich_norms``: extra norms after the attention and MLP blocks (Gemma 2/3/4) besides the
  pre-norms every family has.
- ``qkv_bias`` (Qwen2), ``qk_norm`` (per-head RMSNorm of q and k: Gemma 3/4, Qwen3).
- ``mlp_activation``: ``"gelu_tanh"`` (GeGLU: Gemma) or ``"silu"`` (SwiGLU: Llama, Qwen, Mistral).
- ``attn_logit_softcap`` / ``final_logit_softcap``: ``cap * tanh(x / cap)`` on attention scores /
  output logits (Gemma 2); 0 = none.
- ``scale_embeddings``: the embedding is multiplied by sqrt(hidden_size) (Gemma).
- ``tie_word_embeddings``: the LM head is the embedding (else a separate ``lm_head`` weight).
- RoPE: ``rope_theta_global`` / ``rope_theta_local`` per layer type; ``rope_scaling`` (linear,
  llama3 or a table of divisors) applies to global layers, and to sliding layers too when
  ``rope_scaling_local`` (every family but Gemma 3).
- Attention layout: ``layer_types`` (explicit) or ``sliding_window_pattern`` (every n-th layer is
  global; 1 = every layer global); ``sliding_window`` for the sliding layers; the query scale is
  ``query_pre_attn_scalar ** -0.5``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

FAMILIES = ("gemma2", "gemma3", "llama", "mistral", "qwen2", "qwen3")
MLP_ACTIVATIONS = ("gelu_tanh", "silu")


@dataclass(frozen=True)
class RopeScaling:
    """Rotary frequency scaling of the global layers.

    ``kind``: ``"linear"`` (positions divided by ``factor``), ``"llama3"`` (Llama 3.1's
    wavelength-dependent rescaling of the inverse frequencies), or ``"table"`` (each inverse
    frequency divided by its entry of ``divisors``: how llama.cpp's GGUF stores Llama 3.1's).
    """

    kind: str = "linear"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    divisors: tuple[float, ...] = ()

    def inv_freq(self, theta: float, dim: int) -> list[float]:
        """Inverse frequencies of the ``dim // 2`` rotary pairs after scaling."""
        # float32 as transformers computes it, so tables match the reference bit for bit
        base = (1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))).tolist()
        if self.kind == "linear":
            return [f / self.factor for f in base]
        if self.kind == "table":
            if len(self.divisors) != len(base):
                raise ValueError(f"rope table has {len(self.divisors)} entries for {len(base)} pairs")
            return [f / d for f, d in zip(base, self.divisors)]
        if self.kind != "llama3":
            raise ValueError(f"unknown rope scaling kind {self.kind!r}")
        low_wavelen = self.original_max_position_embeddings / self.low_freq_factor
        high_wavelen = self.original_max_position_embeddings / self.high_freq_factor
        out = []
        for f in base:
            wavelen = 2 * math.pi / f
            if wavelen < high_wavelen:
                out.append(f)
            elif wavelen > low_wavelen:
                out.append(f / self.factor)
            else:
                smooth = ((self.original_max_position_embeddings / wavelen - self.low_freq_factor)
                          / (self.high_freq_factor - self.low_freq_factor))
                out.append((1 - smooth) * f / self.factor + smooth * f)
        return out


@dataclass(frozen=True)
class ModelConfig:
    """Shape, hyper-parameters and architecture of a decoder (defaults: Gemma 3 270M)."""

    vocab_size: int = 262_144
    hidden_size: int = 640
    intermediate_size: int = 2048
    num_layers: int = 18
    num_heads: int = 4
    num_kv_heads: int = 1
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    rope_theta_global: float = 1_000_000.0
    rope_theta_local: float = 10_000.0
    rope_scaling_factor: float = 1.0  # linear scaling of global-layer positions (1.0: none)
    sliding_window: int = 512
    sliding_window_pattern: int = 6  # every n-th layer (1-based) is global
    query_pre_attn_scalar: float = 256.0
    max_position_embeddings: int = 32_768
    bos_token_id: int = 2
    eos_token_ids: tuple[int, ...] = (1, 106)
    pad_token_id: int = 0
    name: str = "gemma3"
    # explicit per-layer types override the pattern when given ("sliding" or "global")
    layer_types: tuple[str, ...] = field(default=())
    # architecture (see the module docstring); the defaults are Gemma 3's
    family: str = "gemma3"
    norm_offset: float = 1.0
    sandwich_norms: bool = True
    qkv_bias: bool = False
    qk_norm: bool = True
    mlp_activation: str = "gelu_tanh"
    attn_logit_softcap: float = 0.0
    final_logit_softcap: float = 0.0
    scale_embeddings: bool = True
    tie_word_embeddings: bool = True
    rope_scaling: RopeScaling | None = None  # None: rope_scaling_factor as linear scaling
    rope_scaling_local: bool = False  # the scaling applies to sliding layers too (not Gemma 3)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown family {self.family!r} (known: {', '.join(FAMILIES)})")
        if self.mlp_activation not in MLP_ACTIVATIONS:
            raise ValueError(f"unknown mlp_activation {self.mlp_activation!r}")
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise ValueError("layer_types must name every layer")

    @property
    def global_rope_scaling(self) -> RopeScaling:
        """The scaling of global layers' rotary frequencies (``rope_scaling`` or the linear factor)."""
        return self.rope_scaling or RopeScaling("linear", self.rope_scaling_factor)

    def rope_inv_freq(self, is_global: bool) -> list[float]:
        """Inverse rotary frequencies ``[head_dim / 2]`` of a global or sliding layer."""
        theta = self.rope_theta_global if is_global else self.rope_theta_local
        if is_global or self.rope_scaling_local:
            return self.global_rope_scaling.inv_freq(theta, self.head_dim)
        return RopeScaling("linear", 1.0).inv_freq(theta, self.head_dim)

    def is_global(self, layer: int) -> bool:
        """Whether layer ``layer`` (0-based) uses full (global) attention."""
        if self.layer_types:
            return self.layer_types[layer] == "global"
        return (layer + 1) % self.sliding_window_pattern == 0

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def tiny_config(**overrides) -> ModelConfig:
    """A few-layer random-model configuration for fast unit tests."""
    base = dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
        num_kv_heads=2, head_dim=16, sliding_window=8, sliding_window_pattern=2,
        query_pre_attn_scalar=16.0, max_position_embeddings=512, eos_token_ids=(1,),
        name="tiny-gemma3",
    )
    base.update(overrides)
    return ModelConfig(**base)
