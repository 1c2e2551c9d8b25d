"""The decoder families the native engine runs, as data: how each reads into one ``ModelConfig``.

A family is a row of ``FAMILIES``: the GGUF ``general.architecture`` names and Hugging Face
``model_type`` names it answers to, its architecture fields (``config.ModelConfig``), and the two
quirks of llama.cpp's GGUF conversion that loading must undo (Gemma's RMSNorm weights stored as
``1 + w``; Llama's q/k rows permuted for llama.cpp's interleaved rotary). ``config_from_gguf``
and ``config_from_hf`` read the shape and hyper-parameters every family shares and apply the row.
Adding a family is a row plus a parity test, not new model code. Gemma 4 text (``gemma4_text``
folders, and the text part of ``gemma4`` multimodal ones) adds its own fields from the config
(``_gemma4_fields``); its mixture-of-experts variant and GGUF files are refused (see there).

Must not: hold weights or model code; guess silently: an architecture or option it cannot run is
a ``ModelLoadError`` naming what is supported and the transformers fallback (``--backend hf``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from mtpspec.config import ModelConfig, RopeScaling
from mtpspec.tokenizer import END_OF_TURN_TOKENS

FALLBACK_HINT = "run it through transformers instead with --backend hf (an HF folder)"


class ModelLoadError(ValueError):
    """A model path that cannot be loaded; the message says why in one line."""


@dataclass(frozen=True)
class Family:
    name: str
    gguf_archs: tuple[str, ...]
    hf_types: tuple[str, ...]
    arch: dict = field(default_factory=dict)  # ModelConfig architecture fields
    gguf_norm_plus_one: bool = False  # llama.cpp stores RMSNorm weights as 1 + w
    gguf_permuted_qk: bool = False    # llama.cpp permuted q/k rows for interleaved rotary
    default_sliding: str = "none"     # "none", "all" (Mistral), "alternate" (Gemma 2), "pattern"


_LLAMA_ARCH = dict(norm_offset=0.0, sandwich_norms=False, qk_norm=False, mlp_activation="silu",
                   scale_embeddings=False, rope_scaling_local=True)
_GEMMA_ARCH = dict(norm_offset=1.0, sandwich_norms=True, mlp_activation="gelu_tanh",
                   scale_embeddings=True, rope_scaling_local=True)

FAMILIES = (
    Family("llama", ("llama",), ("llama",), dict(_LLAMA_ARCH), gguf_permuted_qk=True),
    Family("mistral", ("mistral",), ("mistral",), dict(_LLAMA_ARCH), gguf_permuted_qk=True,
           default_sliding="all"),
    Family("qwen2", ("qwen2",), ("qwen2",), dict(_LLAMA_ARCH, qkv_bias=True)),
    Family("qwen3", ("qwen3",), ("qwen3",), dict(_LLAMA_ARCH, qk_norm=True)),
    Family("gemma2", ("gemma2",), ("gemma2",), dict(_GEMMA_ARCH, qk_norm=False),
           gguf_norm_plus_one=True, default_sliding="alternate"),
    Family("gemma3", ("gemma3",), ("gemma3", "gemma3_text"),
           dict(_GEMMA_ARCH, qk_norm=True, rope_scaling_local=False),
           gguf_norm_plus_one=True, default_sliding="pattern"),
    # Gemma 4: RMSNorm scales are w itself, q/k norms do the attention scaling (scale 1.0), values
    # are normed without a scale; no GGUF architecture (refused in family_for_gguf)
    Family("gemma4", (), ("gemma4", "gemma4_text"),
           dict(_GEMMA_ARCH, norm_offset=0.0, qk_norm=True, rope_scaling_local=False,
                attention_scale=1.0, value_norm=True, layer_scalar=True)),
)

GEMMA4_GGUF_HINT = ("Gemma 4 GGUF files are not supported natively (llama.cpp's gemma4 tensor "
                    "layout is not mapped here); load the model's Hugging Face folder "
                    "(safetensors) instead, natively or with --backend hf")


def supported() -> str:
    return ", ".join(f.name for f in FAMILIES)


def family_for_gguf(arch: object) -> Family:
    if str(arch).startswith("gemma4"):
        raise ModelLoadError(GEMMA4_GGUF_HINT)
    for family in FAMILIES:
        if arch in family.gguf_archs:
            return family
    raise ModelLoadError(f"GGUF architecture {arch!r} is not supported natively (supported: "
                         f"{supported()}); {FALLBACK_HINT}")


def family_for_hf(model_type: str) -> Family | None:
    """The family of an HF ``model_type``, or None (no native implementation)."""
    return next((f for f in FAMILIES if model_type in f.hf_types), None)


def _layer_types(family: Family, num_layers: int, window: int | None,
                 explicit: list | None = None, pattern: int = 6) -> tuple[str, ...]:
    """"global"/"sliding" per layer from an explicit list or the family's rule."""
    if explicit:
        return tuple("sliding" if kind == "sliding_attention" else "global" for kind in explicit)
    if not window or family.default_sliding == "none":
        return ("global",) * num_layers
    if family.default_sliding == "all":
        return ("sliding",) * num_layers
    if family.default_sliding == "alternate":  # Gemma 2: even layers slide
        return tuple("sliding" if i % 2 == 0 else "global" for i in range(num_layers))
    return tuple("global" if (i + 1) % pattern == 0 else "sliding" for i in range(num_layers))


def _gemma2_query_scalar(hidden: int, heads: int, head_dim: int, layers: int) -> float:
    """Gemma 2 27B scales queries by (hidden / heads) ** -0.5, the smaller ones by head_dim's."""
    return float(hidden // heads) if layers == 46 else float(head_dim)


def config_from_gguf(meta: dict, tensor_names: list[str] = (),
                     rope_freqs: list[float] | None = None) -> ModelConfig:
    """A ModelConfig from GGUF metadata and tensor names (``gguf_file.read_gguf_header``).

    The head is untied when the file has an ``output.weight``. rope_freqs: the
    ``rope_freqs.weight`` tensor (Llama 3.1's per-frequency divisors), if any.
    """
    family = family_for_gguf(meta.get("general.architecture"))
    arch = meta["general.architecture"]

    def get(name, default=None):
        return meta.get(f"{arch}.{name}", default)

    try:
        hidden = int(get("embedding_length"))
        heads = int(get("attention.head_count"))
        layers = int(get("block_count"))
        inter = int(get("feed_forward_length"))
    except (TypeError, ValueError) as err:
        raise ModelLoadError(f"GGUF metadata lacks the {arch} shape keys ({err})") from err
    if isinstance(meta.get(f"{arch}.attention.head_count_kv"), list):
        raise ModelLoadError("per-layer head counts are not supported natively; " + FALLBACK_HINT)
    head_dim = int(get("attention.key_length", hidden // heads))
    tokens = meta.get("tokenizer.ggml.tokens")
    window = get("attention.sliding_window")
    theta = float(get("rope.freq_base", 10_000.0 if family.name != "gemma3" else 1_000_000.0))
    scaling = None
    if rope_freqs is not None:
        scaling = RopeScaling("table", divisors=tuple(float(x) for x in rope_freqs))
    elif get("rope.scaling.type") in ("linear",) and float(get("rope.scaling.factor", 1.0) or 1.0) != 1:
        scaling = RopeScaling("linear", float(get("rope.scaling.factor")))
    elif get("rope.scaling.type") not in (None, "none", "linear"):
        raise ModelLoadError(f"rope scaling {get('rope.scaling.type')!r} is not supported natively; "
                             + FALLBACK_HINT)
    query_scalar = float(head_dim)
    if family.name == "gemma2":
        query_scalar = _gemma2_query_scalar(hidden, heads, head_dim, layers)
    eos = [meta.get("tokenizer.ggml.eos_token_id")]
    eos += [i for i, token in enumerate(tokens or ()) if token in END_OF_TURN_TOKENS]
    arch_fields = dict(family.arch)
    arch_fields["tie_word_embeddings"] = "output.weight" not in tensor_names
    return ModelConfig(
        vocab_size=len(tokens) if tokens is not None else int(get("vocab_size")),
        hidden_size=hidden, intermediate_size=inter, num_layers=layers, num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)), head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta_global=theta,
        rope_theta_local=10_000.0 if family.name == "gemma3" else theta,
        rope_scaling_factor=(float(get("rope.scaling.factor", 1.0) or 1.0)
                             if family.name == "gemma3" else 1.0),
        rope_scaling=scaling if family.name != "gemma3" else None,
        sliding_window=int(window or (512 if family.name == "gemma3" else 1 << 30)),
        query_pre_attn_scalar=query_scalar,
        max_position_embeddings=int(get("context_length", 32_768)),
        bos_token_id=int(meta.get("tokenizer.ggml.bos_token_id", 2) or 0),
        eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
        pad_token_id=int(meta.get("tokenizer.ggml.padding_token_id", 0) or 0),
        name=str(meta.get("general.name", family.name)),
        layer_types=_layer_types(family, layers, window if family.name != "gemma3" else 512),
        family=family.name,
        attn_logit_softcap=float(get("attn_logit_softcapping", 0.0) or 0.0),
        final_logit_softcap=float(get("final_logit_softcapping", 0.0) or 0.0),
        **arch_fields,
    )


def _rope_of(text: dict, kind: str) -> dict:
    """Rotary parameters of one layer type from a transformers 4.x or 5.x config."""
    params = text.get("rope_parameters") or {}
    if isinstance(params.get(kind), dict):
        return params[kind]
    legacy = dict(text.get("rope_scaling") or {})
    if "rope_theta" in text:
        legacy.setdefault("rope_theta", text["rope_theta"])
    return {**legacy, **{k: v for k, v in params.items() if not isinstance(v, dict)}}


def _hf_scaling(rope: dict) -> RopeScaling | None:
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind == "default":
        return None
    if kind == "linear":
        return RopeScaling("linear", float(rope["factor"]))
    if kind == "llama3":
        return RopeScaling("llama3", float(rope["factor"]), float(rope["low_freq_factor"]),
                           float(rope["high_freq_factor"]),
                           int(rope["original_max_position_embeddings"]))
    raise ModelLoadError(f"rope scaling {kind!r} is not supported natively; {FALLBACK_HINT}")


def config_from_hf(raw: dict) -> ModelConfig:
    """A ModelConfig from a ``config.json`` (the text part of a multimodal one too)."""
    text = raw.get("text_config") or raw
    model_type = str(text.get("model_type") or raw.get("model_type") or "")
    family = family_for_hf(model_type)
    if family is None:
        raise ModelLoadError(f"model_type {model_type!r} has no native implementation (supported: "
                             f"{supported()}); it runs through transformers")
    heads = int(text["num_attention_heads"])
    hidden = int(text["hidden_size"])
    layers = int(text["num_hidden_layers"])
    head_dim = int(text.get("head_dim") or hidden // heads)
    if family.name in ("qwen2", "qwen3") and text.get("use_sliding_window") and not text.get(
            "layer_types"):
        # which layers slide (``max_window_layers``) changed meaning across transformers
        # versions; only an explicit ``layer_types`` (transformers 5) says it unambiguously
        raise ModelLoadError(f"{model_type} with use_sliding_window and no layer_types is not "
                             "supported natively; " + FALLBACK_HINT)
    global_rope = _rope_of(text, "full_attention")
    local_rope = _rope_of(text, "sliding_attention")
    theta_global = float(global_rope.get("rope_theta") or text.get("rope_theta") or 10_000.0)
    theta_local = float(text.get("rope_local_base_freq") or local_rope.get("rope_theta")
                        or (10_000.0 if family.name == "gemma3" else theta_global))
    scaling = _hf_scaling(global_rope) if family.name != "gemma4" else None
    window = text.get("sliding_window")
    eos = text.get("eos_token_id", raw.get("eos_token_id"))
    eos_ids = tuple(eos) if isinstance(eos, list) else ((int(eos),) if eos is not None else ())
    query_scalar = text.get("query_pre_attn_scalar") or head_dim
    arch_fields = dict(family.arch)
    tied_default = raw.get("tie_word_embeddings", family.name.startswith("gemma"))
    arch_fields["tie_word_embeddings"] = bool(text.get("tie_word_embeddings", tied_default))
    shape_fields = {}
    if family.name == "gemma4":
        shape_fields = _gemma4_fields(text, layers)
        window = text.get("sliding_window") or 512
    fields = dict(
        vocab_size=int(text["vocab_size"]), hidden_size=hidden,
        intermediate_size=int(text["intermediate_size"]), num_layers=layers, num_heads=heads,
        num_kv_heads=int(text.get("num_key_value_heads") or heads), head_dim=head_dim,
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        rope_theta_global=theta_global, rope_theta_local=theta_local,
        rope_scaling_factor=scaling.factor if scaling and scaling.kind == "linear" else 1.0,
        rope_scaling=scaling if scaling and scaling.kind != "linear" else None,
        sliding_window=int(window or (512 if family.name == "gemma3" else 1 << 30)),
        sliding_window_pattern=int(text.get("sliding_window_pattern") or 6),
        query_pre_attn_scalar=float(query_scalar),
        max_position_embeddings=int(text.get("max_position_embeddings", 32_768)),
        bos_token_id=int(text.get("bos_token_id", raw.get("bos_token_id", 2)) or 0),
        eos_token_ids=eos_ids, pad_token_id=int(text.get("pad_token_id", 0) or 0),
        name=str(raw.get("_name_or_path") or model_type),
        layer_types=_layer_types(family, layers, window if family.name != "gemma3" else 512,
                                 text.get("layer_types"), int(text.get("sliding_window_pattern") or 6)),
        family=family.name,
        # transformers' Gemma 3 reads attn_logit_softcapping but never applies it (nor does
        # llama.cpp), so it is not ours to apply either
        attn_logit_softcap=(float(text.get("attn_logit_softcapping") or 0.0)
                            if family.name != "gemma3" else 0.0),
        final_logit_softcap=float(text.get("final_logit_softcapping") or 0.0),
        **arch_fields,
    )
    fields.update(shape_fields)
    return ModelConfig(**fields)


def _gemma4_fields(text: dict, layers: int) -> dict:
    """The Gemma 4 text fields of a ``config.json``'s text part (transformers 5.x layout: the
    global layers' head size and kv heads as ``per_layer_config`` overrides, or the older
    ``global_head_dim`` / ``num_global_key_value_heads`` keys, with transformers' defaults)."""
    if text.get("enable_moe_block"):
        raise ModelLoadError("Gemma 4 mixture-of-experts (enable_moe_block) is not supported "
                             "natively; " + FALLBACK_HINT)
    if text.get("use_bidirectional_attention") == "all":
        raise ModelLoadError("Gemma 4 with bidirectional attention is not supported natively; "
                             + FALLBACK_HINT)
    if text.get("attention_bias"):
        raise ModelLoadError("Gemma 4 with attention biases is not supported natively; "
                             + FALLBACK_HINT)
    activation = text.get("hidden_activation") or "gelu_pytorch_tanh"
    if activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ModelLoadError(f"Gemma 4 activation {activation!r} is not supported natively; "
                             + FALLBACK_HINT)
    kinds = list(text.get("layer_types") or [
        "sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(layers)])
    kinds[-1] = "full_attention"  # as transformers forces
    layer_types = tuple("sliding" if kind == "sliding_attention" else "global" for kind in kinds)
    k_eq_v = bool(text.get("attention_k_eq_v", False))
    global_dim = int(text.get("global_head_dim") or 512)
    global_kv = int(text.get("num_global_key_value_heads") or 0) if k_eq_v else 0
    overrides = text.get("per_layer_config")
    if overrides is not None:
        by_layer = {int(i): dict(v or {}) for i, v in overrides.items()}
        sliding = {tuple(sorted(by_layer.get(i, {}).items()))
                   for i, kind in enumerate(layer_types) if kind == "sliding"}
        full = {tuple(sorted(by_layer.get(i, {}).items()))
                for i, kind in enumerate(layer_types) if kind == "global"}
        keys = {key for entry in full for key, _ in entry}
        if sliding - {()} or len(full) > 1 or keys - {"head_dim", "num_key_value_heads"}:
            raise ModelLoadError("Gemma 4 per-layer overrides other than one head size and kv head "
                                 "count for every global layer are not supported natively; "
                                 + FALLBACK_HINT)
        chosen = dict(next(iter(full), ()))
        global_dim = int(chosen.get("head_dim") or text.get("head_dim") or 256)
        global_kv = int(chosen.get("num_key_value_heads") or 0)
    rope = text.get("rope_parameters") or {}
    full_rope = rope.get("full_attention") or {"rope_type": "proportional",
                                               "partial_rotary_factor": 0.25}
    local_rope = rope.get("sliding_attention") or {"rope_type": "default"}
    full_type = full_rope.get("rope_type", "default")
    if full_type not in ("default", "proportional") or local_rope.get("rope_type",
                                                                      "default") != "default":
        raise ModelLoadError(f"Gemma 4 rope {full_type!r} is not supported natively; "
                             + FALLBACK_HINT)
    proportional = full_type == "proportional"
    return dict(
        layer_types=layer_types, global_head_dim=global_dim, global_num_kv_heads=global_kv,
        attention_k_eq_v=k_eq_v,
        rope_theta_global=float(full_rope.get("rope_theta") or 1_000_000.0),
        rope_theta_local=float(local_rope.get("rope_theta") or 10_000.0),
        rope_scaling_factor=float(full_rope.get("factor", 1.0)) if proportional else 1.0,
        rope_partial_global=float(full_rope.get("partial_rotary_factor", 1.0)) if proportional else 1.0,
        num_kv_shared_layers=int(text.get("num_kv_shared_layers") or 0),
        double_wide_mlp=bool(text.get("use_double_wide_mlp", False)),
        per_layer_input_size=int(text.get("hidden_size_per_layer_input", 256) or 0),
        per_layer_vocab_size=int(text.get("vocab_size_per_layer_input", 262_144) or 0),
        query_pre_attn_scalar=1.0,
    )
