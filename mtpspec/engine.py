"""The decode loop: prefill, then draft -> verify in one target pass -> commit -> roll back.

Plain decoding is the same loop with no proposer (k = 0): every step feeds the pending token and
emits one. With a proposer, a step feeds ``[pending, d_1..d_k]`` at consecutive positions, verifies
the drafts against the target's own logits (``verify``), emits the accepted drafts plus one target
token, and "rolls back" the rejected drafts by moving each sequence's position: their cache slots
are simply overwritten later. The engine is the only code that advances the cache.

``BatchSession`` is the step-wise core (continuous batching): sequences join with ``add`` (each is
prefilled into its own cache row before the next step), every ``step`` drafts for and verifies all
live sequences in ONE target pass over ragged blocks (each row keeps its own number of accepted
tokens), and finished or cancelled sequences leave between steps. ``Engine.generate/stream`` run
a fixed batch through a session.

Sampled rows of ``generate``/``stream`` are coupled rows of the session: each draws its own
uniforms from a seed that the options' seed determines (row b's seed is the b-th draw of a generator
seeded by it), so a seeded call gives the same tokens whatever the draft lengths, which the
session's ``DraftPolicy`` chooses from timings. The engine keeps one policy (``policy``), so what
it measured (step costs, acceptance per kind of row) outlasts a call.

Stops (EOS, stop strings, max_new_tokens) are applied token by token inside an accepted block,
so nothing after a stop is ever emitted, and greedy output is the target's token for token, alone
or beside any other sequences.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import torch

from mtpspec.batch import BatchSession
from mtpspec.draft_policy import DraftPolicy
from mtpspec.kv_cache import CacheFullError
from mtpspec.models.base import TargetModel
from mtpspec.proposers.base import Proposer
from mtpspec.sampling import make_generator
from mtpspec.sequence import (AdaptiveDraftLength, FinishEvent, GenerateOptions, GenerationResult,
                              SequenceOutput, TokenEvent)
from mtpspec.tokenizer import Tokenizer

__all__ = ["AdaptiveDraftLength", "BatchSession", "Engine", "FinishEvent", "GenerateOptions",
           "GenerationResult", "SequenceOutput", "TokenEvent"]


class Engine:
    """Runs plain or speculative decoding on one target: fixed batches (``generate``/``stream``)
    or a continuous batch (``session``)."""

    def __init__(self, model: TargetModel, tokenizer: Tokenizer | None = None,
                 proposer: Proposer | None = None, max_len: int = 4096, policy: bool = True):
        """policy: let sessions choose draft lengths from measured acceptance and costs
        (``draft_policy``); False drafts what the options ask for."""
        self.model = model
        # measured step costs and acceptance, shared by this engine's sessions (False: none)
        self.policy: DraftPolicy | bool = DraftPolicy() if policy else False
        self.tokenizer = tokenizer
        self.proposer = proposer
        self.max_len = min(max_len, model.config.max_position_embeddings)

    def session(self, max_batch_size: int, max_draft_k: int,
                max_verify_rows: int | None = None) -> BatchSession:
        """A continuous-batching session over this engine's full context (see ``BatchSession``)."""
        return BatchSession(self.model, self.tokenizer, self.proposer, max_batch_size,
                            self.max_len, max_draft_k if self.proposer is not None else 0,
                            max_verify_rows, policy=self.policy)

    def generate(self, prompts: list[list[int]], options: GenerateOptions) -> list[GenerationResult]:
        """Generate for every prompt (token ids) and return the finished results."""
        results: list[GenerationResult] = []
        for _ in self.stream(prompts, options, results):
            pass
        return results

    def stream(self, prompts: list[list[int]], options: GenerateOptions,
               results: list[GenerationResult] | None = None) -> Iterator[TokenEvent]:
        """Yield tokens as they are accepted; fill ``results`` (if given) when all are done.

        Sampled prompts get seeds of their own drawn from a generator seeded by
        ``options.sampling.seed`` (see the module docstring); the prompts are prefilled together
        and report the batch's prefill and decode times."""
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
        session = BatchSession(self.model, self.tokenizer, self.proposer, len(prompts), needed, k,
                               policy=self.policy)
        generator = make_generator(options.sampling)
        ids = [session.add(prompt, _row_options(options, generator)) for prompt in prompts]
        index = {seq: b for b, seq in enumerate(ids)}
        done: dict[int, GenerationResult] = {}
        while not session.idle:
            for event in session.step():
                if isinstance(event, FinishEvent):
                    done[index[event.row]] = event.result
                else:
                    yield TokenEvent(index[event.row], event.token_id, event.from_draft, event.text)
        # one batch: every row reports the batch's decode time (as the benchmark expects)
        decode_s = max(result.stats.decode_s for result in done.values())
        for result in done.values():
            result.stats.decode_s = decode_s
        if results is not None:
            results.extend(done[b] for b in range(len(prompts)))


def _row_options(options: GenerateOptions, generator: torch.Generator | None) -> GenerateOptions:
    """A prompt's options: sampled ones with a seed of its own, the next draw of ``generator``."""
    if generator is None:
        return options
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
    return replace(options, sampling=replace(options.sampling, seed=seed))
