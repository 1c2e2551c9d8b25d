"""Packed models stored as data: safetensors plus a JSON header, never a pickle.

The first start dequantizes a GGUF (or reads an HF folder) and packs every linear layer into the
chosen format (seconds to tens of seconds); ``save_packed`` writes the packed tensors of each layer
(``<module>.packed``, ``<module>.scales``) and the model's small float tensors (norms, biases,
under their Hugging Face names) to one safetensors file whose metadata holds a JSON header: the
format version, the source's weights hash, the weight format, the ``ModelConfig`` and each packed
layer's layout (out, in, format, group size). ``load_packed`` checks all of it and rebuilds the
model from those tensors without repacking; anything that does not match (another version, source
or format, a missing tensor, a wrong shape) is a ``StoreMismatch``, and the caller rebuilds.

Must not: unpickle anything, or trust a file it did not check.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mtpspec.config import ModelConfig, RopeScaling
from mtpspec.models.decoder import DecoderModel, expected_shapes, linear_shapes
from mtpspec.ops import PackedLinear

STORE_FORMAT = 1  # bump when the packed layout or this file's layout changes
HEADER_KEY = "mtpspec"


class StoreMismatch(ValueError):
    """A stored model that cannot be used for this source/format (rebuild it)."""


def _config_json(config: ModelConfig) -> dict:
    return dataclasses.asdict(config)


def _config_from_json(raw: dict) -> ModelConfig:
    raw = dict(raw)
    if raw.get("rope_scaling") is not None:
        scaling = dict(raw["rope_scaling"])
        scaling["divisors"] = tuple(scaling.get("divisors", ()))
        raw["rope_scaling"] = RopeScaling(**scaling)
    for key in ("eos_token_ids", "layer_types"):
        raw[key] = tuple(raw.get(key, ()))
    return ModelConfig(**raw)


def _small_tensor_names(config: ModelConfig) -> list[str]:
    """The float tensors a model keeps as they are (norm scales, biases): the 1-D ones."""
    return [name for name, shape in expected_shapes(config).items() if len(shape) == 1]


def save_packed(model: DecoderModel, weights: dict[str, torch.Tensor], path: Path,
                source_hash: str) -> None:
    """Write ``model`` (built from ``weights``) to ``path`` atomically."""
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, list] = {}
    for name, module in model.named_modules(remove_duplicate=True):
        if isinstance(module, PackedLinear):
            tensors[name + ".packed"] = module.packed.contiguous()
            tensors[name + ".scales"] = module.scales.contiguous()
            layers[name] = [module.out_features, module.in_features, module.fmt, module.group_size]
    for name in _small_tensor_names(model.config):
        tensors[name] = weights[name].float().contiguous()
    header = {"format": STORE_FORMAT, "source": source_hash, "weights": model.weight_format,
              "config": _config_json(model.config), "layers": layers}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={HEADER_KEY: json.dumps(header)})
    tmp.replace(path)


def read_header(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(HEADER_KEY)
    except (SafetensorError, OSError) as err:
        raise StoreMismatch(f"{path.name}: unreadable ({err})") from err
    if raw is None:
        raise StoreMismatch(f"{path.name}: no mtpspec header")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as err:
        raise StoreMismatch(f"{path.name}: bad header ({err})") from err


def _layout_ok(packed: torch.Tensor, scales: torch.Tensor, out_features: int, in_features: int,
               fmt: str, group: int) -> bool:
    """Whether stored tensors have the shapes and dtypes ``PackedLinear`` packs for this layer."""
    panels = -(-out_features // 16)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8, "int4": torch.uint8}
    if fmt not in dtypes or packed.dtype != dtypes[fmt]:
        return False
    if fmt == "int4":
        groups = -(-in_features // group) if group > 0 else -1
        return (tuple(packed.shape) == (panels, in_features, 8)
                and tuple(scales.shape) == (panels, groups, 2, 16) and scales.dtype == torch.float16)
    if tuple(packed.shape) != (panels, in_features, 16):
        return False
    return tuple(scales.shape) == ((panels * 16,) if fmt == "int8" else (0,))


def load_packed(path: Path, source_hash: str, weight_format: str,
                config: ModelConfig | None = None) -> DecoderModel:
    """The model stored at ``path``, checked against the source hash and format it must have,
    and against ``config`` when given (an HF folder's ``config.json`` is not in its weights hash,
    so the same weights under an edited config must not come back with the stored config)."""
    header = read_header(path)
    if header.get("format") != STORE_FORMAT:
        raise StoreMismatch(f"{path.name}: store format {header.get('format')} != {STORE_FORMAT}")
    if header.get("source") != source_hash or header.get("weights") != weight_format:
        raise StoreMismatch(f"{path.name}: built from another source or format")
    try:
        stored_config = _config_from_json(header["config"])
        tensors = load_file(str(path))
    except (KeyError, TypeError, ValueError, SafetensorError, OSError) as err:
        raise StoreMismatch(f"{path.name}: {err}") from err
    if config is not None and stored_config != config:
        raise StoreMismatch(f"{path.name}: built under another configuration")
    config = stored_config
    prebuilt = {}
    wanted = linear_shapes(config)
    for name, (out_features, in_features, fmt, group) in header.get("layers", {}).items():
        if fmt != weight_format or name + ".packed" not in tensors or name not in wanted:
            raise StoreMismatch(f"{path.name}: layer {name} unknown, missing or in format {fmt}")
        packed, scales = tensors[name + ".packed"], tensors[name + ".scales"]
        if (out_features, in_features) != wanted[name] or not _layout_ok(
                packed, scales, out_features, in_features, fmt, group):
            raise StoreMismatch(f"{path.name}: layer {name} has the wrong shape")
        prebuilt[name] = PackedLinear(packed, scales, int(out_features), int(in_features), fmt,
                                      int(group))
    shapes = expected_shapes(config)
    for name in _small_tensor_names(config):
        if name not in tensors or tuple(tensors[name].shape) != shapes[name]:
            raise StoreMismatch(f"{path.name}: tensor {name} missing or misshapen")
    try:
        return DecoderModel(config, tensors, weight_format, prebuilt=prebuilt)
    except KeyError as err:  # a layer the header did not list
        raise StoreMismatch(f"{path.name}: layer {err} missing") from err
