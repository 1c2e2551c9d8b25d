"""What one sequence asks for and what it gets back: options, events, results, output state.

``GenerateOptions`` is a request's decoding settings; ``SequenceOutput`` turns accepted tokens into
released text (streaming detokenization, stop strings held back until they cannot match, EOS and
length stops applied token by token); ``TokenEvent``/``FinishEvent``/``FailEvent`` are what the
decode loop emits. Stop strings are matched in time linear in the text (one Knuth-Morris-Pratt
automaton per stop string, fed each new character once), so a long stop string costs one
request its own work and nothing more.
Shared by the batching core (``batch``), the ``engine`` wrappers and the server; no model calls.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from mtpspec.metrics import SpecStats
from mtpspec.sampling import SamplingParams
from mtpspec.tokenizer import Tokenizer

MAX_LOGPROBS = 20  # most alternatives per token, as OpenAI


@dataclass(frozen=True)
class GenerateOptions:
    max_new_tokens: int = 128
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    draft_k: int = 4
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()  # end a sequence like EOS (not emitted)
    adaptive_k: bool = False  # adapt the draft length to recent acceptance (draft_k is the cap)
    draft_policy: bool = True  # let the session shorten or skip drafts that cannot pay (draft_policy)
    logprobs: int | None = None  # None: off; n >= 0: each token's logprob and the n most likely
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (after the first)

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.draft_k, int) or not 0 <= self.draft_k <= 32:
            raise ValueError(f"draft_k must be an int in 0..32, got {self.draft_k!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or not 0 <= value <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be None or an int in 0..{MAX_LOGPROBS}, got {value!r}")


@dataclass(frozen=True)
class TokenLogprob:
    """The target's log-probability of one token (raw logits, before temperature and top-k/p)
    and the ``top`` most likely alternatives as (token id, logprob), most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class TokenEvent:
    """One emitted token of sequence ``row``; ``text`` is the newly completed text (may be "").

    ``row`` is the prompt's index for ``Engine.stream`` and the sequence id ``add`` returned for a
    ``BatchSession``. A final event with ``token_id == -1`` carries text held back until the end.
    ``drafted`` is the number of drafts the verification step that emitted this token checked
    (0 for the prompt's first token and for steps without drafts): a step emits its accepted
    drafts (``from_draft``) and then one target token, the bonus when every draft was accepted,
    else the correction of the first rejected one."""

    row: int
    token_id: int
    from_draft: bool
    text: str
    logprob: TokenLogprob | None = None  # when the options ask for logprobs
    drafted: int = 0


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    from_draft: list[bool]
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    stats: SpecStats
    logprobs: list[TokenLogprob] | None = None  # one per token id, when asked for
    prompt_logprobs: list[TokenLogprob | None] | None = None  # per prompt token; the first None


@dataclass
class FailEvent:
    """Sequence ``row`` failed (an error while serving it alone); it has left the batch."""

    row: int
    message: str


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
        self.logprobs: list[TokenLogprob] | None = [] if options.logprobs is not None else None
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self._stops = [StopMatcher(stop) for stop in options.stop]

    def push(self, token: int, from_draft: bool,
             logprob: TokenLogprob | None = None) -> str | None:
        """Add one token; return released text, or None if the token ended the sequence unseen."""
        if token in self.eos:
            self.finish = "stop"
            return None
        self.tokens.append(token)
        self.from_draft.append(from_draft)
        if self.logprobs is not None and logprob is not None:
            self.logprobs.append(logprob)
        released = self._release(self.decoder.push(token) if self.decoder else "")
        if self.finish is None and len(self.tokens) >= self.options.max_new_tokens:
            self.finish = "length"
        return released

    def _release(self, delta: str) -> str:
        """Feed new text to the stop matchers; release what can no longer start a stop string."""
        held = self._held + delta
        start = len(self._held)
        for i, char in enumerate(delta):
            for matcher in self._stops:
                if matcher.feed(char):  # the first stop string to end here wins
                    cut = start + i + 1 - len(matcher.stop)
                    self.finish = "stop"
                    self.stopped_by_string = True
                    self._held = ""
                    self.text += held[:cut]
                    return held[:cut]
        keep = max((matcher.state for matcher in self._stops), default=0)  # <= len(held)
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
                                self.stats, self.logprobs, self.prompt_logprobs)


class StopMatcher:
    """Knuth-Morris-Pratt automaton for one stop string: ``feed`` one character at a time;
    ``state`` is the length of the longest prefix of the stop string that ends the text so far
    (what must be held back), and ``feed`` returns True when the whole string has just ended."""

    def __init__(self, stop: str):
        self.stop = stop
        self.state = 0
        self._fail = [0] * len(stop)  # _fail[i]: longest proper border of stop[:i + 1]
        border = 0
        for i in range(1, len(stop)):
            while border and stop[i] != stop[border]:
                border = self._fail[border - 1]
            if stop[i] == stop[border]:
                border += 1
            self._fail[i] = border

    def feed(self, char: str) -> bool:
        state, stop = self.state, self.stop
        if state == len(stop):
            state = self._fail[state - 1]
        while state and char != stop[state]:
            state = self._fail[state - 1]
        if char == stop[state]:
            state += 1
        self.state = state
        return state == len(stop)


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
