"""One native decoder for every family ``config.ModelConfig`` describes (Llama, Mistral, Qwen2/2.5,
Qwen3, Gemma 2, Gemma 3, Gemma 4 text), written for small-batch CPU decoding.

``forward(token_ids, positions, cache)`` runs any number of new tokens per sequence (prefill,
one-token decode, the k+1-token verification pass) and returns logits and the final hidden states.
A layer is: RMSNorm (scale ``norm_offset + w``) -> q/k/v product (+ bias: Qwen2) -> per-head q/k
RMSNorm (Gemma 3/4, Qwen3) -> rotary (rotate-half; the tables of the layer's type: global or sliding,
with the configured scaling) -> K/V into the shared ``KVCache`` -> grouped-query attention over the
visible slots (causal, the sliding window on sliding layers, scores soft-capped for Gemma 2) ->
o_proj -> (post-attention norm: Gemma) + residual -> RMSNorm -> gate/up -> act(gate) * up ->
down -> (post-MLP norm: Gemma) + residual. Then the final norm and the LM head (tied to the
embedding or its own), with Gemma 2's final soft-cap. Nothing here is written per family: the
config's architecture fields choose every difference.

Gemma 4's fields (see ``config``) change a layer so: global layers may have their own head size
and kv heads, and no value projection (values = the raw keys); values are RMS-normed without a
scale; the last ``num_kv_shared_layers`` layers compute no K/V and attend to their source layer's
slots (``cache.k[layer]`` resolves them); per-layer inputs (PLE) are gated into the residual after
the MLP, and a stored scalar multiplies the layer's output.

Weights are ``PackedLinear`` layers (fp32, bf16, int8 or int4 storage, float32 compute; ``dense``
keeps plain float layers for training); q/k/v and gate/up are fused into one product each (a layer
without value or K/V weights fuses what it has). The layer attributes (``qkv``, ``qkv_bias``,
``o_proj``, ``gate_up``, ``down``, ``attn_norm_scale``, ``post_attn_norm_scale``,
``mlp_norm_scale``, ``post_mlp_norm_scale``, ``q_norm_scale``, ``k_norm_scale``, ``is_global``) are
the contract a fused C++ stack reads; absent pieces are None. A fused stack may only take a config
whose ``uniform_layers`` is True; Gemma 4 runs on the Python layers here.

Must not: know about drafting, or change sequence lengths (it writes the cache slots of the
positions it is given; the engine owns lengths).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mtpspec import fused
from mtpspec.config import ModelConfig
from mtpspec.kv_cache import CacheFullError, KVCache
from mtpspec.models.attention import apply_rotary, attend, rms_norm, rotary_tables, softcap
from mtpspec.models.dense import DenseLinear
from mtpspec.ops import FORMATS, PackedLinear
from mtpspec.screen import ArgmaxScreen


def make_linear(weight: torch.Tensor, fmt: str):
    """A packed CPU layer for the inference formats, a plain float layer for ``dense``."""
    return DenseLinear(weight) if fmt == "dense" else PackedLinear.from_weight(weight, fmt)


class LinearSource:
    """Where a model's linear layers come from: packed now from float weights, or taken as they
    were stored (``models.store``: packed tensors read back from a cache file, no repacking)."""

    def __init__(self, fmt: str, prebuilt: dict[str, nn.Module] | None = None,
                 on_built: Callable[[int], None] | None = None):
        self.fmt = fmt
        self.prebuilt = prebuilt or {}
        self.on_built = on_built  # told the weights of each layer built here (a progress bar)

    def get(self, name: str, weight) -> nn.Module:
        """The layer called ``name``; ``weight()`` gives its float weight [out, in] if it must be built."""
        if name in self.prebuilt:
            return self.prebuilt[name]
        full = weight()  # [out, in]
        layer = make_linear(full, self.fmt)
        if self.on_built is not None:
            self.on_built(full.numel())
        return layer


def layer_norm_names(config: ModelConfig) -> dict[str, str]:
    """Our norm slot -> the Hugging Face weight name of that norm in one layer."""
    if config.sandwich_norms:
        return {"attn_norm": "input_layernorm", "post_attn_norm": "post_attention_layernorm",
                "mlp_norm": "pre_feedforward_layernorm",
                "post_mlp_norm": "post_feedforward_layernorm"}
    return {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}


def layer_projections(config: ModelConfig, layer: int) -> str:
    """The attention projections layer ``layer`` has: "qkv", "qk" (values = keys) or "q" (K/V
    shared from another layer)."""
    if config.kv_source(layer) != layer:
        return "q"
    return "qk" if config.layer_k_eq_v(layer) else "qkv"


def _act(config: ModelConfig, x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh") if config.mlp_activation == "gelu_tanh" else F.silu(x)


class DecoderLayer(nn.Module):
    """One decoder block: attention and MLP with pre-norms (and Gemma's post-norms, Gemma 4's
    per-layer input and layer scalar)."""

    def __init__(self, config: ModelConfig, index: int, weights: dict[str, torch.Tensor],
                 linears: LinearSource):
        super().__init__()
        prefix = f"model.layers.{index}."
        get = lambda name: weights[prefix + name]  # noqa: E731
        mine = f"layers.{index}."
        self.config = config
        self.index = index
        self.is_global = config.is_global(index)
        self.head_dim = config.layer_head_dim(index)
        self.kv_heads = config.layer_kv_heads(index)
        self.kv_source = config.kv_source(index)  # the layer whose K/V this one attends to
        self.projections = layer_projections(config, index)
        self.qkv = linears.get(mine + "qkv", lambda: torch.cat(
            [get(f"self_attn.{p}_proj.weight") for p in self.projections]))
        self.o_proj = linears.get(mine + "o_proj", lambda: get("self_attn.o_proj.weight"))
        self.gate_up = linears.get(mine + "gate_up", lambda: torch.cat(
            [get("mlp.gate_proj.weight"), get("mlp.up_proj.weight")]))
        self.down = linears.get(mine + "down", lambda: get("mlp.down_proj.weight"))
        bias = (torch.cat([get(f"self_attn.{p}_proj.bias") for p in self.projections]).float()
                if config.qkv_bias else None)  # [q + 2kv]
        self.register_buffer("qkv_bias", bias, persistent=False)
        names = layer_norm_names(config)
        if config.qk_norm:
            names["q_norm"] = "self_attn.q_norm"
            if self.projections != "q":
                names["k_norm"] = "self_attn.k_norm"
        if config.per_layer_input_size:
            names["per_layer_norm"] = "post_per_layer_input_norm"
        for slot in ("attn_norm", "post_attn_norm", "mlp_norm", "post_mlp_norm", "q_norm", "k_norm",
                     "per_layer_norm"):
            scale = (config.norm_offset + get(names[slot] + ".weight").float()) if slot in names else None
            self.register_buffer(slot + "_scale", scale, persistent=False)
        self.per_layer_gate = self.per_layer_proj = None
        if config.per_layer_input_size:  # PLE: [P, d] gate and [d, P] projection
            self.per_layer_gate = linears.get(mine + "per_layer_gate",
                                              lambda: get("per_layer_input_gate.weight"))
            self.per_layer_proj = linears.get(mine + "per_layer_proj",
                                              lambda: get("per_layer_projection.weight"))
        self.scalar = float(get("layer_scalar").reshape(())) if config.layer_scalar else 1.0

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                positions: torch.Tensor, mask: torch.Tensor, key_start: int,
                cache: KVCache, per_layer_input: torch.Tensor | None = None) -> torch.Tensor:
        # x [B, T, d]; rope cos/sin [B, T, 1, Dh]; mask [B, 1, T, S] bool over key slots key_start..;
        # per_layer_input [B, T, P] (PLE) or None
        cfg = self.config
        batch, steps, _ = x.shape
        eps = cfg.rms_norm_eps
        qkv = self.qkv(rms_norm(x, self.attn_norm_scale, eps))  # [B, T, q (+ kv (+ kv))]
        if self.qkv_bias is not None:
            qkv = qkv + self.qkv_bias
        q_size = cfg.num_heads * self.head_dim
        q = qkv[..., :q_size].reshape(batch, steps, cfg.num_heads, self.head_dim)
        if self.q_norm_scale is not None:
            q = rms_norm(q, self.q_norm_scale, eps)
        q = apply_rotary(q, *rope)
        if self.projections != "q":
            self._write_kv(qkv[..., q_size:], rope, positions, cache)
        key_end = mask.shape[-1] + key_start
        keys = cache.k[self.index, :batch, :, key_start:key_end]    # [B, kvh, S, Dh]
        values = cache.v[self.index, :batch, :, key_start:key_end]  # [B, kvh, S, Dh]
        attn = attend(q, keys, values, mask, cfg.query_scale, cfg.attn_logit_softcap)  # [B, T, H*Dh]
        h = self.o_proj(attn)
        if self.post_attn_norm_scale is not None:
            h = rms_norm(h, self.post_attn_norm_scale, eps)
        x = x + h
        gate, up = self.gate_up(rms_norm(x, self.mlp_norm_scale, eps)).chunk(2, dim=-1)
        h = self.down(_act(cfg, gate) * up)
        if self.post_mlp_norm_scale is not None:
            h = rms_norm(h, self.post_mlp_norm_scale, eps)
        x = x + h
        if self.per_layer_gate is not None:
            gated = _act(cfg, self.per_layer_gate(x)) * per_layer_input  # [B, T, P]
            x = x + rms_norm(self.per_layer_proj(gated), self.per_layer_norm_scale, eps)
        return x * self.scalar if self.scalar != 1.0 else x

    def _write_kv(self, kv: torch.Tensor, rope, positions: torch.Tensor, cache: KVCache) -> None:
        """Normed, rotated keys and (normed) values of ``kv`` ``[B, T, kv (+ kv)]`` into the cache."""
        cfg = self.config
        batch, steps, _ = kv.shape
        eps = cfg.rms_norm_eps
        shape = (batch, steps, self.kv_heads, self.head_dim)
        k, v = (kv.reshape(*shape), kv.reshape(*shape)) if self.projections == "qk" else (
            t.reshape(*shape) for t in kv.chunk(2, dim=-1))
        if self.k_norm_scale is not None:
            k = rms_norm(k, self.k_norm_scale, eps)
        k = apply_rotary(k, *rope)
        if cfg.value_norm:
            v = rms_norm(v, 1.0, eps)
        cache.write(self.index, positions, k.transpose(1, 2), v.transpose(1, 2))


class DecoderModel(nn.Module):
    """A decoder of any configured family; see the module docstring.

    ``embed`` is the input embedding; ``output`` the LM head's weight (``embed`` itself when tied).
    """

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], fmt: str = "fp32",
                 prebuilt: dict[str, nn.Module] | None = None,
                 on_built: Callable[[int], None] | None = None):
        """weights: Hugging Face names -> float tensors (``loading``); prebuilt: linear layers
        already packed, by module name (``models.store``), whose float weights may be absent;
        on_built: told the weight count of each linear layer packed here (a progress bar)."""
        super().__init__()
        self.config = config
        self.weight_format = fmt
        linears = LinearSource(fmt, prebuilt, on_built)
        self.embed = linears.get("embed", lambda: weights["model.embed_tokens.weight"])
        self.output = (self.embed if config.tie_word_embeddings
                       else linears.get("output", lambda: weights["lm_head.weight"]))
        self.layers = nn.ModuleList(DecoderLayer(config, i, weights, linears)
                                    for i in range(config.num_layers))
        self.register_buffer("norm_scale", config.norm_offset + weights["model.norm.weight"].float(),
                             persistent=False)
        self.kv_source = [config.kv_source(i) for i in range(config.num_layers)]
        self.per_layer_embed = self.per_layer_model_proj = None
        per_layer_norm = None
        if config.per_layer_input_size:  # PLE: [V_p, L*P] embedding, [L*P, d] projection
            self.per_layer_embed = linears.get(
                "per_layer_embed", lambda: weights["model.embed_tokens_per_layer.weight"])
            self.per_layer_model_proj = linears.get(
                "per_layer_model_proj", lambda: weights["model.per_layer_model_projection.weight"])
            per_layer_norm = (config.norm_offset
                              + weights["model.per_layer_projection_norm.weight"].float())  # [P]
        self.register_buffer("per_layer_norm_scale", per_layer_norm, persistent=False)
        # Hugging Face rounds Gemma's scale to the activation dtype; float32 here
        self.embed_scale = (float(torch.tensor(math.sqrt(config.hidden_size), dtype=torch.float32))
                            if config.scale_embeddings else 1.0)
        self._rope_len = 0
        self._rope: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}
        self.use_fused = True  # CPU inference through mtpspec.fused when it applies
        self._fused: fused.FusedStack | None | bool = None  # built on first use; False: failed
        self._screen: ArgmaxScreen | None = None  # exact argmax without every logit (int8 head)

    def __getstate__(self):
        state = super().__getstate__().copy()
        state["_fused"] = None  # a C++ object: rebuilt after loading
        return state

    @property
    def tied(self) -> bool:
        return self.output is self.embed

    def kv_shape(self, layer: int) -> tuple[int, int]:
        """(kv heads, head size) of the K/V that ``layer`` attends to (its source layer's)."""
        source = self.kv_source[layer]
        return self.config.layer_kv_heads(source), self.config.layer_head_dim(source)

    def per_layer_inputs(self, token_ids: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """Gemma 4's per-layer inputs ``[B, T, L, P]``: the token's own per-layer embedding and a
        normed projection of its main embedding ``embeds`` ``[B, T, d]``, averaged (/ sqrt 2)."""
        cfg = self.config
        size = cfg.per_layer_input_size
        shape = (*token_ids.shape, cfg.num_layers, size)
        token = self.per_layer_embed.rows(token_ids.reshape(-1)).view(shape)
        token = token * float(torch.tensor(math.sqrt(size), dtype=torch.float32))
        context = (self.per_layer_model_proj(embeds) * cfg.hidden_size ** -0.5).view(shape)
        context = rms_norm(context, self.per_layer_norm_scale, cfg.rms_norm_eps)
        return (context + token) * 2 ** -0.5

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

    def enable_argmax_screen(self, ordering: torch.Tensor | None = None) -> ArgmaxScreen | None:
        """Build the argmax screen (``mtpspec.screen``: +V*d bytes) when the LM head is int8 on the
        CPU and the C++ kernels built; ``greedy_tokens`` then uses it. Returns it (None: off).
        ordering: its row order if it is built now (a clustered drafter's cluster order [V'],
        -1 for padding, so that the drafter's LM head reads the same copy). Off under a final
        logit soft-cap (see ``mtpspec.screen``)."""
        if self._screen is None and (self.weight_format == "int8" and ArgmaxScreen.available()
                                     and self.norm_scale.device.type == "cpu"
                                     and self.config.final_logit_softcap == 0):
            self._screen = ArgmaxScreen(self.output, ordering)
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
        tables = self.rope_tables(last, positions.device)
        stack = self._fused_stack(token_ids, cache)
        if stack is not None:
            hidden = stack.forward(token_ids, positions, cache, tables)  # [B, T, d]
        else:
            hidden = self.hidden_states(token_ids, positions, cache, tables)
        if num_logits == 0:
            return None, hidden
        tail = hidden if num_logits is None else hidden[:, -num_logits:]
        return self.lm_head(tail), hidden

    def hidden_states(self, token_ids, positions, cache, tables) -> torch.Tensor:
        """The Python reference stack: hidden ``[B, T, d]`` after the final norm."""
        x = self.embed_tokens(token_ids)  # [B, T, d]
        per_layer = (self.per_layer_inputs(token_ids, x) if self.per_layer_embed is not None
                     else None)  # [B, T, L, P]
        rope = {kind: (cos[positions].unsqueeze(2), sin[positions].unsqueeze(2))
                for kind, (cos, sin) in tables.items()}
        last = int(positions.max()) + 1
        masks = {kind: self._mask(positions, last, kind) for kind in (True, False)}
        for i, layer in enumerate(self.layers):
            mask, start = masks[layer.is_global]
            x = layer(x, rope[layer.is_global], positions, mask, start, cache,
                      None if per_layer is None else per_layer[:, :, i])
        return rms_norm(x, self.norm_scale, self.config.rms_norm_eps)  # [B, T, d]

    def _fused_stack(self, token_ids: torch.Tensor, cache: KVCache) -> fused.FusedStack | None:
        """The C++ stack if this call can use it: packed weights, uniform layers (no Gemma 4
        extras), CPU, one stacked float32 cache, no autograd."""
        if not (self.use_fused and self.weight_format in FORMATS and not torch.is_grad_enabled()
                and self.config.uniform_layers and cache.stacked and token_ids.device.type == "cpu"
                and cache.k.device.type == "cpu" and cache.k.dtype == torch.float32
                and cache.k.is_contiguous()):
            return None
        if self._fused is None:
            self._fused = False
            if fused.available():
                try:
                    self._fused = fused.FusedStack(self)
                except RuntimeError as err:  # a layout the C++ layers do not take
                    warnings.warn(f"fused layers unavailable for this model ({err}); using Python")
        return self._fused or None

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
    weights = {}
    for name, shape in expected_shapes(config).items():
        if name.endswith("layer_scalar"):
            weights[name] = torch.full(shape, 0.8)
        elif name.endswith(".bias"):
            weights[name] = rand(*shape) * 0.2
        elif len(shape) == 1:  # a norm: scale near 1
            weights[name] = rand(*shape) * 0.1 + (1.0 - config.norm_offset)
        else:
            weights[name] = rand(*shape) / math.sqrt(shape[1])
    return weights


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight a ``DecoderModel`` of ``config`` reads, with its shape (Hugging Face names)."""
    d = config.hidden_size
    shapes = {"model.embed_tokens.weight": (config.vocab_size, d), "model.norm.weight": (d,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, d)
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        dim, inter = config.layer_head_dim(i), config.layer_intermediate(i)
        q, kv = config.num_heads * dim, config.layer_kv_heads(i) * dim
        projections = layer_projections(config, i)
        sizes = {"q": q, "k": kv, "v": kv}
        shapes.update({p + f"self_attn.{proj}_proj.weight": (sizes[proj], d) for proj in projections})
        shapes.update({
            p + "self_attn.o_proj.weight": (d, q),
            p + "mlp.gate_proj.weight": (inter, d), p + "mlp.up_proj.weight": (inter, d),
            p + "mlp.down_proj.weight": (d, inter),
        })
        if config.qkv_bias:
            shapes.update({p + f"self_attn.{proj}_proj.bias": (sizes[proj],) for proj in projections})
        for name in layer_norm_names(config).values():
            shapes[p + name + ".weight"] = (d,)
        if config.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (dim,)
            if projections != "q":
                shapes[p + "self_attn.k_norm.weight"] = (dim,)
        if config.per_layer_input_size:
            size = config.per_layer_input_size
            shapes.update({p + "per_layer_input_gate.weight": (size, d),
                           p + "per_layer_projection.weight": (d, size),
                           p + "post_per_layer_input_norm.weight": (d,)})
        if config.layer_scalar:
            shapes[p + "layer_scalar"] = (1,)
    if config.per_layer_input_size:
        packed = config.num_layers * config.per_layer_input_size
        shapes.update({"model.embed_tokens_per_layer.weight": (config.per_layer_vocab_size, packed),
                       "model.per_layer_model_projection.weight": (packed, d),
                       "model.per_layer_projection_norm.weight": (config.per_layer_input_size,)})
    return shapes


def linear_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of every linear module of a ``DecoderModel`` of ``config``, by module name."""
    d = config.hidden_size
    shapes = {"embed": (config.vocab_size, d)}
    if not config.tie_word_embeddings:
        shapes["output"] = (config.vocab_size, d)
    for i in range(config.num_layers):
        dim, inter = config.layer_head_dim(i), config.layer_intermediate(i)
        q, kv = config.num_heads * dim, config.layer_kv_heads(i) * dim
        fused = q + kv * (len(layer_projections(config, i)) - 1)
        shapes.update({f"layers.{i}.qkv": (fused, d), f"layers.{i}.o_proj": (d, q),
                       f"layers.{i}.gate_up": (2 * inter, d), f"layers.{i}.down": (d, inter)})
        if config.per_layer_input_size:
            size = config.per_layer_input_size
            shapes.update({f"layers.{i}.per_layer_gate": (size, d),
                           f"layers.{i}.per_layer_proj": (d, size)})
    if config.per_layer_input_size:
        packed = config.num_layers * config.per_layer_input_size
        shapes.update({"per_layer_embed": (config.per_layer_vocab_size, packed),
                       "per_layer_model_proj": (packed, d)})
    return shapes
