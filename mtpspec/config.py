"""Model configuration for native targets.

One frozen dataclass describes a Gemma 3 style decoder. It is filled from a GGUF file's metadata
or from a Hugging Face ``config.json`` (see ``loading``), and never holds weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelConfig:
    """Shape and hyper-parameters of a Gemma 3 text decoder."""

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
