"""The decode loop: prefill, then draft -> verify in one target pass -> commit -> roll back.

Plain decoding is the same loop with no proposer (k = 0): every step feeds the pending token and
emits one. With a proposer, a step feeds ``[pending, d_1..d_k]`` at consecutive positions, verifies
the drafts against the target's own logits (``verify``), emits the accepted drafts plus one target
token, and "rolls back" the rejected drafts by moving each sequence's length: their cache slots
are simply overwritten later. The engine is the only code that advances the cache.

Stops (EOS, stop strings, max_new_tokens) are applied token by token inside an accepted block,
so nothing after a stop is ever emitted, and greedy output is the target's token for token.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from mtpspec.kv_cache import CacheFullError
from mtpspec.metrics import SpecStats
from mtpspec.models.gemma3 import Gemma3Model
from mtpspec.proposers.base import Draft, DraftState, Proposer, empty_draft
from mtpspec.sampling import SamplingParams, logits_to_probs, make_generator, select
from mtpspec.tokenizer import Tokenizer
from mtpspec.verify import greedy_verify, rejection_verify

PREFILL_CHUNK = 512


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
    """One emitted token of sequence ``row``; ``text`` is the newly completed text (may be "")."""

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


class _Row:
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


class Engine:
    """Runs plain or speculative decoding for a batch of prompts on one target."""

    def __init__(self, model: Gemma3Model, tokenizer: Tokenizer | None = None,
                 proposer: Proposer | None = None, max_len: int = 4096):
        self.model = model
        self.tokenizer = tokenizer
        self.proposer = proposer
        self.max_len = min(max_len, model.config.max_position_embeddings)

    def generate(self, prompts: list[list[int]], options: GenerateOptions) -> list[GenerationResult]:
        """Generate for every prompt (token ids) and return the finished results."""
        results: list[GenerationResult] = []
        for _ in self.stream(prompts, options, results):
            pass
        return results

    def stream(self, prompts: list[list[int]], options: GenerateOptions,
               results: list[GenerationResult] | None = None) -> Iterator[TokenEvent]:
        """Yield tokens as they are accepted; fill ``results`` (if given) when all are done."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        k = options.draft_k if self.proposer is not None else 0
        longest = max(len(p) for p in prompts)
        needed = longest + options.max_new_tokens + k + 1
        if needed > self.max_len:
            raise CacheFullError(
                f"prompt of {longest} tokens plus max_new_tokens={options.max_new_tokens} "
                f"needs {needed} positions; the context holds {self.max_len}"
            )
        model, batch = self.model, len(prompts)
        cache = model.new_cache(batch, needed)
        generator = make_generator(options.sampling)
        rows = [_Row(self.tokenizer, options, model.config.eos_token_ids) for _ in prompts]
        if self.proposer is not None:
            self.proposer.reset()

        start = time.perf_counter()
        hidden, pending = self._prefill(prompts, cache, options.sampling, generator)
        prefill_s = time.perf_counter() - start
        positions = torch.tensor([len(p) for p in prompts])  # [B] position of the pending token
        history = [list(p) + [int(t)] for p, t in zip(prompts, pending)]
        for b, row in enumerate(rows):
            row.stats.prompt_tokens = len(prompts[b])
            row.stats.prefill_s = prefill_s
            text = row.push(int(pending[b]), False)
            if text is not None:
                yield TokenEvent(b, int(pending[b]), False, text)

        decode_start = time.perf_counter()
        schedule = AdaptiveDraftLength(k) if options.adaptive_k and k > 0 else None
        while any(row.finish is None for row in rows):
            step_k = self._step_k(k if schedule is None else schedule.k, rows)
            state = DraftState(tokens=history, hidden=hidden, positions=positions, cache=cache,
                               params=options.sampling, generator=generator)
            draft = self.proposer.propose(state, step_k) if step_k > 0 else empty_draft(batch)
            emitted, num_accepted, hidden = self._verify_step(
                cache, pending, positions, draft, options.sampling, generator)
            if schedule is not None:  # batch: follow the best row (drafting is shared)
                schedule.update(draft.k, int(num_accepted.max()))
            for b, row in enumerate(rows):
                if row.finish is not None:
                    continue
                n = int(num_accepted[b])
                drafted = int(draft.num_drafts[b]) if draft.num_drafts is not None else draft.k
                row.stats.record_step(drafted, n, n + 1)
                for i in range(n + 1):
                    token = int(emitted[b, i])
                    text = row.push(token, i < n)
                    if text is not None:
                        yield TokenEvent(b, token, i < n, text)
                    if row.finish is not None:
                        break
                history[b].extend(int(t) for t in emitted[b, :n + 1])
            # finished rows stand still so they never outgrow the cache
            alive = torch.tensor([row.finish is None for row in rows])
            num_accepted = torch.where(alive, num_accepted, -1)
            positions = positions + num_accepted + 1
            new_pending = emitted.gather(1, num_accepted.clamp(min=0)[:, None]).squeeze(1)
            pending = torch.where(alive, new_pending, pending)
        decode_s = time.perf_counter() - decode_start

        for b, row in enumerate(rows):
            text = row.close()
            if text:
                yield TokenEvent(b, -1, False, text)
            row.stats.decode_s = decode_s
            if results is not None:
                results.append(GenerationResult(row.tokens, row.text, row.from_draft,
                                                row.finish or "length", row.stats))

    @staticmethod
    def _step_k(k: int, rows: list[_Row]) -> int:
        """Draft length for the next step, never past what any row may still emit."""
        if k == 0:
            return 0
        left = max(row.options.max_new_tokens - len(row.tokens) for row in rows
                   if row.finish is None)
        return max(0, min(k, left - 1))

    def _prefill(self, prompts, cache, params: SamplingParams, generator):
        """Run the prompts (right-padded; pad slots are overwritten before they are read)."""
        model, batch = self.model, len(prompts)
        lengths = torch.tensor([len(p) for p in prompts])
        longest = int(lengths.max())
        ids = torch.full((batch, longest), model.config.pad_token_id, dtype=torch.long)
        for b, prompt in enumerate(prompts):
            ids[b, :len(prompt)] = torch.tensor(prompt)
        last_hidden = torch.empty(batch, model.config.hidden_size)
        for begin in range(0, longest, PREFILL_CHUNK):
            end = min(begin + PREFILL_CHUNK, longest)
            positions = torch.arange(begin, end).expand(batch, -1)
            _, hidden = model(ids[:, begin:end], positions, cache, num_logits=0)
            inside = (lengths - 1 >= begin) & (lengths - 1 < end)
            for b in torch.nonzero(inside).flatten().tolist():
                last_hidden[b] = hidden[b, int(lengths[b]) - 1 - begin]
        logits = model.lm_head(last_hidden)  # [B, V]
        return last_hidden, select(logits, params, generator)

    def _verify_step(self, cache, pending, positions, draft: Draft, params: SamplingParams,
                     generator):
        """One target pass over ``[pending, drafts]``; returns (tokens [B, k+1], n [B], hidden [B, d])."""
        ids = torch.cat([pending[:, None], draft.tokens], dim=1)  # [B, k+1]
        steps = ids.shape[1]
        block_positions = positions[:, None] + torch.arange(steps)  # [B, k+1]
        logits, hidden = self.model(ids, block_positions, cache, num_logits=None)
        if params.greedy:
            result = greedy_verify(logits, draft.tokens, draft.num_drafts)
        else:
            p = logits_to_probs(logits, params)  # [B, k+1, V]
            result = rejection_verify(p, draft.tokens, draft.probs, generator, draft.num_drafts)
        n = result.num_accepted
        next_hidden = hidden.gather(1, n.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])).squeeze(1)
        return result.tokens, n, next_hidden
