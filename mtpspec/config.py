"""Model configuration for native targets: one declarative description of a decoder architecture.

One frozen dataclass describes a pre-norm decoder-only transformer of the families the native engine
runs (Gemma 2/3/4 text, Llama, Mistral, Qwen2/2.5, Qwen3). The architecture fields below say how
the family differs; the defaults are Gemma 3's, and every Gemma 4 field defaults to "off". It is filled from a GGUF file's metadata or from a
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
  ``query_pre_attn_scalar ** -0.5`` unless ``attention_scale`` is given (Gemma 4: 1.0, the q/k
  norms do the scaling).

Gemma 4 text fields (all off by default):
- ``global_head_dim`` / ``global_num_kv_heads``: K/V shape of the global layers when it differs
  from the sliding layers' (0 = the same); ``attention_k_eq_v``: global layers have no value
  projection, the values are the raw keys; ``value_norm``: RMSNorm (no scale) of the values.
- ``rope_partial_global``: the fraction of a global layer's rotary pairs that rotate (transformers'
  "proportional" rope: frequencies over the full head size, the rest left unrotated).
- ``num_kv_shared_layers``: the last N layers compute no K/V; each attends to the K/V of the last
  earlier layer of its type (``kv_source``); ``double_wide_mlp``: those layers' MLPs are 2x wide.
- ``per_layer_input_size`` (PLE): a second embedding ``[per_layer_vocab_size, L * P]`` plus a
  projection of the main embedding give each layer a P-wide input, gated into its residual.
- ``layer_scalar``: each layer's output is multiplied by a stored scalar.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

FAMILIES = ("gemma2", "gemma3", "gemma4", "llama", "mistral", "qwen2", "qwen3")
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

    def inv_freq(self, theta: float, dim: int, partial: float = 1.0) -> list[float]:
        """Inverse frequencies of the ``dim // 2`` rotary pairs after scaling; with ``partial`` < 1
        only the first ``int(partial * dim // 2)`` pairs rotate (the others get frequency 0)."""
        rotating = int(partial * dim // 2)
        # float32 as transformers computes it, so tables match the reference bit for bit
        exponents = torch.arange(0, 2 * rotating, 2, dtype=torch.int64).float() / dim
        base = (1.0 / (theta ** exponents)).tolist() + [0.0] * (dim // 2 - rotating)
        if self.kind == "linear":
            return [f / self.factor for f in base]
        if self.kind == "table":
            if len(self.divisors) != len(base):
                raise ValueError(f"rope table has {len(self.divisors)} entries for {len(base)} pairs")
            return [f / d for f, d in zip(base, self.divisors)]
        if partial != 1.0:
            raise ValueError(f"partial rotary with {self.kind!r} scaling is not supported")
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
    # Gemma 4 text (see the module docstring); the defaults leave every other family unchanged
    attention_scale: float | None = None  # None: query_pre_attn_scalar ** -0.5
    global_head_dim: int = 0  # 0: head_dim
    global_num_kv_heads: int = 0  # 0: num_kv_heads
    attention_k_eq_v: bool = False
    value_norm: bool = False
    rope_partial_global: float = 1.0
    num_kv_shared_layers: int = 0
    double_wide_mlp: bool = False
    per_layer_input_size: int = 0
    per_layer_vocab_size: int = 0
    layer_scalar: bool = False

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown family {self.family!r} (known: {', '.join(FAMILIES)})")
        if self.mlp_activation not in MLP_ACTIVATIONS:
            raise ValueError(f"unknown mlp_activation {self.mlp_activation!r}")
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise ValueError("layer_types must name every layer")
        if not 0 <= self.num_kv_shared_layers < self.num_layers:
            raise ValueError(f"num_kv_shared_layers must be in 0..{self.num_layers - 1}")
        for layer in range(self.num_layers - self.num_kv_shared_layers, self.num_layers):
            self.kv_source(layer)  # every shared layer has a producer of its type

    @property
    def global_rope_scaling(self) -> RopeScaling:
        """The scaling of global layers' rotary frequencies (``rope_scaling`` or the linear factor)."""
        return self.rope_scaling or RopeScaling("linear", self.rope_scaling_factor)

    def rope_inv_freq(self, is_global: bool) -> list[float]:
        """Inverse rotary frequencies ``[head size / 2]`` of a global or sliding layer."""
        theta = self.rope_theta_global if is_global else self.rope_theta_local
        dim = (self.global_head_dim or self.head_dim) if is_global else self.head_dim
        if is_global:
            return self.global_rope_scaling.inv_freq(theta, dim, self.rope_partial_global)
        if self.rope_scaling_local:
            return self.global_rope_scaling.inv_freq(theta, dim)
        return RopeScaling("linear", 1.0).inv_freq(theta, dim)

    @property
    def query_scale(self) -> float:
        """The factor on attention scores before the softmax."""
        if self.attention_scale is not None:
            return self.attention_scale
        return self.query_pre_attn_scalar ** -0.5

    def layer_head_dim(self, layer: int) -> int:
        """Head size of layer ``layer`` (queries, keys and values)."""
        return (self.global_head_dim or self.head_dim) if self.is_global(layer) else self.head_dim

    def layer_kv_heads(self, layer: int) -> int:
        """K/V heads of layer ``layer``."""
        return ((self.global_num_kv_heads or self.num_kv_heads) if self.is_global(layer)
                else self.num_kv_heads)

    def layer_k_eq_v(self, layer: int) -> bool:
        """Whether layer ``layer``'s values are its keys' projection (no value weights)."""
        return self.attention_k_eq_v and self.is_global(layer)

    def kv_source(self, layer: int) -> int:
        """The layer whose K/V ``layer`` attends to: itself, or for the last
        ``num_kv_shared_layers`` layers the last earlier non-shared layer of the same type."""
        first_shared = self.num_layers - self.num_kv_shared_layers
        if layer < first_shared:
            return layer
        same = [i for i in range(first_shared) if self.is_global(i) == self.is_global(layer)]
        if not same:
            raise ValueError(f"KV-shared layer {layer} has no earlier layer of its type")
        return same[-1]

    def layer_intermediate(self, layer: int) -> int:
        """MLP width of layer ``layer`` (KV-shared layers are double-wide with ``double_wide_mlp``)."""
        wide = self.double_wide_mlp and self.kv_source(layer) != layer
        return self.intermediate_size * (2 if wide else 1)

    @property
    def uniform_layers(self) -> bool:
        """Whether every layer has one K/V shape, its own K/V and none of the Gemma 4 extras: what
        a fused stack (one layer body, one stacked cache) can run. False: the Python reference."""
        return (not self.global_head_dim or self.global_head_dim == self.head_dim) and (
            not self.global_num_kv_heads or self.global_num_kv_heads == self.num_kv_heads) and not (
            self.attention_k_eq_v or self.value_norm or self.num_kv_shared_layers
            or self.double_wide_mlp or self.per_layer_input_size or self.layer_scalar
            or self.rope_partial_global != 1.0 or self.attention_scale is not None)

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
