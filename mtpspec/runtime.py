"""A loaded target: the native model, its tokenizer, and where they came from.

``load_target(path, weights)`` is the one entry point the CLI, benchmark and server use. The
tokenizer and chat template always come from the same source as the weights. A first start
dequantizes (GGUF) and packs the model, which takes seconds to tens of seconds: both show a
progress bar on a terminal unless ``quiet``; later starts read the packed model back.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from mtpspec.config import ModelConfig
from mtpspec.loading import LoadedWeights, ModelLoadError, cache_root, load_weights, resolve_model_path
from mtpspec import progress
from mtpspec.models.decoder import DecoderModel, linear_shapes
from mtpspec.models.hf import HFModel, is_native, load_hf_model
from mtpspec.models.store import StoreMismatch, load_packed, save_packed
from mtpspec.ops import FORMATS
from mtpspec.tokenizer import Tokenizer, load_tokenizer_gguf, load_tokenizer_hf

# The weight format the CLI, the benchmark and the server run the target in unless told otherwise:
# the fastest format whose perplexity stays close to float32's. Measured (README, "Against
# llama.cpp" and "Weight formats: speed and accuracy"; bench/vs_llamacpp.py, bench/quality.py):
# int8 decodes 2.8x faster than fp32 (80.4 vs 28.4 tok/s side by side) at +0.5% perplexity;
# int4 is slower than int8 at batch 1 (63.3 tok/s, arithmetic-bound) and +44% perplexity.
DEFAULT_WEIGHTS = "int8"


BACKENDS = ("native", "hf")


@dataclass
class Target:
    model: DecoderModel | HFModel
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
    """One torch thread: the packed kernels and the fused layer run their own thread pool over
    the cores, and torch's spinning OpenMP workers would compete with it for them (measured:
    44-52 tok/s with 2 torch threads against 66-69 with 1, int8 + MTP)."""
    torch.set_num_threads(1)


def native_model(config: ModelConfig, tensors: dict[str, torch.Tensor], fmt: str) -> DecoderModel:
    """The native model of ``config``'s family in format ``fmt`` (``dense`` for training)."""
    return DecoderModel(config, tensors, fmt)


def _source_config(loaded: LoadedWeights) -> ModelConfig | None:
    """The configuration a stored model must have been built under: an HF folder's config.json
    is not covered by its weights hash (a GGUF's metadata is, and its config read without tensors
    lacks the rope table, so None: no check)."""
    return loaded.config if loaded.source.is_dir() else None


def _stored_model(loaded: LoadedWeights, weights: str, quiet: bool = False) -> DecoderModel:
    """A native model of any family, packed once and then read back from a safetensors store."""
    stored = cache_root() / loaded.weights_hash[:24] / f"model-{weights}.safetensors"
    if stored.exists():
        try:
            return load_packed(stored, loaded.weights_hash, weights, _source_config(loaded))
        except StoreMismatch as err:
            warnings.warn(f"rebuilding the stored model: {err}")
    full = load_weights(loaded.source, quiet=quiet)
    total = sum(out * inner for out, inner in linear_shapes(full.config).values())
    with progress.bar(total, f"packing {loaded.source.name} as {weights}", "weight", quiet,
                      unit_scale=True) as packing:
        model = DecoderModel(full.config, full.tensors, weights, on_built=packing.update)
    try:
        with progress.waiting(f"storing the packed model in {stored.parent}", quiet):
            save_packed(model, full.tensors, stored, loaded.weights_hash)
    except OSError as err:
        warnings.warn(f"could not store the packed model ({err}); the next start packs it again")
    return model


def load_tokenizer_for(loaded: LoadedWeights, quiet: bool = False) -> Tokenizer:
    """The tokenizer of the same source as ``loaded`` (cached next to its weights' hash; a GGUF's
    is rebuilt from its metadata on the first start, which takes seconds)."""
    if loaded.source.is_dir():
        return load_tokenizer_hf(loaded.source)
    with progress.waiting(f"reading the tokenizer of {loaded.source.name}", quiet):
        return load_tokenizer_gguf(loaded.source, cache_root() / loaded.weights_hash[:24])


def _load_hf_target(folder: Path, weights: str, with_tokenizer: bool, start: float) -> Target:
    """An architecture without a native implementation (or ``--backend hf``): transformers
    behind ``HFModel``."""
    if weights in ("int8", "int4"):  # packed formats are native-only (the default is int8)
        warnings.warn(f"{weights} weights are for native targets; running {folder.name} "
                      f"through transformers in fp32")
        weights = "fp32"
    model, digest = load_hf_model(folder, weights)
    tokenizer = load_tokenizer_hf(folder) if with_tokenizer else None
    return Target(model=model, tokenizer=tokenizer, config=model.config, source=folder,
                  weights_hash=digest, weight_format=model.weight_format,
                  load_s=time.perf_counter() - start)


def load_target(path: str | Path | None = None, weights: str = DEFAULT_WEIGHTS,
                with_tokenizer: bool = True, backend: str = "native", quiet: bool = False) -> Target:
    """Load a target from a GGUF file, a Hugging Face folder, an embedded model's short name
    (``gemma3``, ``smollm2``; None: the default).

    Every family of ``families.FAMILIES`` (GGUF or HF folder; Gemma 4 text: HF folders, on
    ``DecoderModel``'s Python layers) runs on the native model; an HF
    folder of any other architecture, or any HF folder with ``backend="hf"``, runs on
    transformers through ``models.hf.HFModel`` (weights fp32, bf16 or fp16). ``quiet`` hides the
    progress bars of a first start (they are drawn only on a terminal anyway)."""
    if weights not in FORMATS:
        raise ModelLoadError(f"unknown weight format {weights!r}; choose one of {', '.join(FORMATS)}")
    if backend not in BACKENDS:
        raise ModelLoadError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    start = time.perf_counter()
    resolved = resolve_model_path(path)
    if resolved.is_dir() and (backend == "hf" or not is_native(resolved)):
        return _load_hf_target(resolved, weights, with_tokenizer, start)
    if backend == "hf":
        raise ModelLoadError("--backend hf needs a Hugging Face model folder (transformers' GGUF "
                             "loading dequantizes to float and is not supported here)")
    loaded = load_weights(resolved, with_tensors=False)
    model = _stored_model(loaded, weights, quiet)
    tokenizer = load_tokenizer_for(loaded, quiet) if with_tokenizer else None
    return Target(model=model, tokenizer=tokenizer, config=model.config, source=loaded.source,
                  weights_hash=loaded.weights_hash, weight_format=weights,
                  load_s=time.perf_counter() - start)
