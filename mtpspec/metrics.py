"""Speculative-decoding metrics, one convention for the engine, the benchmark and the server.

tau (mean acceptance length) = generated tokens / target verification steps, the bonus (or
recovered) token included, so plain decoding has tau = 1. Per-position acceptance rate i is the
fraction of steps that drafted a token at position i in which that token was accepted.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecStats:
    """Counters of one generation (or a sum over many)."""

    steps: int = 0                 # target forward passes after prefill (verification steps)
    generated: int = 0             # tokens produced by those steps (accepted drafts + bonus)
    draft_proposed: int = 0        # draft tokens sent to verification (llama-server's draft_n)
    draft_accepted: int = 0        # of those, accepted (draft_n_accepted)
    proposed_at: list[int] = field(default_factory=list)  # per draft position i
    accepted_at: list[int] = field(default_factory=list)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    prompt_tokens: int = 0

    def record_step(self, num_drafts: int, num_accepted: int, emitted: int) -> None:
        """One verification step that checked ``num_drafts`` drafts and emitted ``emitted`` tokens."""
        self.steps += 1
        self.generated += emitted
        self.draft_proposed += num_drafts
        self.draft_accepted += num_accepted
        grow = num_drafts - len(self.proposed_at)
        if grow > 0:
            self.proposed_at.extend([0] * grow)
            self.accepted_at.extend([0] * grow)
        for i in range(num_drafts):
            self.proposed_at[i] += 1
            self.accepted_at[i] += i < num_accepted

    def merge(self, other: "SpecStats") -> "SpecStats":
        """Sum of two sets of counters (for totals over prompts)."""
        out = SpecStats(
            steps=self.steps + other.steps, generated=self.generated + other.generated,
            draft_proposed=self.draft_proposed + other.draft_proposed,
            draft_accepted=self.draft_accepted + other.draft_accepted,
            prefill_s=self.prefill_s + other.prefill_s, decode_s=self.decode_s + other.decode_s,
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
        )
        width = max(len(self.proposed_at), len(other.proposed_at))
        pad = lambda xs: xs + [0] * (width - len(xs))  # noqa: E731
        out.proposed_at = [a + b for a, b in zip(pad(self.proposed_at), pad(other.proposed_at))]
        out.accepted_at = [a + b for a, b in zip(pad(self.accepted_at), pad(other.accepted_at))]
        return out

    def __add__(self, other: "SpecStats") -> "SpecStats":
        return self.merge(other)

    @property
    def tau(self) -> float:
        return self.generated / self.steps if self.steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.draft_accepted / self.draft_proposed if self.draft_proposed else 0.0

    @property
    def acceptance_per_position(self) -> list[float]:
        return [a / p if p else 0.0 for a, p in zip(self.accepted_at, self.proposed_at)]

    @property
    def decode_tokens_per_s(self) -> float:
        return self.generated / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def end_to_end_tokens_per_s(self) -> float:
        total = self.decode_s + self.prefill_s
        return self.generated / total if total > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "steps": self.steps, "generated": self.generated,
            "draft_n": self.draft_proposed, "draft_n_accepted": self.draft_accepted,
            "tau": round(self.tau, 4), "acceptance_rate": round(self.acceptance_rate, 4),
            "acceptance_per_position": [round(x, 4) for x in self.acceptance_per_position],
            "prefill_s": round(self.prefill_s, 4), "decode_s": round(self.decode_s, 4),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 3),
            "end_to_end_tokens_per_s": round(self.end_to_end_tokens_per_s, 3),
            "prompt_tokens": self.prompt_tokens,
        }
