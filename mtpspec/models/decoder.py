"""One native decoder for every family ``config.ModelConfig`` describes (Llama, Mistral, Qwen2/2.5,
Qwen3, Gemma 2, Gemma 3), written for small-batch CPU decoding.

``forward(token_ids, positions, cache)`` runs any number of new tokens per sequence (prefill,
one-token decode, the k+1-token verification pass) and returns logits and the final hidden states.
A layer is: RMSNorm (scale ``norm_offset + w``) -> q/k/v product (+ bias: Qwen2) -> per-head q/k
RMSNorm (Gemma 3, Qwen3) -> rotary (rotate-half; the tables of the layer's type: global or sliding,
with the configured scaling) -> K/V into the shared ``KVCache`` -> grouped-query attention over the
visible slots (causal, the sliding window on sliding layers, scores soft-capped for Gemma 2) ->
o_proj -> (post-attention norm: Gemma) + residual -> RMSNorm -> gate/up -> act(gate) * up ->
down -> (post-MLP norm: Gemma) + residual. Then the final norm and the LM head (tied to the
embedding or its own), with Gemma 2's final soft-cap. Nothing here is written per family: the
config's architecture fields choose every difference.

Weights are ``PackedLinear`` layers (fp32, bf16, int8 or int4 storage, float32 compute; ``dense``
keeps plain float layers for training); q/k/v and gate/up are fused into one product each. The
layer attributes (``qkv``, ``qkv_bias``, ``attn_norm_scale``, ``post_attn_norm_scale``,
``mlp_norm_scale``, ``post_mlp_norm_scale``, ``q_norm_scale``, ``k_norm_scale``, ``is_global``) are
the contract the fused C++ stack reads; absent pieces are None.

Must not: know about drafting, or change sequence lengths (it writes the cache slots of the
positions it is given; the engine owns lengths).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mtpspec.config import ModelConfig
from mtpspec.kv_cache import CacheFullError, KVCache
from mtpspec.models.attention import apply_rotary, attend, rms_norm, rotary_tables, softcap
from mtpspec.models.dense import DenseLinear
from mtpspec.ops import PackedLinear


def make_linear(weight: torch.Tensor, fmt: str):
    """A packed CPU layer for the inference formats, a plain float layer for ``dense``."""
    return DenseLinear(weight) if fmt == "dense" else PackedLinear.from_weight(weight, fmt)


class LinearSource:
    """Where a model's linear layers come from: packed now from float weights, or taken as they
    were stored (``models.store``: packed tensors read back from a cache file, no repacking)."""

    def __init__(self, fmt: str, prebuilt: dict[str, nn.Module] | None = None):
        self.fmt = fmt
        self.prebuilt = prebuilt or {}

    def get(self, name: str, weight) -> nn.Module:
        """The layer called ``name``; ``weight()`` gives its float weight [out, in] if it must be built."""
        if name in self.prebuilt:
            return self.prebuilt[name]
        return make_linear(weight(), self.fmt)


def layer_norm_names(config: ModelConfig) -> dict[str, str]:
    """Our norm slot -> the Hugging Face weight name of that norm in one layer."""
    if config.sandwich_norms:
        return {"attn_norm": "input_layernorm", "post_attn_norm": "post_attention_layernorm",
                "mlp_norm": "pre_feedforward_layernorm",
                "post_mlp_norm": "post_feedforward_layernorm"}
    return {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}


class DecoderLayer(nn.Module):
    """One decoder block: attention and MLP with pre-norms (and Gemma's post-norms)."""

    def __init__(self, config: ModelConfig, index: int, weights: dict[str, torch.Tensor],
                 linears: LinearSource):
        super().__init__()
        prefix = f"model.layers.{index}."
        get = lambda name: weights[prefix + name]  # noqa: E731
        mine = f"layers.{index}."
        self.config = config
        self.index = index
        self.is_global = config.is_global(index)
        self.qkv = linears.get(mine + "qkv", lambda: torch.cat(
            [get(f"self_attn.{p}_proj.weight") for p in "qkv"]))
        self.o_proj = linears.get(mine + "o_proj", lambda: get("self_attn.o_proj.weight"))
        self.gate_up = linears.get(mine + "gate_up", lambda: torch.cat(
            [get("mlp.gate_proj.weight"), get("mlp.up_proj.weight")]))
        self.down = linears.get(mine + "down", lambda: get("mlp.down_proj.weight"))
        bias = (torch.cat([get(f"self_attn.{p}_proj.bias") for p in "qkv"]).float()
                if config.qkv_bias else None)  # [q + 2kv]
        self.register_buffer("qkv_bias", bias, persistent=False)
        names = layer_norm_names(config)
        if config.qk_norm:
            names.update(q_norm="self_attn.q_norm", k_norm="self_attn.k_norm")
        for slot in ("attn_norm", "post_attn_norm", "mlp_norm", "post_mlp_norm", "q_norm", "k_norm"):
            scale = (config.norm_offset + get(names[slot] + ".weight").float()) if slot in names else None
            self.register_buffer(slot + "_scale", scale, persistent=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                positions: torch.Tensor, mask: torch.Tensor, key_start: int,
                cache: KVCache) -> torch.Tensor:
        # x [B, T, d]; rope cos/sin [B, T, 1, Dh]; mask [B, 1, T, S] bool over key slots key_start..
        cfg = self.config
        batch, steps, _ = x.shape
        eps = cfg.rms_norm_eps
        qkv = self.qkv(rms_norm(x, self.attn_norm_scale, eps))  # [B, T, q + 2kv]
        if self.qkv_bias is not None:
            qkv = qkv + self.qkv_bias
        q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = q.reshape(batch, steps, cfg.num_heads, cfg.head_dim)
        k = k.reshape(batch, steps, cfg.num_kv_heads, cfg.head_dim)
        if self.q_norm_scale is not None:
            q = rms_norm(q, self.q_norm_scale, eps)
            k = rms_norm(k, self.k_norm_scale, eps)
        q = apply_rotary(q, *rope)
        k = apply_rotary(k, *rope)
        v = v.reshape(batch, steps, cfg.num_kv_heads, cfg.head_dim)
        cache.write(self.index, positions, k.transpose(1, 2), v.transpose(1, 2))
        key_end = mask.shape[-1] + key_start
        keys = cache.k[self.index, :batch, :, key_start:key_end]    # [B, kvh, S, Dh]
        values = cache.v[self.index, :batch, :, key_start:key_end]  # [B, kvh, S, Dh]
        attn = attend(q, keys, values, mask, cfg.query_pre_attn_scalar ** -0.5,
                      cfg.attn_logit_softcap)  # [B, T, H*Dh]
        h = self.o_proj(attn)
        if self.post_attn_norm_scale is not None:
            h = rms_norm(h, self.post_attn_norm_scale, eps)
        x = x + h
        gate, up = self.gate_up(rms_norm(x, self.mlp_norm_scale, eps)).chunk(2, dim=-1)
        act = F.gelu(gate, approximate="tanh") if cfg.mlp_activation == "gelu_tanh" else F.silu(gate)
        h = self.down(act * up)
        if self.post_mlp_norm_scale is not None:
            h = rms_norm(h, self.post_mlp_norm_scale, eps)
        return x + h


class DecoderModel(nn.Module):
    """A decoder of any configured family; see the module docstring.

    ``embed`` is the input embedding; ``output`` the LM head's weight (``embed`` itself when tied).
    """

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], fmt: str = "fp32",
                 prebuilt: dict[str, nn.Module] | None = None):
        """weights: Hugging Face names -> float tensors (``loading``); prebuilt: linear layers
        already packed, by module name (``models.store``), whose float weights may be absent."""
        super().__init__()
        self.config = config
        self.weight_format = fmt
        linears = LinearSource(fmt, prebuilt)
        self.embed = linears.get("embed", lambda: weights["model.embed_tokens.weight"])
        self.output = (self.embed if config.tie_word_embeddings
                       else linears.get("output", lambda: weights["lm_head.weight"]))
        self.layers = nn.ModuleList(DecoderLayer(config, i, weights, linears)
                                    for i in range(config.num_layers))
        self.register_buffer("norm_scale", config.norm_offset + weights["model.norm.weight"].float(),
                             persistent=False)
        # Hugging Face rounds Gemma's scale to the activation dtype; float32 here
        self.embed_scale = (float(torch.tensor(math.sqrt(config.hidden_size), dtype=torch.float32))
                            if config.scale_embeddings else 1.0)
        self._rope_len = 0
        self._rope: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def tied(self) -> bool:
        return self.output is self.embed

    def new_cache(self, batch_size: int = 1, max_len: int = 4096) -> KVCache:
        return KVCache(self.config, batch_size, min(max_len, self.config.max_position_embeddings),
                       device=self.norm_scale.device)

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Scaled embeddings ``[*, d]`` of ``token_ids`` ``[*]``."""
        rows = self.embed.rows(token_ids.reshape(-1))
        return (rows * self.embed_scale).view(*token_ids.shape, -1)

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``[*, V]`` of final-normed hidden states ``[*, d]``."""
        return softcap(self.output(hidden), self.config.final_logit_softcap)

    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """``lm_head(hidden).argmax(-1)`` ``[*]`` for hidden ``[*, d]``."""
        return self.lm_head(hidden).argmax(dim=-1)

    def enable_argmax_screen(self, ordering: torch.Tensor | None = None) -> None:
        """No argmax screen on this path yet: greedy tokens come from the full head."""
        return None

    @property
    def screen_nbytes(self) -> int:
        return 0

    def rope_tables(self, needed: int, device: torch.device):
        """{is_global: (cos, sin) [len, Dh]} covering positions < ``needed``."""
        if needed > self._rope_len or self._rope[True][0].device != device:
            length = max(needed, 2 * self._rope_len, 1024)
            self._rope = {kind: rotary_tables(self.config.rope_inv_freq(kind), length)
                          for kind in (True, False)}
            self._rope = {kind: (cos.to(device), sin.to(device))
                          for kind, (cos, sin) in self._rope.items()}
            self._rope_len = length
        return self._rope

    @torch.inference_mode()
    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                num_logits: int | None = 1) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Run new tokens through the model, writing their K/V into ``cache``.

        token_ids, positions: [B, T] (positions of sequence b must be consecutive and follow what
        its cache already holds). num_logits: logits for the last n positions (None: all, 0: none).
        Returns (logits [B, n, V] float32 or None, hidden [B, T, d] after the final norm).
        """
        return self.forward_hidden(token_ids, positions, cache, num_logits)

    def forward_hidden(self, token_ids, positions, cache, num_logits=1):
        """``forward`` without inference mode, for callers that manage autograd themselves."""
        last = int(positions.max()) + 1
        if last > cache.max_len:
            cache.check_room(last)
        if int(positions.min()) < 0:
            raise CacheFullError("positions must be non-negative")
        hidden = self.hidden_states(token_ids, positions, cache, self.rope_tables(last, positions.device))
        if num_logits == 0:
            return None, hidden
        tail = hidden if num_logits is None else hidden[:, -num_logits:]
        return self.lm_head(tail), hidden

    def hidden_states(self, token_ids, positions, cache, tables) -> torch.Tensor:
        """The Python reference stack: hidden ``[B, T, d]`` after the final norm."""
        x = self.embed_tokens(token_ids)  # [B, T, d]
        rope = {kind: (cos[positions].unsqueeze(2), sin[positions].unsqueeze(2))
                for kind, (cos, sin) in tables.items()}
        last = int(positions.max()) + 1
        masks = {kind: self._mask(positions, last, kind) for kind in (True, False)}
        for layer in self.layers:
            mask, start = masks[layer.is_global]
            x = layer(x, rope[layer.is_global], positions, mask, start, cache)
        return rms_norm(x, self.norm_scale, self.config.rms_norm_eps)  # [B, T, d]

    def _mask(self, positions: torch.Tensor, end: int, is_global: bool):
        """Visible key slots for each query: causal, and within the window on sliding layers."""
        window = self.config.sliding_window
        start = 0 if is_global else max(0, int(positions.min()) - window + 1)
        slots = torch.arange(start, end, device=positions.device)  # [S]
        query = positions.unsqueeze(-1)  # [B, T, 1]
        visible = slots <= query
        if not is_global:
            visible &= slots > query - window
        return visible.unsqueeze(1), start  # [B, 1, T, S]


def random_weights(config: ModelConfig, seed: int = 0, scale: float = 0.5) -> dict[str, torch.Tensor]:
    """Random weights under Hugging Face names for ``config``'s family, for tests on tiny models."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen) * scale  # noqa: E731
    d, q, kv, inter = config.hidden_size, config.q_size, config.kv_size, config.intermediate_size
    norm = lambda n: rand(n) * 0.1 + (1.0 - config.norm_offset)  # noqa: E731  scale near 1
    weights = {"model.embed_tokens.weight": rand(config.vocab_size, d) / math.sqrt(d),
               "model.norm.weight": norm(d)}
    if not config.tie_word_embeddings:
        weights["lm_head.weight"] = rand(config.vocab_size, d) / math.sqrt(d)
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes = {
            "self_attn.q_proj.weight": (q, d), "self_attn.k_proj.weight": (kv, d),
            "self_attn.v_proj.weight": (kv, d), "self_attn.o_proj.weight": (d, q),
            "mlp.gate_proj.weight": (inter, d), "mlp.up_proj.weight": (inter, d),
            "mlp.down_proj.weight": (d, inter),
        }
        for name, shape in shapes.items():
            weights[p + name] = rand(*shape) / math.sqrt(shape[1])
        if config.qkv_bias:
            for proj, size in (("q", q), ("k", kv), ("v", kv)):
                weights[p + f"self_attn.{proj}_proj.bias"] = rand(size) * 0.2
        for name in layer_norm_names(config).values():
            weights[p + name + ".weight"] = norm(d)
        if config.qk_norm:
            weights[p + "self_attn.q_norm.weight"] = norm(config.head_dim)
            weights[p + "self_attn.k_norm.weight"] = norm(config.head_dim)
    return weights


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight a ``DecoderModel`` of ``config`` reads, with its shape (Hugging Face names)."""
    d, q, kv, inter = config.hidden_size, config.q_size, config.kv_size, config.intermediate_size
    shapes = {"model.embed_tokens.weight": (config.vocab_size, d), "model.norm.weight": (d,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, d)
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
            p + "mlp.gate_proj.weight": (inter, d), p + "mlp.up_proj.weight": (inter, d),
            p + "mlp.down_proj.weight": (d, inter),
        })
        if config.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
        for name in layer_norm_names(config).values():
            shapes[p + name + ".weight"] = (d,)
        if config.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (config.head_dim,)
            shapes[p + "self_attn.k_norm.weight"] = (config.head_dim,)
    return shapes


def linear_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of every linear module of a ``DecoderModel`` of ``config``, by module name."""
    d, q, kv, inter = config.hidden_size, config.q_size, config.kv_size, config.intermediate_size
    shapes = {"embed": (config.vocab_size, d)}
    if not config.tie_word_embeddings:
        shapes["output"] = (config.vocab_size, d)
    for i in range(config.num_layers):
        shapes.update({f"layers.{i}.qkv": (q + 2 * kv, d), f"layers.{i}.o_proj": (d, q),
                       f"layers.{i}.gate_up": (2 * inter, d), f"layers.{i}.down": (d, inter)})
    return shapes
