"""Continuous batching for speculative decoding: sequences join, step together, and leave.

A ``BatchSession`` owns one preallocated ``KVCache`` of ``max_batch_size`` rows x ``max_len``
positions. Live sequences always occupy rows ``0..n-1`` (the model and the drafters read the
first n rows): a joining sequence is prefilled into row n (batched with any other joiners), and
when row i leaves, the last live row's valid cache slots are copied into row i (one copy of
``position`` slots per leave; decoding never copies).

One ``step``:
1. admit waiting sequences (prefill, first token);
2. draft for every live row at once: ``k_b`` tokens for row b (its own draft length, adaptive or
   fixed, never past its remaining budget), padded to the widest row;
3. ONE target pass over ``[pending, d_1..d_w]`` for all rows at their own positions;
4. verify each row on its own terms: greedy rows by argmax match; sampled rows that share a
   generator (``Engine.generate``'s batch) by rejection sampling with it; sampled rows added
   without one (a server request) by ``coupled_verify`` with their own per-position uniforms;
5. commit ``n_b + 1`` tokens per row (stops applied token by token) and move its position.

Sampled rows and the proposer: a proposer sees one ``SamplingParams``. When every live row shares
one sampling group (the same params and generator), drafts are drawn from the proposer's q under
those params, as for a single request. When rows differ, the proposer drafts greedily for all of
them and sampled rows verify those drafts as point masses (q = one-hot), which is lossless for any
draft chosen independently of the verifier's randomness; it only accepts less often.

Seeds under load: a sequence added without a generator gets its own, seeded from its options,
from which it draws one uniform per output position, in order. Its token at output position t is
the inverse CDF of the target's distribution at the uniform u_t, and point-mass (greedy) drafts
are accepted iff they equal it, so its text is a function of its seed alone: the same alone as
beside any other requests, whatever the draft lengths.

Errors: with ``isolate_errors`` (the server's scheduler sets it), an exception in one row's own
work (its prefill batch, verification group, output) fails those rows alone with a ``FailEvent``;
only an error in the shared target pass propagates. Without it (``Engine.generate``), every
exception propagates to the caller as it is.

Draft lengths and the batch: a verification pass costs a fixed weight read plus a compute cost
per row (on a CPU mostly the LM head over the whole vocabulary), so k drafts for each of n rows
cost n * (k + 1) rows. ``max_verify_rows`` caps that: each row drafts at most
``max_verify_rows // n - 1`` tokens, so speculation fades out as the batch fills. Within those
caps the ``DraftPolicy`` (``draft_policy``; on unless ``policy=False``) lets rows draft only where
their measured tokens per drafting step pay for the measured cost of a drafting step against a
plain one, and gives no drafts to a row where they cannot pay (re-probing it now and then); a
request opts out with ``GenerateOptions.draft_policy=False``. Draft lengths never change greedy
output, nor the tokens of a coupled (seeded) sampled row.

Greedy output of a sequence does not depend on its neighbours: rows never attend to each other,
and each row's drafts are cut to its own length before verification.

Recording (drafter training data): a ``StateRecorder`` set as ``recorder`` receives every row's
final hidden states (prompt and decoded positions), the target's logits of the next token at each
decoded position (passes then always compute logits), and, as the row leaves, its cache row, so
data generation is this same loop rather than a second one.

Must not: run from more than one thread (the server's scheduler owns it), or hold per-request
state anywhere but in ``_Sequence``.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from mtpspec.draft_policy import DraftPolicy, RowAcceptance
from mtpspec.kv_cache import CacheFullError
from mtpspec.models.base import TargetModel
from mtpspec.proposers.base import Draft, DraftState, Proposer, empty_draft
from mtpspec.sampling import (SamplingParams, logits_to_probs, make_generator, sample,
                              sample_from_logits)
from mtpspec.sequence import (AdaptiveDraftLength, FailEvent, FinishEvent, GenerateOptions,
                              SequenceOutput, TokenEvent, TokenLogprob)
from mtpspec.tokenizer import Tokenizer
from mtpspec.verify import coupled_verify_lazy, greedy_verify_argmax, rejection_verify

PREFILL_CHUNK = 512
LOGPROB_CHUNK = 64  # prompt positions per LM-head call for prompt logprobs
UNIFORM_BLOCK = 64  # uniforms drawn at once for a coupled sequence
GREEDY = SamplingParams()

Event = TokenEvent | FinishEvent | FailEvent


class StateRecorder(Protocol):
    """Receives what the target computed for each sequence of a session (see the docstring)."""

    def hidden(self, seq_id: int, start: int, states: torch.Tensor) -> None:
        """states [t, d]: the final-normed hidden states of positions start..start+t-1."""

    def next_token(self, seq_id: int, start: int, logits: torch.Tensor) -> None:
        """logits [t, V]: the target's logits of the token after positions start..start+t-1."""

    def finish(self, seq_id: int, cache, row: int, length: int, ids: list[int]) -> None:
        """The sequence is done: ``ids`` (prompt + output); its cache ``row`` holds K/V of
        positions < ``length`` (the tokens the target ran on), as do the states recorded."""


@dataclass
class _Sequence:
    """One sequence in the session: its request, output, and where it stands in the cache."""

    seq_id: int
    prompt: list[int]
    options: GenerateOptions
    generator: torch.Generator | None
    output: SequenceOutput
    schedule: AdaptiveDraftLength | None
    history: list[int]                  # prompt, emitted tokens, and last the pending token
    position: int = 0                   # position of the pending token; slots < it are valid
    pending: int = 0                    # emitted, not yet in the cache
    hidden: torch.Tensor | None = None  # [d] the target's state that predicted ``pending``
    decode_start: float = 0.0
    coupled: bool = False               # per-position uniforms from its own generator
    uniforms: torch.Tensor | None = None  # [N] float64: u_t of output positions t < N
    failed: str | None = None           # why this sequence failed; it leaves at the next retire
    acceptance: RowAcceptance | None = None  # for the draft policy (None: no policy)

    @property
    def group(self) -> Hashable:
        """Rows with equal groups are verified (and may be drafted) together."""
        if self.options.sampling.greedy:
            return "greedy"
        if self.coupled:  # each row draws its own uniforms: the seed does not split groups
            return ("coupled", replace(self.options.sampling, seed=None))
        return (self.options.sampling, id(self.generator))

    @property
    def produced(self) -> int:
        """Output positions decided so far (the pending token included)."""
        return len(self.history) - len(self.prompt)

    def uniform(self, start: int, count: int) -> torch.Tensor:
        """u_t for output positions start..start+count-1 ``[count]``: the generator's draws in
        order, so a function of the seed and t only."""
        needed = start + count
        have = 0 if self.uniforms is None else len(self.uniforms)
        if needed > have:
            blocks = -(-(needed - have) // UNIFORM_BLOCK)
            more = torch.rand(blocks * UNIFORM_BLOCK, generator=self.generator,
                              dtype=torch.float64)
            self.uniforms = more if self.uniforms is None else torch.cat([self.uniforms, more])
        return self.uniforms[start:needed]


def model_device(model: TargetModel) -> torch.device:
    """The device a target's weights live on (``HFModel`` says; native models hold buffers)."""
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else model.norm_scale.device


class _OnDevice:
    """A target on an accelerator seen from the session's CPU bookkeeping: inputs go to its
    device, outputs come back to the CPU; the cache stays on the device. (Plain decoding, as
    drafter data generation on a GPU needs; proposers read the cache where it is.)"""

    def __init__(self, model: TargetModel, device: torch.device):
        self._model, self._device = model, device

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, ids, positions, cache, num_logits=1):
        logits, hidden = self._model(ids.to(self._device), positions.to(self._device), cache,
                                     num_logits)
        return (None if logits is None else logits.cpu()), hidden.cpu()

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._model.lm_head(hidden.to(self._device)).cpu()

    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._model.greedy_tokens(hidden.to(self._device)).cpu()


class BatchSession:
    """Step-wise continuous batching over one target; see the module docstring."""

    def __init__(self, model: TargetModel, tokenizer: Tokenizer | None, proposer: Proposer | None,
                 max_batch_size: int, max_len: int, max_draft_k: int,
                 max_verify_rows: int | None = None, prefill_chunk: int = PREFILL_CHUNK,
                 policy: DraftPolicy | bool = True):
        """policy: let rows draft only where their measured acceptance pays for the measured
        cost of a drafting step (``draft_policy``): True, a new policy; a ``DraftPolicy``, that
        one, with what it measured before (the engine's); False drafts what the options ask."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        device = model_device(model)
        if device.type != "cpu":
            model = _OnDevice(model, device)
        self.model, self.tokenizer, self.proposer = model, tokenizer, proposer
        self.max_batch_size = max_batch_size
        self.max_len = min(max_len, model.config.max_position_embeddings)
        self.max_draft_k = max_draft_k if proposer is not None else 0
        self.max_verify_rows = max_verify_rows  # None: no cap on n * (k + 1)
        if self.max_draft_k == 0 or policy is False:
            policy = None
        self.policy = DraftPolicy() if policy is True else policy
        self.prefill_chunk = prefill_chunk  # prompt positions per prefill pass
        self.cache = model.new_cache(max_batch_size, self.max_len)  # [L, B, kvh, S, D]
        if self.max_draft_k > 0:  # verification passes of several rows: argmax without logits
            model.enable_argmax_screen()
        self.live: list[_Sequence] = []      # live[i] owns cache row i
        self.waiting: deque[_Sequence] = deque()
        self._next_id = 0
        self.isolate_errors = False  # True: a row's own error fails it alone (FailEvent)
        self.recorder: StateRecorder | None = None  # training data: states of every row
        self.steps = 0        # batched target passes after prefill
        self.row_steps = 0    # sum over those passes of the rows they verified

    # --- joining and leaving -------------------------------------------------------------------

    def max_new_tokens_for(self, prompt_len: int) -> int:
        """The most new tokens a prompt of ``prompt_len`` tokens may ask for (may be <= 0)."""
        return self.max_len - prompt_len - self.max_draft_k - 1

    def check(self, prompt: list[int], options: GenerateOptions) -> None:
        """Raise ValueError/CacheFullError unless ``add(prompt, options)`` would be accepted.
        Reads only configuration, so any thread may call it."""
        if len(prompt) == 0:
            raise ValueError("every prompt needs at least one token")
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise ValueError(f"token ids must lie in 0..{vocab - 1}")
        if options.draft_k > self.max_draft_k and self.proposer is not None:
            raise ValueError(f"draft_k={options.draft_k} exceeds this session's {self.max_draft_k}")
        room = self.max_new_tokens_for(len(prompt))
        if options.max_new_tokens > room:
            raise CacheFullError(
                f"prompt of {len(prompt)} tokens plus max_new_tokens={options.max_new_tokens} "
                f"needs {len(prompt) + options.max_new_tokens + self.max_draft_k + 1} positions "
                f"(drafting reserves {self.max_draft_k + 1}); the context holds {self.max_len}"
            )

    def add(self, prompt: list[int], options: GenerateOptions,
            generator: torch.Generator | None = None) -> int:
        """Queue a sequence; it joins at the next ``step`` with a free row. Returns its id.

        ``generator``: for sampled options, a generator to share with other sequences (one
        random stream for a batch, rejection sampling); None makes the sequence's own from
        ``options.sampling.seed`` and samples by per-position uniforms (see the docstring)."""
        self.check(prompt, options)
        coupled = generator is None and not options.sampling.greedy
        if generator is None:
            generator = make_generator(options.sampling)
        k = options.draft_k if self.proposer is not None else 0
        seq = _Sequence(
            seq_id=self._next_id, prompt=list(prompt), options=options, generator=generator,
            output=SequenceOutput(self.tokenizer, options, self.model.config.eos_token_ids),
            schedule=AdaptiveDraftLength(k) if options.adaptive_k and k > 0 else None,
            history=list(prompt), coupled=coupled,
            acceptance=(self.policy.new_row(not options.sampling.greedy)
                        if self.policy is not None and k > 0 else None))
        self._next_id += 1
        self.waiting.append(seq)
        return seq.seq_id

    def cancel(self, seq_id: int) -> bool:
        """Drop a waiting or live sequence now (its row is freed); False if it is unknown."""
        for seq in self.waiting:
            if seq.seq_id == seq_id:
                self.waiting.remove(seq)
                return True
        for row, seq in enumerate(self.live):
            if seq.seq_id == seq_id:
                self._remove_rows([row])
                return True
        return False

    def clear(self) -> list[int]:
        """Drop every waiting and live sequence (after an engine failure); returns their ids."""
        ids = [seq.seq_id for seq in self.waiting] + [seq.seq_id for seq in self.live]
        self.waiting.clear()
        self.live.clear()
        return ids

    @property
    def idle(self) -> bool:
        return not self.live and not self.waiting

    def _remove_rows(self, rows: list[int]) -> None:
        """Free cache rows: the last live row moves into each hole (its valid slots are copied)."""
        cache = self.cache
        for row in sorted(rows, reverse=True):
            last = len(self.live) - 1
            if row != last:
                valid = self.live[last].position
                cache.k[:, row, :, :valid] = cache.k[:, last, :, :valid]
                cache.v[:, row, :, :valid] = cache.v[:, last, :, :valid]
                self.live[row] = self.live[last]
            self.live.pop()

    # --- one step ------------------------------------------------------------------------------

    def step(self) -> list[Event]:
        """Admit waiting sequences, then run one draft -> verify -> commit step for all rows."""
        events: list[Event] = []
        self._admit(events)
        if self.live:
            self._decode(events)
        return events

    def _admit(self, events: list[Event]) -> None:
        free = self.max_batch_size - len(self.live)
        joining = [self.waiting.popleft() for _ in range(min(free, len(self.waiting)))]
        if not joining:
            return
        if self.proposer is not None:
            self.proposer.reset()  # stateful proposers (a draft model's cache) resynchronise
        start = time.perf_counter()
        first_row = len(self.live)
        try:
            hidden = self._prefill(joining, first_row)  # [m, d]
            logits = self.model.lm_head(hidden)  # [m, V]
            first = self._select(logits, joining)  # [m]
        except Exception as err:  # noqa: BLE001 - the joiners fail; the live rows go on
            if not self.isolate_errors:
                raise
            for seq in joining:
                events.append(FailEvent(seq.seq_id, f"prefill failed: {type(err).__name__}: {err}"))
            return
        now = time.perf_counter()
        self.live.extend(joining)
        for j, seq in enumerate(joining):
            if self.recorder is not None:
                self.recorder.next_token(seq.seq_id, len(seq.prompt) - 1, logits[j:j + 1])
            seq.position, seq.pending, seq.hidden = len(seq.prompt), int(first[j]), hidden[j]
            seq.history.append(seq.pending)
            seq.output.stats.prompt_tokens = len(seq.prompt)
            seq.output.stats.prefill_s = now - start
            seq.decode_start = now
            self._guarded(seq, lambda seq=seq, j=j: self._emit(
                seq, seq.pending, False, events, _logprob(logits[j], seq.pending,
                                                          seq.options.logprobs)))
        self._retire(events)

    def _prefill(self, seqs: list[_Sequence], first_row: int) -> torch.Tensor:
        """Prefill the prompts of ``seqs`` into cache rows first_row.. (right-padded; pad slots
        are overwritten before they are read); returns each prompt's last hidden state [m, d].
        Sequences that ask for prompt logprobs get them here."""
        prompts = [seq.prompt for seq in seqs]
        model, batch = self.model, len(prompts)
        lengths = torch.tensor([len(p) for p in prompts])  # [m]
        longest = int(lengths.max())
        # rows 0..m-1 of some cache: this session's own when they are the first free rows
        cache = self.cache if first_row == 0 else model.new_cache(batch, longest)
        ids = torch.full((batch, longest), model.config.pad_token_id, dtype=torch.long)
        for b, prompt in enumerate(prompts):
            ids[b, :len(prompt)] = torch.tensor(prompt)
        last_hidden = torch.empty(batch, model.config.hidden_size)
        for begin in range(0, longest, self.prefill_chunk):
            end = min(begin + self.prefill_chunk, longest)
            positions = torch.arange(begin, end).expand(batch, -1)
            _, hidden = model(ids[:, begin:end], positions, cache, num_logits=0)  # [m, T, d]
            for b, seq in enumerate(seqs):
                if seq.options.prompt_logprobs is not None and begin < len(seq.prompt):
                    self._prompt_logprobs(seq, hidden[b, :len(seq.prompt) - begin], begin)
                if self.recorder is not None and begin < len(seq.prompt):
                    self.recorder.hidden(seq.seq_id, begin, hidden[b, :len(seq.prompt) - begin])
            inside = (lengths - 1 >= begin) & (lengths - 1 < end)
            for b in torch.nonzero(inside).flatten().tolist():
                last_hidden[b] = hidden[b, int(lengths[b]) - 1 - begin]
        if cache is not self.cache:
            for b, prompt in enumerate(prompts):
                row = first_row + b
                self.cache.k[:, row, :, :len(prompt)] = cache.k[:, b, :, :len(prompt)]
                self.cache.v[:, row, :, :len(prompt)] = cache.v[:, b, :, :len(prompt)]
        return last_hidden

    def _prompt_logprobs(self, seq: _Sequence, hidden: torch.Tensor, begin: int) -> None:
        """Logprobs of prompt tokens begin+1.. from the hidden states [T, d] of positions
        begin..begin+T-1 (position i predicts token i+1)."""
        if seq.output.prompt_logprobs is None:
            seq.output.prompt_logprobs = [None]  # the first token has no context
        for lo in range(0, hidden.shape[0], LOGPROB_CHUNK):
            logits = self.model.lm_head(hidden[lo:lo + LOGPROB_CHUNK])  # [t, V]
            for i in range(logits.shape[0]):
                nxt = begin + lo + i + 1
                if nxt < len(seq.prompt):
                    seq.output.prompt_logprobs.append(
                        _logprob(logits[i], seq.prompt[nxt], seq.options.prompt_logprobs))

    def _select(self, logits: torch.Tensor, seqs: list[_Sequence]) -> torch.Tensor:
        """First token per sequence from logits [m, V]: argmax, or a sample (with the shared
        generator, or by the sequence's own uniform for output position 0)."""
        tokens = logits.argmax(dim=-1)  # [m]
        for group, rows in _groups(seqs).items():
            if group == "greedy":
                continue
            seq = seqs[rows[0]]
            index = torch.tensor(rows)
            if seq.coupled:
                u = torch.cat([seqs[r].uniform(0, 1) for r in rows])  # [g]
                tokens[index] = sample_from_logits(logits[index], seq.options.sampling, u)
            else:
                probs = logits_to_probs(logits[index], seq.options.sampling)  # [g, V]
                tokens[index] = sample(probs, seq.generator)
        return tokens

    def _decode(self, events: list[Event]) -> None:
        live = self.live
        counts = torch.tensor(self._draft_lens())  # [n] drafts wanted per row
        start = time.perf_counter()
        draft, shared = self._draft(int(counts.max()))
        counts = counts.clamp(max=draft.k)
        if draft.num_drafts is not None:
            counts = torch.minimum(counts, draft.num_drafts)
        width = int(counts.max())  # drafts past every row's own length are never verified
        tokens = draft.tokens[:, :width]  # [n, w]
        probs = draft.probs[:, :width] if draft.probs is not None and shared else None

        positions = torch.tensor([seq.position for seq in live])  # [n]
        pending = torch.tensor([seq.pending for seq in live])  # [n]
        ids = torch.cat([pending[:, None], tokens], dim=1)  # [n, w+1]
        block = positions[:, None] + torch.arange(width + 1)  # [n, w+1]
        greedy_pass = self.recorder is None and all(
            seq.options.sampling.greedy and seq.options.logprobs is None for seq in live)
        if greedy_pass:  # the argmax is all greedy rows need
            _, hidden = self.model(ids, block, self.cache, num_logits=0)  # [n, w+1, d]
            logits, target = None, self.model.greedy_tokens(hidden)  # [n, w+1]
        else:
            logits, hidden = self.model(ids, block, self.cache, num_logits=None)  # [n, w+1, V|d]
            target = None  # greedy rows among sampled ones take the argmax of their logits
        emitted, accepted = self._verify(logits, target, tokens, probs, counts)
        self.steps += 1
        self.row_steps += len(live)
        if self.policy is not None:
            self._measure(start, width > 0, not greedy_pass, counts, accepted)

        now = time.perf_counter()
        for row in range(len(live)):
            seq = live[row]
            if seq.failed is None:
                self._guarded(seq, lambda: self._commit(seq, row, emitted, accepted, counts,
                                                        logits, hidden, now, events))
        self._retire(events)

    def _commit(self, seq: _Sequence, row: int, emitted: torch.Tensor, accepted: torch.Tensor,
                counts: torch.Tensor, logits: torch.Tensor | None, hidden: torch.Tensor,
                now: float, events: list[Event]) -> None:
        """Emit row ``row``'s n + 1 tokens and move it on (emitted [n, w+1], logits [n, w+1, V])."""
        n, drafted = int(accepted[row]), int(counts[row])
        seq.output.stats.record_step(drafted, n, n + 1)
        if self.recorder is not None:  # the pending token and the accepted drafts ran here
            self.recorder.hidden(seq.seq_id, seq.position, hidden[row, :n + 1])
            self.recorder.next_token(seq.seq_id, seq.position, logits[row, :n + 1])
        if seq.schedule is not None:
            seq.schedule.update(drafted, n)
        for i in range(n + 1):
            token = int(emitted[row, i])
            logprob = (_logprob(logits[row, i], token, seq.options.logprobs)
                       if logits is not None else None)
            self._emit(seq, token, i < n, events, logprob, drafted)
            if seq.output.finish is not None:
                break
        seq.history.extend(int(t) for t in emitted[row, :n + 1])
        seq.position += n + 1
        seq.pending = int(emitted[row, n])
        seq.hidden = hidden[row, n]  # [d]
        seq.output.stats.decode_s = now - seq.decode_start

    def _guarded(self, seq: _Sequence, work) -> None:
        """Run one sequence's own work; an exception fails that sequence alone (if isolating)."""
        try:
            work()
        except Exception as err:  # noqa: BLE001 - isolate the request that raised
            if not self.isolate_errors:
                raise
            seq.failed = f"{type(err).__name__}: {err}"

    def _draft_lens(self) -> list[int]:
        """Drafts per live row this step: each row's cap (``_draft_len``, the verify-row cap),
        then, with a policy, what its acceptance and the measured costs say pays."""
        live = self.live
        caps = [self._draft_len(seq) for seq in live]
        if self.max_verify_rows is not None:
            most = max(0, self.max_verify_rows // len(live) - 1)
            caps = [min(k, most) for k in caps]
        if self.policy is None or not any(caps):
            return caps
        rows = [seq.acceptance for seq in live]
        if any(row is None for row in rows):  # rows that joined without drafting
            caps = [0 if row is None else k for row, k in zip(rows, caps)]
            rows = [row or self.policy.new_row(False) for row in rows]
        return self.policy.lengths(rows, caps, [not seq.options.draft_policy for seq in live],
                                   sampled=self._sampled_pass())

    def _sampled_pass(self) -> bool:
        """Whether the next pass computes every logit (a sampled row, logprobs, a recorder)."""
        return self.recorder is not None or any(not seq.options.sampling.greedy
                                                or seq.options.logprobs is not None
                                                for seq in self.live)

    def _measure(self, start: float, drafting: bool, sampled: bool, counts: torch.Tensor,
                 accepted: torch.Tensor) -> None:
        """Feed the policy this step's time (draft, pass, verification) and every row's outcome."""
        ms = (time.perf_counter() - start) * 1e3
        self.policy.costs.observe(len(self.live), drafting, sampled, ms)
        for row, seq in enumerate(self.live):
            if seq.acceptance is not None:
                self.policy.update(seq.acceptance, not seq.options.sampling.greedy,
                                   int(counts[row]), int(accepted[row]))

    def _draft_len(self, seq: _Sequence) -> int:
        """Drafts for this row's next step: its (adaptive) k, never past what it may still emit."""
        if self.proposer is None:
            return 0
        k = seq.schedule.k if seq.schedule is not None else seq.options.draft_k
        left = seq.options.max_new_tokens - len(seq.output.tokens)
        return max(0, min(k, self.max_draft_k, left - 1))

    def _draft(self, k: int) -> tuple[Draft, bool]:
        """Draft k tokens for every live row; also whether they came from the rows' own params."""
        live = self.live
        if k == 0:
            return empty_draft(len(live)), False
        groups = {seq.group for seq in live}
        shared = len(groups) == 1 and not live[0].coupled  # coupled rows take point masses
        params, generator = ((live[0].options.sampling, live[0].generator) if shared
                             else (GREEDY, None))
        state = DraftState(
            tokens=[seq.history for seq in live],
            hidden=torch.stack([seq.hidden for seq in live]),  # [n, d]
            positions=torch.tensor([seq.position for seq in live]),  # [n]
            cache=self.cache, params=params, generator=generator)
        return self.proposer.propose(state, k), shared

    def _verify(self, logits: torch.Tensor | None, target: torch.Tensor | None,
                tokens: torch.Tensor, probs: torch.Tensor | None,
                counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per group of rows: greedy or rejection verification. Either logits [n, w+1, V] or (every
        row greedy) target [n, w+1], the argmax tokens; tokens [n, w], probs [n, w, V] or None,
        counts [n] -> (emitted [n, w+1], accepted [n])."""
        batch, width = tokens.shape
        emitted = torch.full((batch, width + 1), -1, dtype=torch.long)
        accepted = torch.zeros(batch, dtype=torch.long)
        for group, rows in _groups(self.live).items():
            index = torch.tensor(rows) if len(rows) < batch else slice(None)
            try:
                result = self._verify_group(group, rows, index, logits, target, tokens, probs,
                                            counts)
            except Exception as err:  # noqa: BLE001 - these rows fail, the others go on
                if not self.isolate_errors:
                    raise
                for row in rows:
                    self.live[row].failed = f"verification failed: {type(err).__name__}: {err}"
                continue
            emitted[index] = result.tokens
            accepted[index] = result.num_accepted
        return emitted, accepted

    def _verify_group(self, group: Hashable, rows: list[int], index, logits: torch.Tensor | None,
                      target: torch.Tensor | None, tokens: torch.Tensor,
                      probs: torch.Tensor | None, counts: torch.Tensor):
        """One sampling group's verification (see ``_verify`` for the shapes)."""
        if group == "greedy":
            best = target[index] if target is not None else logits[index].argmax(dim=-1)
            return greedy_verify_argmax(best, tokens[index], counts[index])
        seq = self.live[rows[0]]
        if seq.coupled:  # each position's sample only while it can still be emitted
            width = tokens.shape[1] + 1
            u = torch.stack([self.live[r].uniform(self.live[r].produced, width)
                             for r in rows])  # [g, w+1]
            group_logits = logits[index]  # [g, w+1, V]
            params = seq.options.sampling
            return coupled_verify_lazy(
                lambda t, live: sample_from_logits(group_logits[live, t], params, u[live, t]),
                tokens[index], counts[index])
        p = logits_to_probs(logits[index], seq.options.sampling)  # [g, w+1, V]
        q = probs[index] if probs is not None else None
        return rejection_verify(p, tokens[index], q, seq.generator, counts[index])

    # --- output --------------------------------------------------------------------------------

    @staticmethod
    def _emit(seq: _Sequence, token: int, from_draft: bool, events: list[Event],
              logprob: TokenLogprob | None = None, drafted: int = 0) -> None:
        if seq.output.finish is not None:
            return
        text = seq.output.push(token, from_draft, logprob)
        if text is not None:
            events.append(TokenEvent(seq.seq_id, token, from_draft, text, logprob, drafted))

    def _retire(self, events: list[Event]) -> None:
        """Finished or failed sequences report and leave the batch (finished ones release their
        held text first)."""
        done = [row for row, seq in enumerate(self.live)
                if seq.output.finish is not None or seq.failed is not None]
        for row in done:
            seq = self.live[row]
            if seq.failed is not None:
                events.append(FailEvent(seq.seq_id, seq.failed))
                continue
            text = seq.output.close()
            if text:
                events.append(TokenEvent(seq.seq_id, -1, False, text))
            result = seq.output.result()
            if self.recorder is not None:
                ids = seq.prompt + list(result.token_ids)
                self.recorder.finish(seq.seq_id, self.cache, row, min(seq.position, len(ids)), ids)
            events.append(FinishEvent(seq.seq_id, result))
        if done:
            self._remove_rows(done)


def _logprob(logits: torch.Tensor, token: int, top: int | None) -> TokenLogprob | None:
    """``token``'s log-probability under raw logits [V] and the ``top`` likeliest (None: off)."""
    if top is None:
        return None
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [V]
    best = ()
    if top > 0:
        values, ids = torch.topk(logprobs, top)
        best = tuple(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token, float(logprobs[token]), best)


def _groups(seqs: list[_Sequence]) -> dict[Hashable, list[int]]:
    """Row indices of ``seqs`` by sampling group, in order."""
    groups: dict[Hashable, list[int]] = {}
    for row, seq in enumerate(seqs):
        groups.setdefault(seq.group, []).append(row)
    return groups
