"""A native Gemma 3 text decoder, written for small-batch CPU decoding.

``forward(token_ids, positions, cache)`` runs any number of new tokens per sequence (prefill,
one-token decode, the k+1-token verification pass) and returns logits and the final hidden states.
What it implements: embedding scaled by sqrt(d), RMSNorm with a ``1 + w`` scale computed in float32,
QK-norm, rotary embeddings with separate bases for sliding-window (local) and global layers,
grouped-query attention over the shared ``KVCache``, GeGLU MLP (tanh GELU), sandwich norms around
both blocks, and the LM head tied to the embedding. The architecture switches of ``ModelConfig``
(norm offset, sandwich norms, QKV bias, q/k norm, SiLU MLP, attention and final logit soft-caps,
unscaled embeddings, an untied head) are honoured too, so that tiny configurations of the other
families test the one fused layer body against this reference (tests/test_families.py).

Weights are held as ``PackedLinear`` layers (fp32, bf16, int8 or int4 storage, float32 compute);
q/k/v and gate/up are fused into one product each, because at M <= 9 rows every product costs a
read of its weight plus a fixed dispatch overhead. This module knows nothing about drafting; it
writes the cache slots of the positions it is given and never changes sequence lengths.

Inference on the CPU (packed formats, no autograd) runs the whole stack in one C++ call
(``mtpspec.fused``); the Python layers below are the reference, and what ``dense`` weights,
training and other devices use. ``use_fused = False`` forces the Python path.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from mtpspec import fused
from mtpspec.config import ModelConfig
from mtpspec.kv_cache import CacheFullError, KVCache
from mtpspec.models.dense import DenseLinear
from mtpspec.ops import FORMATS, PackedLinear
from mtpspec.screen import ArgmaxScreen


def make_linear(weight: torch.Tensor, fmt: str):
    """A packed CPU layer for the inference formats, a plain float layer for ``dense``."""
    return DenseLinear(weight) if fmt == "dense" else PackedLinear.from_weight(weight, fmt)


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma RMSNorm: ``x / rms(x) * scale`` with ``scale = 1 + w`` precomputed, in float32."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * scale


def rotary_tables(theta: float, head_dim: int, length: int, factor: float = 1.0):
    """cos/sin tables ``[length, head_dim]`` for the rotate-half (NeoX) rotary layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    positions = torch.arange(length, dtype=torch.float32) / factor
    freqs = torch.outer(positions, inv_freq)  # [S, D/2]
    angles = torch.cat([freqs, freqs], dim=-1)  # [S, D]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, T, H, D]`` by per-position tables ``cos``/``sin`` ``[B, T, 1, D]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Gemma3Layer(nn.Module):
    """One decoder block: attention and MLP, each with a pre-norm and (Gemma) a post-norm.

    Holds what the fused stack reads (``mtpspec.fused``'s contract): ``qkv``, ``o_proj``,
    ``gate_up`` (cat[gate, up]), ``down``; ``qkv_bias`` [q + 2kv] or None; norm scales with the
    offset applied: ``attn_norm_scale``, ``mlp_norm_scale`` [d], ``post_attn_norm_scale``,
    ``post_mlp_norm_scale`` [d] or None, ``q_norm_scale``, ``k_norm_scale`` [head_dim] or None;
    ``is_global``. Weight names are Hugging Face's: without sandwich norms (Llama, Qwen) the
    ``post_attention_layernorm`` is the pre-MLP norm."""

    def __init__(self, config: ModelConfig, index: int, weights: dict[str, torch.Tensor], fmt: str):
        super().__init__()
        prefix = f"model.layers.{index}."
        get = lambda name: weights[prefix + name]  # noqa: E731
        scale = lambda name: config.norm_offset + get(name + ".weight").float()  # noqa: E731
        self.config = config
        self.index = index
        self.is_global = config.is_global(index)
        names = ("q_proj", "k_proj", "v_proj")
        qkv = torch.cat([get(f"self_attn.{n}.weight") for n in names])
        self.qkv = make_linear(qkv, fmt)
        self.o_proj = make_linear(get("self_attn.o_proj.weight"), fmt)
        gate_up = torch.cat([get("mlp.gate_proj.weight"), get("mlp.up_proj.weight")])
        self.gate_up = make_linear(gate_up, fmt)
        self.down = make_linear(get("mlp.down_proj.weight"), fmt)
        bias = (torch.cat([get(f"self_attn.{n}.bias").float() for n in names])
                if config.qkv_bias else None)  # [q + 2kv]
        if config.sandwich_norms:
            post_attn, mlp = scale("post_attention_layernorm"), scale("pre_feedforward_layernorm")
            post_mlp = scale("post_feedforward_layernorm")
        else:
            post_attn, mlp, post_mlp = None, scale("post_attention_layernorm"), None
        qk = (scale("self_attn.q_norm"), scale("self_attn.k_norm")) if config.qk_norm else (None, None)
        # buffers (None where the family has no such piece), so that .to(device) moves them
        for name, value in (("qkv_bias", bias), ("attn_norm_scale", scale("input_layernorm")),
                            ("mlp_norm_scale", mlp), ("post_attn_norm_scale", post_attn),
                            ("post_mlp_norm_scale", post_mlp), ("q_norm_scale", qk[0]),
                            ("k_norm_scale", qk[1])):
            self.register_buffer(name, value, persistent=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                positions: torch.Tensor, mask: torch.Tensor, key_start: int,
                cache: KVCache) -> torch.Tensor:
        # x [B, T, d]; rope cos/sin [B, T, 1, Dh]; mask [B, 1, T, S] bool over key slots key_start..
        cfg = self.config
        batch, steps, _ = x.shape
        eps = cfg.rms_norm_eps
        h = rms_norm(x, self.attn_norm_scale, eps)
        qkv = self.qkv(h)  # [B, T, q + 2kv]
        if self.qkv_bias is not None:
            qkv = qkv + self.qkv_bias
        q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = q.reshape(batch, steps, cfg.num_heads, cfg.head_dim)
        k = k.reshape(batch, steps, cfg.num_kv_heads, cfg.head_dim)
        if self.q_norm_scale is not None:
            q = rms_norm(q, self.q_norm_scale, eps)
        if self.k_norm_scale is not None:
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
        x = x + _post_norm(self.o_proj(attn), self.post_attn_norm_scale, eps)
        h = rms_norm(x, self.mlp_norm_scale, eps)
        gate, up = self.gate_up(h).chunk(2, dim=-1)
        if cfg.mlp_activation == "silu":
            act = F.silu(gate)
        else:
            act = F.gelu(gate, approximate="tanh")
        h = self.down(act * up)
        return x + _post_norm(h, self.post_mlp_norm_scale, eps)


def _post_norm(h: torch.Tensor, scale: torch.Tensor | None, eps: float) -> torch.Tensor:
    """A sandwich norm where the family has one, else the identity."""
    return h if scale is None else rms_norm(h, scale, eps)


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
           scale: float, softcap: float = 0.0) -> torch.Tensor:
    """Grouped-query attention without expanding K/V.

    q [B, T, H, Dh]; keys/values [B, kvh, S, Dh]; mask [B, 1, T, S] (True = visible);
    softcap > 0: scores -> softcap * tanh(scores / softcap) (Gemma 2). Returns [B, T, H*Dh].
    """
    batch, steps, heads, head_dim = q.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    # heads h = g_kv * group + j share kv head g_kv: fold the group into the query axis
    qg = q.permute(0, 2, 1, 3).reshape(batch, kv_heads, group * steps, head_dim)
    scores = torch.matmul(qg, keys.transpose(-1, -2)) * scale  # [B, kvh, group*T, S]
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.view(batch, kv_heads, group, steps, -1)
    scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
    probs = torch.softmax(scores, dim=-1).view(batch, kv_heads, group * steps, -1)
    out = torch.matmul(probs, values)  # [B, kvh, group*T, Dh]
    out = out.view(batch, heads, steps, head_dim).transpose(1, 2)
    return out.reshape(batch, steps, heads * head_dim)


class Gemma3Model(nn.Module):
    """Gemma 3 text decoder with a tied LM head; see the module docstring."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], fmt: str = "fp32"):
        super().__init__()
        self.config = config
        self.weight_format = fmt
        self.embed = make_linear(weights["model.embed_tokens.weight"], fmt)
        self.layers = nn.ModuleList(Gemma3Layer(config, i, weights, fmt)
                                    for i in range(config.num_layers))
        self.register_buffer("norm_scale", config.norm_offset + weights["model.norm.weight"].float(),
                             persistent=False)  # [d]
        # Hugging Face rounds the scale to the activation dtype; float32 here
        self.embed_scale = (float(torch.tensor(math.sqrt(config.hidden_size), dtype=torch.float32))
                            if config.scale_embeddings else 1.0)
        # the LM head when it is not the embedding (untied families)
        self.untied_head = (None if config.tie_word_embeddings
                            else make_linear(weights["lm_head.weight"], fmt))  # [V, d]
        self._rope_len = 0
        self._rope: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}
        self.use_fused = True  # CPU inference through mtpspec.fused when it applies
        self._fused: fused.FusedGemma3 | None | bool = None  # built on first use; False: failed
        self._screen: ArgmaxScreen | None = None  # exact argmax without every logit (int8 head)

    def __getstate__(self):
        state = super().__getstate__().copy()
        state["_fused"] = None  # a C++ object: rebuilt after loading
        return state

    def new_cache(self, batch_size: int = 1, max_len: int = 4096) -> KVCache:
        return KVCache(self.config, batch_size, min(max_len, self.config.max_position_embeddings),
                       device=self.norm_scale.device)

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Scaled embeddings ``[*, d]`` of ``token_ids`` ``[*]``."""
        rows = self.embed.rows(token_ids.reshape(-1))
        return (rows * self.embed_scale).view(*token_ids.shape, -1)

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``[*, V]`` of final-normed hidden states ``[*, d]`` (the tied head unless the
        family unties it; soft-capped where the family caps them)."""
        logits = (self.embed if self.untied_head is None else self.untied_head)(hidden)
        cap = self.config.final_logit_softcap
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    def enable_argmax_screen(self, ordering: torch.Tensor | None = None) -> ArgmaxScreen | None:
        """Build the argmax screen (``mtpspec.screen``: +V*d bytes) when the head is int8 on the
        CPU and the C++ kernels built; ``greedy_tokens`` then uses it. Returns it (None: off).
        ordering: its row order if it is built now (a clustered drafter's cluster order [V'],
        -1 for padding, so that the drafter's LM head reads the same copy). Off under a final
        logit soft-cap (see ``mtpspec.screen``)."""
        head = self.embed if self.untied_head is None else self.untied_head
        if self._screen is None and (self.weight_format == "int8" and ArgmaxScreen.available()
                                     and self.norm_scale.device.type == "cpu"
                                     and self.config.final_logit_softcap == 0):
            self._screen = ArgmaxScreen(head, ordering)
        return self._screen

    @property
    def screen_nbytes(self) -> int:
        return self._screen.nbytes if self._screen is not None else 0

    @torch.inference_mode()
    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """``lm_head(hidden).argmax(-1)`` ``[*]`` for hidden ``[*, d]``, bit for bit; through the
        argmax screen when it is on and there are several rows (one row reads the same bytes
        either way, and the full head is then a little faster)."""
        if self._screen is not None and hidden.numel() > hidden.shape[-1]:
            return self._screen(hidden)
        return self.lm_head(hidden).argmax(dim=-1)

    def _rope_tables(self, needed: int, device: torch.device):
        if needed > self._rope_len or self._rope[True][0].device != device:
            length = max(needed, 2 * self._rope_len, 1024)
            cfg = self.config
            self._rope = {
                True: rotary_tables(cfg.rope_theta_global, cfg.head_dim, length,
                                    cfg.rope_scaling_factor),
                False: rotary_tables(cfg.rope_theta_local, cfg.head_dim, length),
            }
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
        cfg = self.config
        batch, steps = token_ids.shape
        last = int(positions.max()) + 1
        if last > cache.max_len:
            cache.check_room(last)
        if int(positions.min()) < 0:
            raise CacheFullError("positions must be non-negative")
        tables = self._rope_tables(last, positions.device)
        stack = self._fused_stack(token_ids, cache)
        if stack is not None:
            hidden = stack.forward(token_ids, positions, cache, tables)  # [B, T, d]
            if num_logits == 0:
                return None, hidden
            tail = hidden if num_logits is None else hidden[:, -num_logits:]
            return self.lm_head(tail), hidden
        x = self.embed_tokens(token_ids)  # [B, T, d]
        rope = {kind: (cos[positions].unsqueeze(2), sin[positions].unsqueeze(2))
                for kind, (cos, sin) in tables.items()}
        masks = {kind: self._mask(positions, last, kind) for kind in (True, False)}
        for layer in self.layers:
            mask, start = masks[layer.is_global]
            x = layer(x, rope[layer.is_global], positions, mask, start, cache)
        hidden = rms_norm(x, self.norm_scale, cfg.rms_norm_eps)  # [B, T, d]
        if num_logits == 0:
            return None, hidden
        tail = hidden if num_logits is None else hidden[:, -num_logits:]
        return self.lm_head(tail), hidden

    def _fused_stack(self, token_ids: torch.Tensor, cache: KVCache) -> fused.FusedGemma3 | None:
        """The C++ stack if this call can use it: packed weights, CPU, float32 cache, no autograd."""
        if not (self.use_fused and self.weight_format in FORMATS and not torch.is_grad_enabled()
                and token_ids.device.type == "cpu" and cache.k.device.type == "cpu"
                and cache.k.dtype == torch.float32 and cache.k.is_contiguous()):
            return None
        if self._fused is None:
            self._fused = False
            if fused.available():
                try:
                    self._fused = fused.FusedGemma3(self)
                except RuntimeError as err:  # a layout the C++ layers do not take
                    warnings.warn(f"fused layers unavailable for this model ({err}); using Python")
        return self._fused or None

    def _mask(self, positions: torch.Tensor, end: int, is_global: bool):
        """Visible key slots for each query: causal, and within the window on local layers."""
        window = self.config.sliding_window
        start = 0 if is_global else max(0, int(positions.min()) - window + 1)
        slots = torch.arange(start, end, device=positions.device)  # [S]
        query = positions.unsqueeze(-1)  # [B, T, 1]
        visible = slots <= query
        if not is_global:
            visible &= slots > query - window
        return visible.unsqueeze(1), start  # [B, 1, T, S]


def random_weights(config: ModelConfig, seed: int = 0, scale: float = 0.5) -> dict[str, torch.Tensor]:
    """Random weights under Hugging Face names, for tests on tiny configurations (norm weights
    near the identity under the config's ``norm_offset``; biases, sandwich norms, q/k norms and an
    untied head where the config has them)."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen) * scale  # noqa: E731
    norm = lambda n: (1.0 - config.norm_offset) + rand(n) * 0.1  # noqa: E731
    d, q, kv, inter = config.hidden_size, config.q_size, config.kv_size, config.intermediate_size
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
            for name, size in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
                weights[p + f"self_attn.{name}.bias"] = rand(size)
        norms = ["input_layernorm", "post_attention_layernorm"]
        if config.sandwich_norms:
            norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
        for name in norms:
            weights[p + name + ".weight"] = norm(d)
        if config.qk_norm:
            weights[p + "self_attn.q_norm.weight"] = norm(config.head_dim)
            weights[p + "self_attn.k_norm.weight"] = norm(config.head_dim)
    return weights
