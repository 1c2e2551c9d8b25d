"""A loaded target: the native model, its tokenizer, and where they came from.

``load_target(path, weights)`` is the one entry point the CLI, benchmark and server use. The
tokenizer and chat template always come from the same source as the weights.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mtpspec.config import ModelConfig
from mtpspec.loading import ModelLoadError, cache_root, load_weights
from mtpspec.models.gemma3 import Gemma3Model
from mtpspec.ops import FORMATS
from mtpspec.tokenizer import Tokenizer, load_tokenizer_gguf, load_tokenizer_hf


@dataclass
class Target:
    model: Gemma3Model
    tokenizer: Tokenizer | None
    config: ModelConfig
    source: Path
    weights_hash: str
    weight_format: str
    load_s: float

    @property
    def name(self) -> str:
        return self.source.name


def configure_threads() -> None:
    """Use every core for intra-op work; small-M products pick their own kernels in ``ops``."""
    torch.set_num_threads(max(1, torch.get_num_threads()))


def load_target(path: str | Path | None = None, weights: str = "fp32",
                with_tokenizer: bool = True) -> Target:
    """Load a target from a GGUF file, a Hugging Face folder, or (None) the embedded default."""
    if weights not in FORMATS:
        raise ModelLoadError(f"unknown weight format {weights!r}; choose one of {', '.join(FORMATS)}")
    start = time.perf_counter()
    loaded = load_weights(path)
    model = Gemma3Model(loaded.config, loaded.tensors, weights)
    tokenizer = None
    if with_tokenizer:
        if loaded.source.is_dir():
            tokenizer = load_tokenizer_hf(loaded.source)
        else:
            tokenizer = load_tokenizer_gguf(loaded.source, cache_root() / loaded.weights_hash[:24])
    return Target(model=model, tokenizer=tokenizer, config=loaded.config, source=loaded.source,
                  weights_hash=loaded.weights_hash, weight_format=weights,
                  load_s=time.perf_counter() - start)
