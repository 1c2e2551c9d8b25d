"""Side-by-side decode timing for the comparison scripts (``bench/vs_transformers.py``,
``bench/vs_llamacpp.py``): warm every method up, then run every prompt by every method in a
rotating order, keeping each method's fastest of ``repeats`` runs per prompt, so that a noisy
2-core machine slows all methods alike. Only decoding is timed (what ``Run.decode_s`` covers).
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from mtpspec.bench.methods import Method, Run
from mtpspec.engine import GenerateOptions

WARMUP_TOKENS = 16


@dataclass
class Timing:
    """Decode timings of one method over all prompts."""

    tokens: list[int] = field(default_factory=list)         # per prompt: tokens after the first
    seconds: list[float] = field(default_factory=list)      # per prompt: their decode seconds
    outputs: list[list[int]] = field(default_factory=list)  # per prompt: the generated ids

    @property
    def tokens_per_s(self) -> float:
        return sum(self.tokens) / sum(self.seconds)

    @property
    def median_tokens_per_s(self) -> float:
        return statistics.median(t / s for t, s in zip(self.tokens, self.seconds))


def seconds_per_token(run: Run) -> float:
    return run.decode_s / max(run.decode_tokens, 1)


def run_interleaved(methods: list[Method], prompt_ids: list[list[int]], max_new_tokens: int,
                    repeats: int = 1, log=print) -> dict[str, Timing]:
    """Warm up, then every prompt by every method (rotated order; fastest of ``repeats``)."""
    options = GenerateOptions(max_new_tokens=max_new_tokens, ignore_eos=True)
    warm = GenerateOptions(max_new_tokens=min(WARMUP_TOKENS, max_new_tokens), ignore_eos=True)
    for method in methods:
        method.run([prompt_ids[0]], warm)
    timings = {m.name: Timing() for m in methods}
    for number, ids in enumerate(prompt_ids):
        best: dict[str, Run] = {}
        for repeat in range(repeats):
            rotation = (number * repeats + repeat) % len(methods)
            for method in methods[rotation:] + methods[:rotation]:
                result = method.run([ids], options)[0]
                kept = best.get(method.name)
                if kept is None or seconds_per_token(result) < seconds_per_token(kept):
                    best[method.name] = result
        for name, result in best.items():
            timings[name].tokens.append(result.decode_tokens)
            timings[name].seconds.append(result.decode_s)
            timings[name].outputs.append(result.token_ids)
        rates = ", ".join(f"{name} {r.decode_tokens / r.decode_s:.1f}" for name, r in best.items())
        log(f"prompt {number + 1}/{len(prompt_ids)} ({len(ids)} tokens): {rates} tok/s")
    return timings
