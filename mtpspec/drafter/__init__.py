"""The MTP drafter: the head, its checkpoints, the shipped default, and training (``train``)."""
from __future__ import annotations

from pathlib import Path

from mtpspec.drafter.checkpoint import DrafterMismatchError, load_drafter, save_drafter
from mtpspec.drafter.head import DrafterConfig, MTPHead

SHIPPED = Path(__file__).parent / "shipped"


def shipped_drafter_for(weights_hash: str) -> Path | None:
    """The drafter shipped in this package for the target with these weights, if any."""
    from mtpspec.drafter.checkpoint import read_config

    if not SHIPPED.is_dir():
        return None
    for folder in sorted(p for p in SHIPPED.iterdir() if p.is_dir()):
        cfg, _ = read_config(folder)
        if cfg.target_hash == weights_hash:
            return folder
    return None


__all__ = ["DrafterConfig", "MTPHead", "DrafterMismatchError", "load_drafter", "save_drafter",
           "shipped_drafter_for", "SHIPPED"]
