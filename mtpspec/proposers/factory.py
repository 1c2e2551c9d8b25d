"""Build a proposer from its name: the one map from ``--spec`` / bench method names to proposers.

The CLI (``generate``, ``bench``) and the server share it, so a name means the same everywhere.
``mtp`` needs ``mtpspec.drafter``; when that cannot be imported or no drafter ships for the target,
``default_spec`` falls back to plain decoding and says so (prompt lookup can make a request slower
than plain decoding: 0.84x on SmolLM2's chat answers, ``bench/vs_llamacpp.py --model smollm2
--spec ngram``, so it is the user's choice, ``--spec ngram``). This module loads models (a draft model, an
MTP head) but never runs or verifies anything.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mtpspec.proposers.base import Proposer
from mtpspec.proposers.draft_model import DraftModelProposer
from mtpspec.proposers.ngram import NgramProposer
from mtpspec.runtime import Target, load_target

SPECS = ("mtp", "mtp-only", "ngram", "draft-model", "none")
# The MTP head stops a row's draft once its estimate that the whole draft is accepted falls below
# this (bench/draft_length.py, int8, with the argmax screen: 1.87-1.89x plain for 0.2-0.3 at
# k <= 6..10 on MT-bench 16, 1.71-1.74x on HumanEval 16; the README has the figures)
DEFAULT_DRAFT_CONFIDENCE = 0.25


class SpecError(ValueError):
    """A speculative method that cannot be built as asked; the message says why in one line."""


@dataclass(frozen=True)
class ProposerRequest:
    """What the user asked for, beyond the method name."""

    drafter_path: Path | None = None      # mtp: a drafter checkpoint (None: the one shipped, if any)
    draft_model_path: Path | None = None  # draft-model: a GGUF file or HF folder
    weights: str = "fp32"                 # weight format of a separate draft model
    max_len: int = 4096                   # context of a separate draft model's cache
    min_confidence: float | None = DEFAULT_DRAFT_CONFIDENCE  # mtp: dynamic draft length; None: k


@dataclass
class BuiltProposer:
    spec: str                  # the resolved method name
    proposer: Proposer | None  # None for "none" (plain decoding)
    note: str | None = None    # a fallback worth telling the user about


def mtp_import_error() -> str | None:
    """Why the MTP proposer cannot be used at all (None when its modules import)."""
    try:
        from mtpspec.drafter import load_drafter  # noqa: F401
        from mtpspec.proposers.mtp import MTPProposer  # noqa: F401
    except ImportError as err:
        return f"the MTP drafter modules are unavailable ({err})"
    return None


def shipped_drafter(target: Target) -> Path | None:
    """The drafter that ships in the package for ``target``'s exact weights, if any."""
    if mtp_import_error() is not None:
        return None
    from mtpspec.drafter import shipped_drafter_for

    return shipped_drafter_for(target.weights_hash)


def default_spec(target: Target, drafter_path: Path | None) -> tuple[str, str | None]:
    """``mtp`` when a drafter is available for the target, else plain decoding with a note."""
    problem = mtp_import_error()
    if problem is None and (drafter_path is not None or shipped_drafter(target) is not None):
        return "mtp", None
    reason = problem or f"no MTP drafter ships for {target.name}"
    return "none", f"{reason}; decoding plainly (--spec ngram tries prompt lookup)"


def _none(target: Target, request: ProposerRequest) -> Proposer | None:
    return None


def _ngram(target: Target, request: ProposerRequest) -> Proposer:
    return NgramProposer()


def _draft_model(target: Target, request: ProposerRequest) -> Proposer:
    if request.draft_model_path is None:
        raise SpecError("--spec draft-model needs --draft-model PATH (a smaller GGUF file or HF folder)")
    draft = load_target(request.draft_model_path, request.weights, with_tokenizer=False)
    if draft.config.vocab_size != target.config.vocab_size:
        raise SpecError(
            f"draft model {draft.name} has a vocabulary of {draft.config.vocab_size} tokens; "
            f"the target's has {target.config.vocab_size}"
        )
    return DraftModelProposer(draft.model, max_len=request.max_len)


def _mtp(target: Target, request: ProposerRequest) -> Proposer:
    problem = mtp_import_error()
    if problem is not None:
        raise SpecError(f"--spec mtp: {problem}")
    from mtpspec.drafter import DrafterMismatchError, load_drafter
    from mtpspec.proposers.mtp import MTPProposer

    path = request.drafter_path or shipped_drafter(target)
    if path is None:
        raise SpecError(f"--spec mtp: no drafter ships for {target.name}; pass --drafter PATH")
    if not Path(path).is_dir():
        raise SpecError(f"--drafter: no drafter folder at {path}")
    from mtpspec.drafter.gemma4_assistant import is_assistant_folder, load_assistant
    from mtpspec.proposers.assistant import AssistantProposer

    try:
        if is_assistant_folder(path):  # Google's Gemma4AssistantForCausalLM layout
            head = load_assistant(path, target.model, target.weights_hash)
        else:
            head = load_drafter(path, target.config, target.weights_hash,
                                getattr(target.model, "kv_shape", None))
    except DrafterMismatchError as err:
        raise SpecError(f"--drafter {path}: {err}") from None
    if head.cfg.lm_head_source == "draft":  # a head with an LM head of its own
        return AssistantProposer(head, target.model)
    return MTPProposer(head, target.model, min_confidence=request.min_confidence)


def _mtp_hybrid(target: Target, request: ProposerRequest) -> Proposer:
    """The MTP head, with prompt lookup when the context clearly repeats (greedy only)."""
    from mtpspec.proposers.hybrid import HybridProposer

    return HybridProposer(_mtp(target, request))


_BUILDERS: dict[str, Callable[[Target, ProposerRequest], Proposer | None]] = {
    "mtp": _mtp_hybrid, "mtp-only": _mtp, "ngram": _ngram, "draft-model": _draft_model,
    "none": _none,
}


def make_proposer(spec: str | None, target: Target, request: ProposerRequest) -> BuiltProposer:
    """The proposer for ``spec`` (None: the default, see ``default_spec``)."""
    note = None
    if spec is None:
        spec, note = default_spec(target, request.drafter_path)
    builder = _BUILDERS.get(spec)
    if builder is None:
        raise SpecError(f"unknown speculative method {spec!r}; choose one of {', '.join(SPECS)}")
    return BuiltProposer(spec=spec, proposer=builder(target, request), note=note)


# --- memory accounting ----------------------------------------------------------------------------

def _tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()


def _unique_nbytes(tensors: Iterator[torch.Tensor], seen: set[int]) -> int:
    """Bytes of the storages behind ``tensors`` not yet in ``seen`` (which is updated)."""
    total = 0
    for tensor in tensors:
        pointer = tensor.untyped_storage().data_ptr()
        if pointer not in seen:
            seen.add(pointer)
            total += tensor.untyped_storage().nbytes()
    return total


def module_nbytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers (shared storage counted once)."""
    return _unique_nbytes(_tensors(module), set())


def proposer_nbytes(proposer: Proposer | None, target: nn.Module) -> int:
    """Memory a proposer adds to the target's: its own modules' weights plus any cache it holds.

    Counts every ``nn.Module`` attribute of the proposer (a draft model, an MTP head), minus storage
    the target already holds (a tied embedding), packed copies it made (the fused draft step's
    weights and cluster-ordered embedding), plus ``cache_nbytes`` when the proposer has one.
    """
    if proposer is None:
        return 0
    seen: set[int] = set()
    _unique_nbytes(_tensors(target), seen)
    total = 0
    for value in vars(proposer).values():
        if isinstance(value, nn.Module):
            total += _unique_nbytes(_tensors(value), seen)
        elif hasattr(value, "propose"):  # a proposer wrapping another (mtp + ngram)
            total += proposer_nbytes(value, target)
        elif isinstance(getattr(value, "nbytes", None), int):  # packed copies (fused MTP step)
            total += value.nbytes
    return total + int(getattr(proposer, "cache_nbytes", 0) or 0)
