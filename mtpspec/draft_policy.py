"""How many tokens each row should draft: measured acceptance against a measured cost of a pass.

Speculation pays only when the tokens a step emits grow faster than what the step costs. A step of
n rows that drafts w tokens per row costs the drafter's w steps plus one target pass over
``n * (w + 1)`` positions; row b then emits ``E_b(w) = 1 + a_b + ... + a_b^w`` tokens on average,
where ``a_b`` is the row's measured acceptance rate (the geometric model: each drafted position is
accepted with probability a, given the ones before it were). The policy picks the width w that
maximizes ``sum_b E_b(w) / cost(n, w)`` (w = 0 is plain decoding), and gives every row whose own
gain ``E_b(w) - 1`` is negligible no drafts at all.

What is measured, and how:
- ``PassCosts``: milliseconds of a target pass (with verification) per (rows n, width w, whether any
  row samples; a sampled pass computes every logit, a greedy one uses the argmax screen), and of one
  drafter step per row count, as exponential moving averages of this process's own timings. A cell
  never measured is estimated from a measured one by the prior shape ``PRIOR_ROWS`` (on 2 CPU cores a
  pass over M positions costs about ``1 + 0.3 (M - 1)`` one-token passes, ../shared/MEASURED.md);
  with nothing measured, the prior alone. Costs live on the ``Engine`` so they outlast one session.
- ``RowAcceptance``: per sequence, an exponentially decayed count of accepted and tested drafts
  (a draft is tested when every draft before it was accepted), started from the session's running
  rate for rows of the same kind (greedy or sampled).
- Re-probing: a row that has not drafted for ``probe_every`` of its steps drafts ``probe_k`` tokens
  once, so a request whose text became predictable (a list, a quote of the prompt) gets drafting
  back, and cost cells of drafting widths keep being measured.

Exactness: this module only chooses draft lengths. Greedy output never depends on them; sampled rows
verified by per-position uniforms (``verify.coupled_verify``) do not either, so a seeded request
gives the same text whatever this policy (and the machine's timing) decides.

Must not: look at the tokens, the logits or a generator; it sees counts and times only.
"""
from __future__ import annotations

from dataclasses import dataclass, field

PRIOR_ROWS = 0.3       # extra cost of each further position in a pass, in one-token passes
PRIOR_PASS_MS = 15.0   # a one-token pass when nothing has been measured yet
PRIOR_DRAFT = 0.1      # one drafter step, in one-token passes, before one is measured


@dataclass(frozen=True)
class PolicyConfig:
    """Knobs of ``DraftPolicy`` (the defaults are what the engine and the server use)."""

    decay: float = 0.9          # weight of the past in a row's acceptance counts, per step
    prior_rate: float = 0.6     # acceptance of a row of a kind never seen (optimistic: it drafts)
    prior_weight: float = 2.0   # tested drafts that prior is worth
    smoothing: float = 0.2      # weight of a new timing in a cost cell's moving average
    min_gain: float = 0.05      # a row whose E(w) - 1 is below this drafts nothing
    margin: float = 0.02        # drafting must beat plain decoding's rate by this fraction
    probe_every: int = 16       # a row that drafted nothing for this many steps drafts once
    probe_k: int = 2            # ... this many tokens


def expected_tokens(rate: float, k: int) -> float:
    """Tokens one step emits with k drafts accepted each with probability ``rate`` (geometric):
    1 + rate + ... + rate^k (the bonus or recovered token included)."""
    if rate >= 1.0:
        return float(k + 1)
    return (1.0 - rate ** (k + 1)) / (1.0 - rate)


@dataclass
class RowAcceptance:
    """One sequence's acceptance, as decayed counts of accepted and tested drafts."""

    accepted: float
    tested: float
    idle: int = 0  # steps since the row last had a draft verified

    @property
    def rate(self) -> float:
        return self.accepted / self.tested if self.tested > 0 else 0.0

    def update(self, drafted: int, accepted: int, decay: float) -> None:
        """A step verified ``drafted`` drafts of this row and accepted the first ``accepted``."""
        if drafted == 0:
            self.idle += 1
            return
        tested = accepted + (accepted < drafted)  # drafts after a rejection are never tested
        self.accepted = decay * self.accepted + accepted
        self.tested = decay * self.tested + tested
        self.idle = 0


@dataclass
class PassCosts:
    """Measured milliseconds of target passes and drafter steps (see the module docstring)."""

    smoothing: float = 0.2
    passes: dict[tuple[int, int, bool], float] = field(default_factory=dict)  # (n, w, sampled)
    draft_steps: dict[int, float] = field(default_factory=dict)  # n -> ms of one drafter step

    @staticmethod
    def prior(rows: int) -> float:
        """A pass over ``rows`` positions, in one-token passes (the prior shape)."""
        return 1.0 + PRIOR_ROWS * (rows - 1)

    def observe_pass(self, n: int, width: int, sampled: bool, ms: float) -> None:
        key = (n, width, sampled)
        old = self.passes.get(key)
        self.passes[key] = ms if old is None else (1 - self.smoothing) * old + self.smoothing * ms

    def observe_draft(self, n: int, steps: int, ms: float) -> None:
        if steps <= 0:
            return
        per_step = ms / steps
        old = self.draft_steps.get(n)
        self.draft_steps[n] = (per_step if old is None
                               else (1 - self.smoothing) * old + self.smoothing * per_step)

    def pass_ms(self, n: int, width: int, sampled: bool) -> float:
        """Measured, else scaled by the prior from the nearest measured cell of the same kind."""
        key = (n, width, sampled)
        if key in self.passes:
            return self.passes[key]
        rows = n * (width + 1)
        same = [(k, ms) for k, ms in self.passes.items() if k[2] == sampled] or list(
            self.passes.items())
        if not same:
            return PRIOR_PASS_MS * self.prior(rows)
        (kn, kw, _), ms = min(same, key=lambda item: (abs(item[0][0] - n), abs(item[0][1] - width)))
        return ms * self.prior(rows) / self.prior(kn * (kw + 1))

    def draft_ms(self, n: int, sampled: bool) -> float:
        """One drafter step for n rows."""
        if n in self.draft_steps:
            return self.draft_steps[n]
        if self.draft_steps:
            near = min(self.draft_steps, key=lambda m: abs(m - n))
            return self.draft_steps[near]
        return PRIOR_DRAFT * self.pass_ms(1, 0, sampled)


class DraftPolicy:
    """Per-step draft lengths for the rows of a session (see the module docstring)."""

    def __init__(self, costs: PassCosts | None = None, config: PolicyConfig = PolicyConfig()):
        self.config = config
        self.costs = costs if costs is not None else PassCosts(config.smoothing)
        # running acceptance of all rows of a kind (True: sampled), the start of a new row's
        self._kind: dict[bool, RowAcceptance] = {}

    def new_row(self, sampled: bool) -> RowAcceptance:
        """Acceptance counts for a joining row: the kind's running rate, at the prior's weight."""
        cfg = self.config
        kind = self._kind.get(sampled)
        rate = kind.rate if kind is not None and kind.tested > 0 else cfg.prior_rate
        return RowAcceptance(rate * cfg.prior_weight, cfg.prior_weight)

    def update(self, row: RowAcceptance, sampled: bool, drafted: int, accepted: int) -> None:
        """Record a step of one row (and of its kind's running rate)."""
        row.update(drafted, accepted, self.config.decay)
        if drafted:
            kind = self._kind.setdefault(sampled, RowAcceptance(0.0, 0.0))
            kind.update(drafted, accepted, self.config.decay)

    def lengths(self, rows: list[RowAcceptance], caps: list[int], fixed: list[bool],
                sampled: bool) -> list[int]:
        """Drafts per row this step. caps[b]: the most row b may draft; fixed[b]: the row opted
        out of the policy (it drafts its cap); sampled: whether any row samples (the pass kind)."""
        n, cfg = len(rows), self.config
        widest = max(caps, default=0)
        if widest == 0:
            return [0] * n
        rates = [row.rate for row in rows]
        plain = n / (self.costs.pass_ms(n, 0, sampled))
        best_w, best = 0, plain * (1 + cfg.margin)
        for w in range(1, widest + 1):
            tokens = sum(expected_tokens(r, min(w, c)) for r, c in zip(rates, caps))
            ms = self.costs.pass_ms(n, w, sampled) + w * self.costs.draft_ms(n, sampled)
            if tokens / ms > best:
                best_w, best = w, tokens / ms
        out = []
        for rate, cap, row, own in zip(rates, caps, rows, fixed):
            k = min(best_w, cap)
            if own:
                k = cap
            elif k and expected_tokens(rate, k) - 1 < cfg.min_gain:
                k = 0
            elif k == 0 and row.idle >= cfg.probe_every:
                k = min(cfg.probe_k, cap)  # re-probe a row that has not drafted for a while
            out.append(k)
        return out
