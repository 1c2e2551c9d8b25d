"""Drafter checkpoints: ``drafter.safetensors`` + ``drafter.json`` naming the target it belongs to.

A drafter reads the target's activations and KV cache, so it is only valid for the exact target it
was trained on: the JSON holds the target's name and the sha256 of its weights, and loading it onto
any other target is refused with a message naming the mismatch.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from mtpspec.drafter.head import DrafterConfig, MTPHead

WEIGHTS, CONFIG = "drafter.safetensors", "drafter.json"
SHARD_BYTES = 12 << 20  # keep each weight file small enough to move and review easily


class DrafterMismatchError(ValueError):
    """A drafter that does not fit the target it is paired with."""


def save_drafter(head: MTPHead, folder: Path, extra: dict | None = None,
                 dtype: torch.dtype = torch.bfloat16) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, value in head.state_dict().items():
        value = value.detach().cpu().contiguous()
        tensors[name] = value.to(dtype) if value.is_floating_point() else value
    for old in folder.glob("drafter*.safetensors"):
        old.unlink()
    shards, current, size = [], {}, 0
    for name, value in tensors.items():
        nbytes = value.numel() * value.element_size()
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name] = value
        size += nbytes
    shards.append(current)
    for n, shard in enumerate(shards):
        name = WEIGHTS if len(shards) == 1 else f"drafter-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name))
    meta = {"config": head.cfg.to_json(), "format": "mtpspec-drafter-1", **(extra or {})}
    (folder / CONFIG).write_text(json.dumps(meta, indent=1))


def read_config(folder: Path) -> tuple[DrafterConfig, dict]:
    path = Path(folder) / CONFIG
    if not path.exists():
        raise DrafterMismatchError(f"{folder}: no {CONFIG} (not an mtpspec drafter folder)")
    meta = json.loads(path.read_text())
    return DrafterConfig.from_json(meta["config"]), meta


def check_fits(cfg: DrafterConfig, target_config, weights_hash: str | None, kv_shape=None) -> None:
    """Refuse a drafter whose target hash, hidden size, vocabulary or layers do not fit.

    kv_shape: layer -> (kv heads, head size) for targets whose layers differ (``HFModel``): each
    draft layer's attention must fit the K/V of the target layer it reads."""
    problems = []
    if weights_hash and cfg.target_hash and cfg.target_hash != weights_hash:
        problems.append(f"it was trained for target weights {cfg.target_hash[:12]} "
                        f"({cfg.target_name}), not {weights_hash[:12]}")
    if cfg.target_hidden != target_config.hidden_size:
        problems.append(f"hidden size {cfg.target_hidden} != target's {target_config.hidden_size}")
    if cfg.vocab_size != target_config.vocab_size:
        problems.append(f"vocabulary {cfg.vocab_size} != target's {target_config.vocab_size}")
    if kv_shape is None and (cfg.head_dim != target_config.head_dim
                             or cfg.target_kv_heads != target_config.num_kv_heads):
        problems.append("attention head shape differs from the target's")
    bad = [layer for layer in cfg.target_layers if not 0 <= layer < target_config.num_layers]
    if bad:
        problems.append(f"target layers {bad} do not exist (target has {target_config.num_layers})")
    elif kv_shape is not None:
        for j, layer in enumerate(cfg.target_layers):
            heads, size = kv_shape(layer)
            if (cfg.kv_heads_of(j), cfg.head_dim_of(j)) != (heads, size):
                problems.append(f"draft layer {j} expects {cfg.kv_heads_of(j)} kv heads of size "
                                f"{cfg.head_dim_of(j)}, target layer {layer} has {heads} of size "
                                f"{size}")
    if problems:
        raise DrafterMismatchError("drafter does not fit this target: " + "; ".join(problems))


def load_drafter(folder: str | Path, target_config=None, weights_hash: str | None = None,
                 kv_shape=None) -> MTPHead:
    """Load a drafter, checking it against the target when one is given (see ``check_fits``)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg, meta = read_config(folder)
    if target_config is not None:
        check_fits(cfg, target_config, weights_hash, kv_shape)
    head = MTPHead(cfg)
    state = {}
    for file in sorted(folder.glob("drafter*.safetensors")):
        state.update(load_file(str(file)))
    state = {name: value.float() if value.is_floating_point() else value
             for name, value in state.items()}
    if "frequent_tokens" in state:
        head.frequent_tokens = state["frequent_tokens"].clone()
    head.load_state_dict(state)
    head.calibration = meta.get("calibration")  # observed acceptance per confidence (or None)
    check_token_ordering(head, folder)
    return head.eval()


def check_token_ordering(head: MTPHead, source) -> None:
    """Refuse a head whose ``token_ordering`` is not a permutation of the vocabulary: it orders
    the clustered head and the target's argmax screen, where a missing or repeated token would
    hide tokens from greedy verification."""
    from mtpspec.screen import check_ordering

    try:
        check_ordering(head.token_ordering, head.cfg.vocab_size, padded=False)
    except ValueError as err:
        raise DrafterMismatchError(f"{source}: {err}") from None
