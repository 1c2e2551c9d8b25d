"""Whether each row should draft this step: its measured tokens per step against step costs.

Speculation pays only when a drafting step emits more tokens per millisecond than a plain one. A
plain step of n rows emits n tokens; a drafting step emits ``1 + accepted`` for each row, and costs
the drafter's steps plus a target pass over ``n * (w + 1)`` positions. Both sides are measured
rather than modelled, because the proposer picks its own draft lengths (the MTP head's confidence
stop) and a pass's cost per position depends on the machine, the format and whether it must
compute every logit (a sampled row) or only the argmax (``screen``):

- ``StepCosts``: milliseconds of a whole step (draft, target pass, verification) per (rows n,
  drafting or not, whether any row samples): the median of this process's last ``window`` timings
  of that kind (a median, because on a shared machine one step in a few takes twice as long, and
  a drafting cell is timed rarely while drafting is off). A cell never measured is estimated
  from its sibling by the prior shape ``1 + 0.3 (M - 1)`` one-token passes for a pass over M
  positions (2 CPU cores, ../shared/MEASURED.md), assuming ``PRIOR_WIDTH`` drafts per row; with
  neither measured, the policy drafts (and so measures). The ``Engine`` keeps one policy, so
  what it measured (costs, the running figures per kind of row) outlasts a session.
- ``RowAcceptance``: per sequence, exponentially decayed counts of its drafting steps and of the
  tokens they emitted, started from the session's running figures for rows of the same kind
  (greedy or sampled), or from an optimistic prior.

Rule: rows whose tokens per drafting step exceed 1 by at least ``min_gain`` would draft; they do
when ``(n + sum of their gains) / cost(n, drafting)`` beats ``n / cost(n, plain)`` by ``margin``.
Otherwise no row drafts this step, but a row that has not drafted for ``probe_every`` of its
steps drafts once (``probe_k`` tokens), so a request whose text became predictable gets drafting
back and the drafting costs stay measured; each probe that does not turn drafting back on doubles
the row's wait for the next one (up to ``probe_most`` steps), so probing a request that cannot
pay costs a few percent at first and next to nothing later. Each drafting row drafts its cap: the
proposer's own stop and the session's caps shorten it.

Exactness: this module only chooses draft lengths. Greedy output never depends on them; sampled
rows verified by per-position uniforms (``verify.coupled_verify``) do not either, so a seeded
request gives the same text whatever this policy (and the machine's timing) decides.

Must not: look at the tokens, the logits or a generator; it sees counts and times only.
"""
from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field

PRIOR_ROWS = 0.3   # extra cost of each further position in a pass, in one-token passes
PRIOR_WIDTH = 2    # drafts per row assumed when a drafting step's cost is estimated


@dataclass(frozen=True)
class PolicyConfig:
    """Knobs of ``DraftPolicy`` (the defaults are what the engine and the server use)."""

    decay: float = 0.9          # weight of the past in a row's counts, per drafting step
    prior_tokens: float = 2.0   # tokens per drafting step of a row of a kind never seen
    prior_weight: float = 2.0   # drafting steps that prior is worth
    window: int = 9             # timings per cost cell (the cell's figure is their median)
    min_gain: float = 0.05      # a row that gains less than this per drafting step drafts not
    margin: float = 0.03        # drafting must beat plain decoding's rate by this fraction
    probe_every: int = 8        # a row that drafted nothing for this many steps drafts once
    probe_k: int = 2            # ... this many tokens (at most its cap)
    probe_most: int = 128       # the longest wait between probes (the wait doubles per probe)


@dataclass
class RowAcceptance:
    """One sequence's drafting record: decayed counts of drafting steps and their tokens."""

    tokens: float
    steps: float
    idle: int = 0  # steps since the row last had a draft verified
    probe_wait: int = 0  # idle steps before the next probe (0: the policy's probe_every)

    @property
    def per_step(self) -> float:
        """Tokens a drafting step emits for this row (1 + accepted drafts), on average."""
        return self.tokens / self.steps if self.steps > 0 else 1.0

    def update(self, drafted: int, accepted: int, decay: float) -> None:
        """A step verified ``drafted`` drafts of this row and accepted the first ``accepted``."""
        if drafted == 0:
            self.idle += 1
            return
        self.tokens = decay * self.tokens + accepted + 1
        self.steps = decay * self.steps + 1
        self.idle = 0


def prior_pass(rows: int) -> float:
    """A pass over ``rows`` positions, in one-token passes (the prior shape)."""
    return 1.0 + PRIOR_ROWS * (rows - 1)


@dataclass
class StepCosts:
    """Measured milliseconds of whole steps (see the module docstring)."""

    window: int = 9
    # (rows n, drafting, sampled) -> the last ``window`` timings, ms
    timings: dict[tuple[int, bool, bool], deque[float]] = field(default_factory=dict)
    steps: dict[tuple[int, bool, bool], float] = field(default_factory=dict)  # their medians

    def observe(self, n: int, drafting: bool, sampled: bool, ms: float) -> None:
        key = (n, drafting, sampled)
        cell = self.timings.setdefault(key, deque(maxlen=self.window))
        cell.append(ms)
        self.steps[key] = statistics.median(cell)

    def step_ms(self, n: int, drafting: bool, sampled: bool) -> float | None:
        """Measured, else estimated from the sibling cell (drafting or not); None: neither."""
        key = (n, drafting, sampled)
        if key in self.steps:
            return self.steps[key]
        sibling = self.steps.get((n, not drafting, sampled))
        if sibling is None:
            return None
        ratio = prior_pass(n * (PRIOR_WIDTH + 1)) / prior_pass(n)
        return sibling * ratio if drafting else sibling / ratio


class DraftPolicy:
    """Per-step draft lengths for the rows of a session (see the module docstring)."""

    def __init__(self, costs: StepCosts | None = None, config: PolicyConfig = PolicyConfig()):
        self.config = config
        self.costs = costs if costs is not None else StepCosts(config.window)
        self._kind: dict[bool, RowAcceptance] = {}  # running record of all rows of a kind

    def new_row(self, sampled: bool) -> RowAcceptance:
        """The record of a joining row: its kind's running figure, at the prior's weight."""
        cfg = self.config
        kind = self._kind.get(sampled)
        per_step = kind.per_step if kind is not None and kind.steps > 0 else cfg.prior_tokens
        return RowAcceptance(per_step * cfg.prior_weight, cfg.prior_weight)

    def update(self, row: RowAcceptance, sampled: bool, drafted: int, accepted: int) -> None:
        """Record a step of one row (and of its kind's running figure)."""
        row.update(drafted, accepted, self.config.decay)
        if drafted:
            kind = self._kind.setdefault(sampled, RowAcceptance(0.0, 0.0))
            kind.update(drafted, accepted, self.config.decay)

    def lengths(self, rows: list[RowAcceptance], caps: list[int], fixed: list[bool],
                sampled: bool) -> list[int]:
        """Drafts per row this step. caps[b]: the most row b may draft; fixed[b]: the row opted
        out of the policy (it drafts its cap); sampled: whether any row samples (the pass kind)."""
        n, cfg = len(rows), self.config
        gains = [row.per_step - 1 for row in rows]
        useful = [gain >= cfg.min_gain and cap > 0 for gain, cap in zip(gains, caps)]
        on = any(useful) and self._pays(n, sum(g for g, u in zip(gains, useful) if u), sampled)
        out = []
        for row, cap, own, use in zip(rows, caps, fixed, useful):
            if own:
                out.append(cap)
            elif on and use:
                row.probe_wait = 0
                out.append(cap)
            elif row.idle >= (row.probe_wait or cfg.probe_every):  # re-probe, then wait longer
                row.probe_wait = min(2 * (row.probe_wait or cfg.probe_every), cfg.probe_most)
                out.append(min(cfg.probe_k, cap))
            else:
                out.append(0)
        return out

    def _pays(self, n: int, gain: float, sampled: bool) -> bool:
        """Whether n rows that gain ``gain`` tokens in all per drafting step should draft."""
        drafting = self.costs.step_ms(n, True, sampled)
        plain = self.costs.step_ms(n, False, sampled)
        if drafting is None or plain is None:  # nothing measured yet: draft, and so measure
            return True
        return (n + gain) / drafting > (1 + self.config.margin) * n / plain
