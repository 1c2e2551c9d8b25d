"""Fused CPU inference: a whole decoder stack, and a whole MTP draft step, in one C++ call.

What: ``FusedStack`` runs embedding -> every decoder layer -> final norm for rows ``[B, T]`` with
per-row positions (ragged, right-padded batches welcome), writing K/V into the ``KVCache`` at each
row's position, in one call into C++ that loops over the layers. ``FusedDrafter`` does one step of
the MTP head (``drafter.head.MTPHead``: query-only attention over target layers' caches, no cache
writes) and its clustered LM head (centroid scores, top-m clusters, logits of their tokens). Both
run the ONE decoder-layer body of ``mtpspec/csrc/layer.cpp``:
attn norm -> packed qkv (+ bias) -> per-head q/k RMSNorm (optional) -> rotary (rotate-half, the
caller's cos/sin tables) -> [target: k/v into the cache] -> attention of each row over its visible
slots (causal, and the sliding window on local layers; GQA; optional logit soft-cap; fp32 softmax)
-> packed o_proj -> (post-attention norm) + residual -> MLP norm -> packed gate_up ->
gelu_tanh(gate) * up or silu(gate) * up -> packed down -> (post-MLP norm) + residual
(-> * the layer's output scalar: drafters).

The contract a target model satisfies (``models.decoder.DecoderModel``, the one native decoder
of every family), read once when the stack is built:
- ``model.config``: a ``config.ModelConfig`` (hidden_size, num_heads, num_kv_heads, head_dim,
  intermediate_size, rms_norm_eps, query_pre_attn_scalar (query scale = its ** -0.5),
  sliding_window, mlp_activation ("gelu_tanh" | "silu"), attn_logit_softcap (0: none));
- ``model.embed``: ``PackedLinear`` [V, d]; ``model.embed_scale``: float (1.0 if not scaled);
  ``model.norm_scale``: Tensor [d], the final norm's scale with the norm offset applied;
- ``model.layers[i]``: ``qkv``, ``o_proj``, ``gate_up`` (cat[gate, up]), ``down``: PackedLinear;
  ``qkv_bias``: Tensor [q + 2 kv] float32 or None; ``attn_norm_scale``, ``mlp_norm_scale``: [d];
  ``post_attn_norm_scale``, ``post_mlp_norm_scale``: [d] or None (sandwich norms: both or none);
  ``q_norm_scale``, ``k_norm_scale``: [head_dim] or None; ``is_global``: bool (else the layer
  sees ``config.sliding_window`` slots back). Every scale has the norm offset applied.
- ``forward``'s rope tables ``{is_global: (cos, sin) [len, head_dim]}`` are computed in Python
  (any rotary scaling, partial rotary as cos = 1, sin = 0 past the rotated pairs).
The C++ side takes this as typed structs filled by name (``PackedWeight``, ``LayerParams``,
``StackParams``, ``DraftParams``, ``RopeTables`` in ``csrc/stacks.h``) and checks every shape,
naming the field that is wrong. The LM head, any final soft-cap and the argmax stay in Python.

Why: at one to nine rows a layer's weights are read in ~0.3 ms (int8), but the Python layer issues
~70 small torch ops (~10-30 us each) and several ``.item()`` syncs; the stack paid ~20 ms per token
in overhead. Here the products are the same packed kernels as ``ops.PackedLinear`` (same thread
pool, same numerics); norms, rotary, attention and the activations are AVX2 loops on the rows in
L1/L2. The C++ is built by ``mtpspec.native``; the calls release the GIL.

Numerics: float32 everywhere, the same operation order as the Python layers (no FMA contraction
outside the products), so logits differ from the reference path only by summation order (~1e-6
relative). Attention takes tiles of up to 16 query rows of one sequence per kv head and walks
their keys 128 slots at a time with running-max rescaling (flash-attention style), so a key block
is read once per tile rather than once per row and head (prefill); with few tiles (decode) the key
range is split into parts, merged at the end, so that both threads work.

Measured (bench/profile_step.py: int8, batch 1, 200 cached tokens, 2 kernel threads, best of 4
interleaved rounds with no other job on the 2-vCPU Zen 3 box; ms, fused vs the Python layers):
one-token forward 13.1 (body 5.9 + LM head 7.9) vs 30.1; verification M=5 21.2 vs 38.6; M=8
33.5 vs 53.7; one MTP draft step with the clustered head 1.65 vs 10.8 (1.26 with bf16 head
weights). The body is now at its weight-read floor (100 MB int8 at ~19 GB/s); M >= 5 is
compute-bound in the packed kernels (~90 GFLOP/s per core).

Must not: be used for training or the ``dense`` format (no autograd; CPU and float32 caches only;
``models.decoder`` and ``drafter.head`` keep the Python reference path, and use it whenever this
one does not apply or the extension did not build). The C++ objects hold references to the
packed weights of the model they were built from: rebuild them if those weights are replaced.
"""
from __future__ import annotations

import torch
from torch import Tensor

from mtpspec import ops
from mtpspec.ops import PackedLinear


def available() -> bool:
    """Whether the fused C++ layers built on this machine."""
    return ops.fused_extension() is not None


def _vector(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().to(torch.float32).cpu().contiguous()


def layer_params(ext, layer, index: int, config) -> object:
    """A target layer (the contract in the module docstring) as the native ``LayerParams``."""
    p = ext.LayerParams()
    p.qkv, p.o_proj = layer.qkv.kernel_weight(), layer.o_proj.kernel_weight()
    p.gate_up, p.down = layer.gate_up.kernel_weight(), layer.down.kernel_weight()
    p.qkv_bias = _vector(layer.qkv_bias)
    p.attn_norm_scale, p.mlp_norm_scale = _vector(layer.attn_norm_scale), _vector(layer.mlp_norm_scale)
    p.post_attn_norm_scale = _vector(layer.post_attn_norm_scale)
    p.post_mlp_norm_scale = _vector(layer.post_mlp_norm_scale)
    p.q_norm_scale, p.k_norm_scale = _vector(layer.q_norm_scale), _vector(layer.k_norm_scale)
    p.is_global = bool(layer.is_global)
    p.sliding_window = 0 if layer.is_global else int(config.sliding_window)
    p.cache_layer = index
    return p


def rope_tables(ext, rope: dict):
    """{is_global: (cos, sin) [len, Dh]} -> the native ``RopeTables``."""
    return ext.RopeTables(cos_global=rope[True][0], sin_global=rope[True][1],
                          cos_local=rope[False][0], sin_local=rope[False][1])


class FusedStack:
    """The decoder stack of a packed target model (the contract in the module docstring; any of
    ``ops.FORMATS``) as one C++ object."""

    def __init__(self, model):
        ext = ops.fused_extension()
        if ext is None:
            raise RuntimeError("the fused C++ layers are not available")
        cfg = model.config
        p = ext.StackParams()
        p.hidden_size, p.num_heads, p.num_kv_heads = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads
        p.head_dim, p.intermediate_size = cfg.head_dim, cfg.intermediate_size
        p.activation = cfg.mlp_activation
        p.rms_norm_eps = cfg.rms_norm_eps
        p.query_scale = cfg.query_pre_attn_scalar ** -0.5
        p.attn_logit_softcap = cfg.attn_logit_softcap
        p.embed_scale = float(model.embed_scale)
        p.chunk_bytes = ops._CHUNK_BYTES
        p.embed = model.embed.kernel_weight()
        p.norm_scale = _vector(model.norm_scale)
        p.layers = [layer_params(ext, layer, i, cfg) for i, layer in enumerate(model.layers)]
        self._ext = ext
        self._stack = ext.TargetStack(p)

    def forward(self, token_ids: Tensor, positions: Tensor, cache, rope: dict) -> Tensor:
        """token_ids, positions [B, T]; rope {is_global: (cos, sin) [len, Dh]} -> hidden after the
        final norm [B, T, d]. Writes each row's K/V at its position of ``cache``."""
        return self._stack.forward(token_ids.to(torch.long).contiguous(),
                                   positions.to(torch.long).contiguous(), cache.k, cache.v,
                                   rope_tables(self._ext, rope), ops.get_num_threads())


def padded_cluster_rows(clusters: Tensor) -> Tensor:
    """clusters [C, S] token ids -> [C * S'] the same ids, each cluster padded with -1 to a multiple
    S' of 16 rows (whole panels)."""
    num, size = clusters.shape
    idx = torch.full((num, -(-size // 16) * 16), -1, dtype=torch.long)
    idx[:, :size] = clusters
    return idx.flatten()


def cluster_ordered(embed: PackedLinear, clusters: Tensor, chunk: int = 32_768) -> PackedLinear:
    """A packed copy of ``embed`` whose rows are ``clusters`` [C, S] (token ids), each cluster padded
    with zero rows to a multiple of 16 so that it owns whole panels; same format and bits."""
    idx = padded_cluster_rows(clusters)  # [C * padded], -1 = a zero row
    total, k = idx.numel(), embed.in_features
    packed = torch.empty((total // 16, *embed.packed.shape[1:]), dtype=embed.packed.dtype)
    scales = embed.scales
    if embed.fmt == "int8":
        scales = torch.ones(total, dtype=scales.dtype)
    elif embed.fmt == "int4":
        scales = torch.empty((total // 16, *embed.scales.shape[1:]), dtype=embed.scales.dtype)
    for begin in range(0, total, chunk):
        rows = idx[begin:begin + chunk]  # [n], n % 16 == 0
        valid = rows >= 0
        src = rows.clamp(min=0)
        panel, lane = src // 16, src % 16
        p0, p1 = begin // 16, (begin + rows.numel()) // 16
        if embed.fmt == "int4":
            byte = embed.packed[panel, :, lane % 8]  # [n, K] uint8
            q = torch.where((lane < 8)[:, None], byte & 15, byte >> 4) * valid[:, None]
            q = q.reshape(-1, 16, k).transpose(1, 2)  # [n/16, K, 16]
            packed[p0:p1] = q[..., :8] | (q[..., 8:] << 4)
            sb = embed.scales[panel, :, :, lane]  # [n, ng, 2]: scale, offset
            sb[~valid] = torch.tensor([1.0, 0.0], dtype=sb.dtype)
            scales[p0:p1] = sb.reshape(-1, 16, *sb.shape[1:]).permute(0, 2, 3, 1)
            continue
        values = embed.packed[panel, :, lane] * valid.to(embed.packed.dtype)[:, None]  # [n, K]
        packed[p0:p1] = values.reshape(-1, 16, k).transpose(1, 2)
        if embed.fmt == "int8":
            scales[begin:begin + rows.numel()] = torch.where(valid, embed.scales[src], 1.0)
    return PackedLinear(packed, scales, total, k, embed.fmt, embed.group_size)


class FusedDrafter:
    """One MTP draft step (``MTPHead.step`` for one query per sequence) and the clustered or
    frequency LM head, in C++. The head's float weights are packed once here in ``weights`` (fp32 by
    default: the reference's numbers; bf16 halves the bytes a step reads, at bf16 rounding).
    Honours the head's ``norm_offset``, ``out_norm``, ``layer_scalars`` and
    ``rope_partial_global``; refuses (``RuntimeError``) what the C++ step does not run: per-layer
    head sizes or kv heads, and an LM head of the drafter's own (``lm_head_source = "draft"``)."""

    def __init__(self, head, target, kind: str, weights: str = "fp32", share_screen: bool = True):
        """share_screen: a clustered head scores tokens with integer estimates from the target's
        argmax screen (mtpspec.screen, built here in this head's cluster order if the target has
        none yet) instead of exact logits from a cluster-ordered copy of its own (V x d bytes
        saved; drafts only, so output never changes)."""
        ext = ops.fused_extension()
        if ext is None:
            raise RuntimeError("the fused C++ layers are not available")
        cfg = head.cfg
        unsupported = [name for name, bad in (
            ("per-layer head sizes", any(cfg.head_dim_of(i) != cfg.head_dim
                                         for i in range(cfg.num_layers))),
            ("per-layer kv heads", any(cfg.kv_heads_of(i) != cfg.target_kv_heads
                                       for i in range(cfg.num_layers))),
            ("lm_head_source='draft'", cfg.lm_head_source != "target")) if bad]
        if unsupported:
            raise RuntimeError(f"the fused draft step does not run {', '.join(unsupported)}")

        self.nbytes = 0  # bytes packed here (the target's own embedding is shared, not counted)

        def own(packed: PackedLinear):
            self.nbytes += packed.nbytes
            return packed.kernel_weight()

        def pack(linear):
            return own(PackedLinear.from_weight(linear.weight.detach().float().cpu(), weights))

        def scale(norm) -> Tensor:  # the head's RMSNorm scale: offset + weight
            return (norm.offset + norm.weight.detach().float().cpu()).contiguous()

        body = ext.StackParams()
        body.hidden_size, body.num_heads, body.num_kv_heads = (cfg.d_draft, cfg.num_heads,
                                                               cfg.target_kv_heads)
        body.head_dim, body.intermediate_size = cfg.head_dim, cfg.intermediate_size
        body.activation = "gelu_tanh"
        body.rms_norm_eps, body.query_scale = cfg.rms_norm_eps, cfg.query_scale
        body.embed_scale = float(target.embed_scale)
        body.chunk_bytes = ops._CHUNK_BYTES
        body.embed = target.embed.kernel_weight()
        body.norm_scale = scale(head.norm)
        layers = []
        for i, layer in enumerate(head.layers):
            lp = ext.LayerParams()
            lp.qkv, lp.o_proj = pack(layer.q_proj), pack(layer.o_proj)
            lp.gate_up, lp.down = pack(layer.gate_up), pack(layer.down)
            lp.attn_norm_scale, lp.mlp_norm_scale = scale(layer.attn_norm), scale(layer.mlp_norm)
            lp.post_attn_norm_scale = scale(layer.post_attn_norm)
            lp.post_mlp_norm_scale = scale(layer.post_mlp_norm)
            lp.q_norm_scale = scale(layer.q_norm)
            lp.is_global = bool(cfg.layer_is_global[i])
            lp.sliding_window = 0 if lp.is_global else int(cfg.sliding_window)
            lp.cache_layer = int(cfg.target_layers[i])
            lp.output_scale = float(layer.scalar)
            layers.append(lp)
        body.layers = layers
        params = ext.DraftParams()
        params.target_hidden = cfg.target_hidden
        params.pre_projection = pack(head.pre_projection)
        params.post_projection = pack(head.post_projection)
        params.out_norm_scale = scale(head.out_norm) if cfg.out_norm else None
        size = cfg.vocab_size // cfg.num_clusters
        members = torch.empty(0, dtype=torch.long)
        self.kind = kind
        self.frequent = None  # frequency head: the frequent tokens' rows, packed like the target's
        if kind == "frequency":
            self.frequent_ids = head.frequent_tokens.detach().cpu()  # [N]
            self.frequent = cluster_ordered(target.embed, self.frequent_ids[None])
            self.nbytes += self.frequent.nbytes
        screen = None  # the target's argmax screen, when it holds our clusters: no copy of our own
        if kind == "clustered":
            members = head.token_ordering.detach().cpu().view(cfg.num_clusters, size).contiguous()
            params.centroids = own(PackedLinear.from_weight(head.centroids.detach().float().cpu(),
                                                            "fp32"))
            rows = padded_cluster_rows(members)
            enable = getattr(target, "enable_argmax_screen", None)
            screen = enable(rows) if enable is not None and share_screen else None
            if screen is None or not torch.equal(screen.order, rows):
                screen = None
                params.ordered_embed = own(cluster_ordered(target.embed, members))
        params.cluster_ids = members
        params.top_clusters, params.cluster_size = cfg.top_clusters, size
        params.cluster_padded = -(-size // 16) * 16
        params.body = body
        self.head = head
        self._ext = ext
        self._stack = ext.DraftStack(params)
        self.shares_screen = screen is not None
        if screen is not None:
            self._stack.use_screen(screen.u, screen.scale, screen.beta)

    def step(self, tokens: Tensor, hidden: Tensor, query_positions: Tensor, context_end: Tensor,
             cache) -> Tensor:
        """tokens, query_positions, context_end [B]; hidden [B, d_t] -> h' [B, d_t]."""
        needed = int(query_positions.max()) + 1
        device = torch.device("cpu")
        tables = {is_global: self.head.rope_tables(needed, is_global, device)
                  for is_global in (True, False)}
        return self._stack.step(tokens.to(torch.long).contiguous(),
                                hidden.to(torch.float32).contiguous(),
                                query_positions.to(torch.long).contiguous(),
                                context_end.to(torch.long).contiguous(), cache.k, cache.v,
                                rope_tables(self._ext, tables), ops.get_num_threads())

    def clustered(self, hidden: Tensor, want_logits: bool):
        """h' [B, d_t] -> (best token [B], logits [B, m*S] or None, token ids [B, m*S] or None)."""
        best, logits, ids = self._stack.clustered(hidden.contiguous(), want_logits,
                                                  ops.get_num_threads())
        return (best, logits, ids) if want_logits else (best, None, None)

    def frequency(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """h' [B, d_t] -> (logits [B, N] of the frequent tokens, their ids [B, N])."""
        count = self.frequent_ids.numel()
        logits = self.frequent(hidden)[:, :count]
        return logits, self.frequent_ids.expand(hidden.shape[0], -1)
