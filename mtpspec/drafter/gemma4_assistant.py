"""Google's Gemma 4 assistant drafters (``Gemma4AssistantForCausalLM`` folders) <-> our ``MTPHead``.

An assistant folder (``config.json`` with ``model_type: gemma4_assistant`` + safetensors) maps onto
the MTP head with its Gemma 4 switches on (see ``drafter/head.py``):

    pre_projection [d, 2*backbone]    -> pre_projection
    layers.N: q_proj, q_norm, o_proj, gate/up/down, four sandwich norms, layer_scalar
              (query-only: the K/V are the target's, one target layer per attention type)
    norm, post_projection [backbone, d] -> norm, post_projection (no norm after it)
    lm_head = embed_tokens [V, d]     -> embedding (the head's own LM head, on the normed state)
    masked_embedding.centroids, token_ordering (E2B/E4B: ``use_ordered_embeddings``)
                                      -> centroids, token_ordering, head = "clustered"
    otherwise (26B/31B)               -> head = "full" over the own embedding

What transformers' candidate generator does, and so what we do: the query sits at the position of
the pending token for the whole draft (constant positions); each draft layer attends to the K/V of
the last target layer of its type that computes K/V (Gemma 4's KV-sharing "store" layers); a
sliding layer sees the last ``sliding_window + 1`` slots before the query (their bidirectional
window flipped onto the past), a global one every slot before it; attention is unscaled (the
norms do it). ``save_assistant`` writes the same layout back, so runtimes that load Google's
drafters load ours; ``new_assistant_config`` and ``init_own_lm_head`` start a new head in this
layout for ``mtpspec train --layout gemma4-assistant``. A config that does not fit the target is
refused (``DrafterMismatchError``) naming every mismatch. transformers is not imported here.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from mtpspec.drafter.checkpoint import DrafterMismatchError, check_token_ordering
from mtpspec.drafter.head import DrafterConfig, MTPHead

MODEL_TYPE = "gemma4_assistant"
WEIGHTS = "model.safetensors"
# our window covers slots > p - w; theirs the last W + 1 slots before p: w = W + 2
WINDOW_SHIFT = 2


# our draft layer's tensor -> the assistant layout's, under ``layers.{i}.`` / ``model.layers.{i}.``
# (gate_up is their gate_proj and up_proj stacked; handled where it is read and written)
_LAYER_NAMES = (("attn_norm", "input_layernorm"), ("post_attn_norm", "post_attention_layernorm"),
                ("mlp_norm", "pre_feedforward_layernorm"),
                ("post_mlp_norm", "post_feedforward_layernorm"), ("q_norm", "self_attn.q_norm"),
                ("q_proj", "self_attn.q_proj"), ("o_proj", "self_attn.o_proj"),
                ("down", "mlp.down_proj"))


def is_assistant_folder(folder: str | Path) -> bool:
    path = Path(folder) / "config.json"
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("model_type") == MODEL_TYPE
    except json.JSONDecodeError:
        return False


def producer_layers(target) -> dict[str, int]:
    """Attention type ("sliding_attention"/"full_attention") -> the target layer whose K/V an
    assistant layer of that type reads: the last layer of the type that computes its own K/V."""
    kinds = getattr(target, "layer_kinds", None) or [
        "full_attention" if target.config.is_global(i) else "sliding_attention"
        for i in range(target.config.num_layers)]
    sources = getattr(target, "kv_source", None) or list(range(len(kinds)))
    return {kind: max(i for i, k in enumerate(kinds) if k == kind and sources[i] == i)
            for kind in set(kinds)}


def _kv_shape(target, layer: int) -> tuple[int, int]:
    if hasattr(target, "kv_shape"):
        return target.kv_shape(layer)
    return target.config.num_kv_heads, target.config.head_dim


def _text_value(text: dict, name: str, default=None):
    value = text.get(name)
    return default if value is None else value


def assistant_config(raw: dict, target, weights_hash: str = "") -> DrafterConfig:
    """Our config for an assistant ``config.json``, checked against ``target``."""
    text = raw.get("text_config") or {}
    problems = []
    backbone = int(raw.get("backbone_hidden_size", 1536))
    if backbone != target.config.hidden_size:
        problems.append(f"backbone_hidden_size {backbone} != target's hidden size "
                        f"{target.config.hidden_size}")
    vocab = int(_text_value(text, "vocab_size", 262_144))
    if vocab != target.config.vocab_size:
        problems.append(f"vocabulary {vocab} != target's {target.config.vocab_size}")
    num_layers = int(_text_value(text, "num_hidden_layers", 4))
    kinds = list(text.get("layer_types") or [
        "sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(num_layers)])
    kinds[-1] = "full_attention"  # as Gemma4TextConfig forces
    producers = producer_layers(target)
    missing = sorted(set(kinds) - set(producers))
    if missing:
        problems.append(f"its layers read target layers of type {missing}, which the target lacks")
    trained_for = str((raw.get("mtpspec") or {}).get("target_hash") or "")
    if weights_hash and trained_for and trained_for != weights_hash:
        problems.append(f"it was trained for target weights {trained_for[:12]} "
                        f"({raw['mtpspec'].get('target_name', '')}), not {weights_hash[:12]}")
    heads = int(_text_value(text, "num_attention_heads", 8))
    head_dim = int(_text_value(text, "head_dim", 256))
    global_dim = int(_text_value(text, "global_head_dim", 512))
    per_layer = text.get("per_layer_config") or {}  # transformers >= 5 writes the overrides here
    dims = [int((per_layer.get(str(i)) or {}).get(
        "head_dim", global_dim if kind == "full_attention" else head_dim))
        for i, kind in enumerate(kinds)]
    layers = [producers.get(kind, 0) for kind in kinds]
    kv_heads = []
    for kind, layer, dim in zip(kinds, layers, dims):
        target_heads, target_dim = _kv_shape(target, layer) if kind in producers else (1, dim)
        kv_heads.append(target_heads)
        if kind in producers and target_dim != dim:
            problems.append(f"{kind} head size {dim} != target layer {layer}'s {target_dim}")
        elif kind in producers and heads % target_heads:
            problems.append(f"{heads} query heads do not group over target layer {layer}'s "
                            f"{target_heads} kv heads")
    if problems:
        raise DrafterMismatchError("assistant does not fit this target: "
                                   + "; ".join(dict.fromkeys(problems)))  # each once
    rope = text.get("rope_parameters") or {}
    full, sliding = rope.get("full_attention") or {}, rope.get("sliding_attention") or {}
    partial = (full.get("partial_rotary_factor", 1.0)
               if full.get("rope_type", "proportional") == "proportional" else 1.0)
    ordered = bool(raw.get("use_ordered_embeddings", False))
    centroids = int(raw.get("num_centroids", 2048))
    return DrafterConfig(
        target_hidden=backbone, vocab_size=vocab, head_dim=head_dim,
        target_kv_heads=kv_heads[0], target_layers=tuple(layers),
        layer_is_global=tuple(kind == "full_attention" for kind in kinds),
        d_draft=int(_text_value(text, "hidden_size", 256)), num_heads=heads,
        intermediate_size=int(_text_value(text, "intermediate_size", 2048)),
        sliding_window=int(_text_value(text, "sliding_window", 512)) + WINDOW_SHIFT,
        rope_theta_local=float(sliding.get("rope_theta", 10_000.0)),
        rope_theta_global=float(full.get("rope_theta", 1_000_000.0)),
        rope_scaling_factor=float(full.get("factor", 1.0)), query_scale=1.0,
        rms_norm_eps=float(_text_value(text, "rms_norm_eps", 1e-6)), constant_positions=True,
        head="clustered" if ordered else "full", num_clusters=centroids if ordered else 1,
        top_clusters=int(raw.get("centroid_intermediate_top_k", 32)) if ordered else 1,
        frequency_vocab=min(16_384, vocab), target_name=target.config.name,
        target_hash=weights_hash, layer_head_dims=tuple(dims), layer_kv_heads=tuple(kv_heads),
        layer_scalars=tuple(1.0 for _ in kinds), norm_offset=0.0, out_norm=False,
        lm_head_source="draft", rope_partial_global=float(partial),
    )


def new_assistant_config(target, weights_hash: str = "", d_draft: int = 256, num_layers: int = 4,
                         num_heads: int = 4, intermediate_size: int = 2048, head: str = "clustered",
                         num_centroids: int = 2048, top_centroids: int = 32) -> DrafterConfig:
    """The config of a new head in the assistant layout for a Gemma 4 ``target`` (native or HF).

    It writes the ``config.json`` an assistant of these sizes would have (layers sliding, the last
    global; head sizes, window, rotary and norm eps from the target) and reads it with
    ``assistant_config``, exactly as ``load_assistant`` reads Google's: so a head trained from it
    saves with ``save_assistant`` and loads back, here or in transformers, unchanged."""
    text = _target_text(target)
    if not text["model_type"].startswith("gemma4"):
        raise DrafterMismatchError(f"the gemma4-assistant layout needs a Gemma 4 target; "
                                   f"{target.config.name} is {text['model_type'] or 'not one'}")
    vocab = target.config.vocab_size
    if head not in ("clustered", "full"):
        raise DrafterMismatchError(f"an assistant's LM head is clustered or full, not {head!r}")
    if head == "clustered" and vocab % num_centroids:
        raise DrafterMismatchError(f"{num_centroids} clusters do not divide the target's "
                                   f"vocabulary of {vocab}")
    if head == "clustered" and not 0 < top_centroids <= num_centroids:
        raise DrafterMismatchError(f"top clusters {top_centroids} not in 1..{num_centroids}")
    producers = producer_layers(target)
    dim_of = {kind: _kv_shape(target, layer)[1] for kind, layer in producers.items()}
    raw = {"backbone_hidden_size": target.config.hidden_size,
           "use_ordered_embeddings": head == "clustered", "num_centroids": num_centroids,
           "centroid_intermediate_top_k": top_centroids,
           "text_config": {
               "vocab_size": vocab, "hidden_size": d_draft, "intermediate_size": intermediate_size,
               "num_hidden_layers": num_layers, "num_attention_heads": num_heads,
               "head_dim": dim_of.get("sliding_attention", target.config.head_dim),
               "global_head_dim": dim_of.get("full_attention", target.config.head_dim),
               "layer_types": ["sliding_attention"] * (num_layers - 1) + ["full_attention"],
               "sliding_window": text["sliding_window"], "rms_norm_eps": text["rms_norm_eps"],
               "rope_parameters": text["rope_parameters"]}}
    return assistant_config(raw, target, weights_hash)


def _target_text(target) -> dict:
    """What a new assistant copies from its target's text config: model type, window, norm eps,
    rotary parameters; from transformers' config (an ``HFModel``) or from our ``ModelConfig``."""
    text = getattr(target, "text_config", None)
    if text is not None:
        return {"model_type": str(getattr(text, "model_type", "") or ""),
                "sliding_window": getattr(text, "sliding_window", None),
                "rms_norm_eps": getattr(text, "rms_norm_eps", None),
                "rope_parameters": dict(getattr(text, "rope_parameters", None) or {})}
    config = target.config
    if getattr(config, "family", "") != "gemma4":
        return {"model_type": str(getattr(config, "family", "") or "")}
    return {"model_type": "gemma4_text", "sliding_window": config.sliding_window,
            "rms_norm_eps": config.rms_norm_eps,
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": config.rope_theta_local},
                "full_attention": {"rope_type": "proportional", "rope_theta": config.rope_theta_global,
                                   "partial_rotary_factor": config.rope_partial_global,
                                   "factor": config.rope_scaling_factor}}}


def init_own_lm_head(head: MTPHead, target_embedding: torch.Tensor, seed: int = 0) -> None:
    """Start a new assistant's own LM head from the target's: the embedding ``[V, d_draft]`` is
    the target's tied embedding ``[V, d]`` projected on its top ``d_draft`` principal directions
    (rows of RMS ``d_draft ** -0.5``), and a clustered head's token ordering and centroids are
    balanced k-means over those rows."""
    from mtpspec.drafter.clusters import balanced_kmeans

    cfg = head.cfg
    rows = target_embedding.detach().float()  # [V, d]
    _, vectors = torch.linalg.eigh(rows.T @ rows)  # ascending eigenvalues; vectors [d, d]
    basis = vectors.flip(-1)[:, :cfg.d_draft]  # [d, q] the top principal directions
    projected = torch.zeros(cfg.vocab_size, cfg.d_draft, device=rows.device)
    projected[:, :basis.shape[1]] = rows @ basis
    projected *= cfg.d_draft ** -0.5 / projected.pow(2).mean().sqrt().clamp(min=1e-12)
    with torch.no_grad():
        head.embedding.copy_(projected)
    if cfg.head == "clustered":
        ordering, centroids = balanced_kmeans(projected, cfg.num_clusters, seed=seed)
        head.init_from_kmeans(ordering, centroids)


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise DrafterMismatchError(f"{folder}: no *.safetensors weight files")
    tensors = {}
    for file in files:
        tensors.update(load_file(str(file)))
    return {name: value.float() if value.is_floating_point() else value
            for name, value in tensors.items()}


def load_assistant(folder: str | Path, target, weights_hash: str = "") -> MTPHead:
    """An ``MTPHead`` from a ``Gemma4AssistantForCausalLM`` folder, for ``target``."""
    folder = Path(folder)
    raw = json.loads((folder / "config.json").read_text())
    cfg = assistant_config(raw, target, weights_hash)
    tensors = _read_tensors(folder)
    get = tensors.__getitem__
    embedding = tensors.get("model.embed_tokens.weight", tensors.get("lm_head.weight"))
    state = {"pre_projection.weight": get("pre_projection.weight"),
             "post_projection.weight": get("post_projection.weight"),
             "norm.weight": get("model.norm.weight"), "embedding": embedding}
    scalars = []
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        for ours, theirs in _LAYER_NAMES:
            state[dst + ours + ".weight"] = get(src + theirs + ".weight")
        state[dst + "gate_up.weight"] = torch.cat([get(src + "mlp.gate_proj.weight"),
                                                   get(src + "mlp.up_proj.weight")])
        scalar = tensors.get(src + "layer_scalar")
        scalars.append(float(scalar.flatten()[0]) if scalar is not None else 1.0)
    if cfg.head == "clustered":
        state["centroids"] = get("masked_embedding.centroids.weight")
        state["token_ordering"] = get("masked_embedding.token_ordering").long()
    from dataclasses import replace

    head = MTPHead(replace(cfg, layer_scalars=tuple(scalars)))
    defaults = head.state_dict()
    for name in ("out_norm.weight", "frequent_tokens", "token_ordering", "centroids"):
        state.setdefault(name, defaults[name])
    head.load_state_dict(state)
    check_token_ordering(head, folder)
    return head.eval()


def save_assistant(head: MTPHead, folder: str | Path, dtype: torch.dtype = torch.float32) -> None:
    """Write ``head`` (a Gemma 4 layout head) as a ``Gemma4AssistantForCausalLM`` folder."""
    from safetensors.torch import save_file

    cfg = head.cfg
    if not (cfg.lm_head_source == "draft" and cfg.norm_offset == 0.0 and not cfg.out_norm
            and cfg.query_scale == 1.0 and cfg.constant_positions):
        raise ValueError("only a head in the Gemma 4 assistant layout can be saved as one "
                         "(own LM head, stored norm scales, no out_norm, unscaled attention)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kinds = ["full_attention" if g else "sliding_attention" for g in cfg.layer_is_global]
    global_dims = [cfg.head_dim_of(i) for i, g in enumerate(cfg.layer_is_global) if g]
    sliding_dims = [cfg.head_dim_of(i) for i, g in enumerate(cfg.layer_is_global) if not g]
    text = {
        "model_type": "gemma4_text", "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_draft,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": next((cfg.kv_heads_of(i) for i, g in enumerate(cfg.layer_is_global)
                                     if not g), cfg.target_kv_heads),
        "head_dim": sliding_dims[0] if sliding_dims else cfg.head_dim,
        "global_head_dim": global_dims[0] if global_dims else cfg.head_dim,
        "layer_types": kinds, "sliding_window": cfg.sliding_window - WINDOW_SHIFT,
        "rms_norm_eps": cfg.rms_norm_eps, "hidden_activation": "gelu_pytorch_tanh",
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_theta_local},
            "full_attention": {"rope_type": "proportional", "rope_theta": cfg.rope_theta_global,
                               "partial_rotary_factor": cfg.rope_partial_global,
                               **({"factor": cfg.rope_scaling_factor}
                                  if cfg.rope_scaling_factor != 1.0 else {})},
        },
        "hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 0,
        "num_kv_shared_layers": cfg.num_layers, "tie_word_embeddings": True,
    }
    global_kv = [cfg.kv_heads_of(i) for i, g in enumerate(cfg.layer_is_global) if g]
    overrides = {"head_dim": text["global_head_dim"]}
    if global_kv and global_kv[0] != text["num_key_value_heads"]:
        text["num_global_key_value_heads"] = global_kv[0]
        text["attention_k_eq_v"] = True
        overrides["num_key_value_heads"] = global_kv[0]
    text["per_layer_config"] = {str(i): overrides for i, kind in enumerate(kinds)
                                if kind == "full_attention"}
    ordered = cfg.head == "clustered"
    raw = {"model_type": MODEL_TYPE, "architectures": ["Gemma4AssistantForCausalLM"],
           "text_config": text, "backbone_hidden_size": cfg.target_hidden,
           "use_ordered_embeddings": ordered, "num_centroids": cfg.num_clusters,
           "centroid_intermediate_top_k": cfg.top_clusters, "tie_word_embeddings": True,
           "dtype": str(dtype).removeprefix("torch."),
           "mtpspec": {"target_name": cfg.target_name, "target_hash": cfg.target_hash}}
    state = {name: value.detach().cpu() for name, value in head.state_dict().items()}
    out = {"pre_projection.weight": state["pre_projection.weight"],
           "post_projection.weight": state["post_projection.weight"],
           "model.norm.weight": state["norm.weight"],
           "model.embed_tokens.weight": state["embedding"]}
    for i in range(cfg.num_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        for ours, theirs in _LAYER_NAMES:
            out[dst + theirs + ".weight"] = state[src + ours + ".weight"]
        gate, up = state[src + "gate_up.weight"].chunk(2)
        out[dst + "mlp.gate_proj.weight"], out[dst + "mlp.up_proj.weight"] = gate, up
        out[dst + "layer_scalar"] = torch.tensor([cfg.layer_scalars[i] if cfg.layer_scalars
                                                  else 1.0])
    if ordered:
        out["masked_embedding.centroids.weight"] = state["centroids"]
        out["masked_embedding.token_ordering"] = state["token_ordering"]
    out = {name: (value.to(dtype) if value.is_floating_point() else value).contiguous()
           for name, value in out.items()}
    save_file(out, str(folder / WEIGHTS), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(raw, indent=1))
