"""What one sequence asks for and what it gets back: options, events, results, output state.

``GenerateOptions`` is a request's decoding settings; ``SequenceOutput`` turns accepted tokens into
released text (streaming detokenization, stop strings held back until they cannot match, EOS and
length stops applied token by token); ``TokenEvent``/``FinishEvent`` are what the decode loop emits.
Shared by the batching core (``batch``), the ``engine`` wrappers and the server; no model calls.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from mtpspec.metrics import SpecStats
from mtpspec.sampling import SamplingParams
from mtpspec.tokenizer import Tokenizer


@dataclass(frozen=True)
class GenerateOptions:
    max_new_tokens: int = 128
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    draft_k: int = 4
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()  # end a sequence like EOS (not emitted)
    adaptive_k: bool = False  # adapt the draft length to recent acceptance (draft_k is the cap)

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.draft_k, int) or not 0 <= self.draft_k <= 32:
            raise ValueError(f"draft_k must be an int in 0..32, got {self.draft_k!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")


@dataclass
class TokenEvent:
    """One emitted token of sequence ``row``; ``text`` is the newly completed text (may be "").

    ``row`` is the prompt's index for ``Engine.stream`` and the sequence id ``add`` returned for a
    ``BatchSession``. A final event with ``token_id == -1`` carries text held back until the end."""

    row: int
    token_id: int
    from_draft: bool
    text: str


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    from_draft: list[bool]
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    stats: SpecStats


@dataclass
class FinishEvent:
    """Sequence ``row`` is done (after its last TokenEvent); it has left the batch."""

    row: int
    result: GenerationResult


class SequenceOutput:
    """Per-sequence output state: tokens, provenance, streamed text and stop detection."""

    def __init__(self, tokenizer: Tokenizer | None, options: GenerateOptions, eos: tuple[int, ...]):
        self.tokens: list[int] = []
        self.from_draft: list[bool] = []
        self.text = ""          # text released so far
        self._held = ""          # decoded text held back: may be the start of a stop string
        self.finish: str | None = None
        self.stopped_by_string = False
        self.options = options
        self.eos = options.stop_token_ids + (() if options.ignore_eos else eos)
        self.decoder = tokenizer.stream_decoder() if tokenizer is not None else None
        self.stats = SpecStats()

    def push(self, token: int, from_draft: bool) -> str | None:
        """Add one token; return released text, or None if the token ended the sequence unseen."""
        if token in self.eos:
            self.finish = "stop"
            return None
        self.tokens.append(token)
        self.from_draft.append(from_draft)
        released = self._release(self.decoder.push(token) if self.decoder else "")
        if self.finish is None and len(self.tokens) >= self.options.max_new_tokens:
            self.finish = "length"
        return released

    def _release(self, delta: str) -> str:
        held = self._held + delta
        for stop in self.options.stop:
            cut = held.find(stop)
            if cut >= 0:
                self.finish = "stop"
                self.stopped_by_string = True
                self._held = ""
                self.text += held[:cut]
                return held[:cut]
        keep = max((n for stop in self.options.stop for n in range(len(stop) - 1, 0, -1)
                    if held.endswith(stop[:n])), default=0)
        out, self._held = held[:len(held) - keep], held[len(held) - keep:]
        self.text += out
        return out

    def close(self) -> str:
        """Release held text at the end (no stop string matched)."""
        if self.stopped_by_string:
            return ""
        out = self._held + (self.decoder.flush() if self.decoder else "")
        self._held = ""
        self.text += out
        return out

    def result(self) -> GenerationResult:
        return GenerationResult(self.tokens, self.text, self.from_draft, self.finish or "length",
                                self.stats)


class AdaptiveDraftLength:
    """Draft length that follows acceptance: longer after a fully accepted block, shorter after
    a rejection (the heuristic of HF's assisted generation), within 1..k_max."""

    def __init__(self, k_max: int):
        self.k_max = k_max
        self.k = max(1, min(k_max, 3))

    def update(self, drafted: int, accepted: int) -> None:
        if drafted == 0:
            return
        if accepted == drafted:
            self.k = min(self.k_max, self.k + 2)
        else:
            self.k = max(1, min(self.k - 1, accepted + 1))
