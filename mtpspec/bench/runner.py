"""Runs decoding methods side by side on one set of prompts, in one process, interleaved.

Every method first generates once (a short warm-up on the first prompt), so one-time costs (kernel
builds, allocator growth, lazy tables) stay out of the numbers. Then prompts go in batches of
``batch_size``: batch 1 by every method, batch 2 by every method, and so on, with the method
order rotated per batch, so a slow spell of a noisy machine hits all methods alike and the ratios
between them stay fair. The runner takes already-built methods (see ``methods``), so tests need no
real model; it records raw runs and leaves every ratio and summary to ``report``. On a terminal
(unless ``quiet``) progress bars show the warm-up and the runs, one step per method and prompt,
with the rate, the ETA and the method and prompt running.
"""
from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from mtpspec import progress
from mtpspec.bench.methods import Method, Run
from mtpspec.bench.prompts import BenchPrompt
from mtpspec.engine import GenerateOptions
from mtpspec.sampling import SamplingParams

WARMUP_TOKENS = 16


@dataclass(frozen=True)
class BenchConfig:
    max_new_tokens: int = 64
    sampling: SamplingParams = field(default_factory=SamplingParams)
    batch_size: int = 1
    warmup: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {self.batch_size!r}")

    def options(self) -> GenerateOptions:
        return GenerateOptions(max_new_tokens=self.max_new_tokens, sampling=self.sampling)


@dataclass
class MethodRuns:
    method: Method
    runs: list[Run | None]   # one per prompt, in prompt order
    rss_growth_bytes: int = 0  # rise of the process's peak RSS during this method's warm-up


@dataclass
class BenchRun:
    prompts: list[BenchPrompt]
    config: BenchConfig
    methods: list[MethodRuns]
    peak_rss_bytes: int
    wall_s: float


def peak_rss_bytes() -> int:
    """The process's resident-memory high-water mark (process-wide, never goes down)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def run_bench(methods: list[Method], prompts: list[BenchPrompt], prompt_ids: list[list[int]],
              config: BenchConfig, log: Callable[[str], None] | None = None,
              quiet: bool = False) -> BenchRun:
    """Warm every method up, then run all prompts by all methods, interleaved per batch."""
    if not methods:
        raise ValueError("no methods to run")
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"method names must be unique, got {names}")
    if len(prompts) != len(prompt_ids) or not prompts:
        raise ValueError("need one token-id list per prompt, and at least one prompt")
    log = log or (lambda message: None)
    options = config.options()
    records = [MethodRuns(method, [None] * len(prompts)) for method in methods]
    start = time.perf_counter()
    if config.warmup:
        warm = replace(options, max_new_tokens=min(WARMUP_TOKENS, options.max_new_tokens))
        with progress.bar(len(records), "bench: warm-up", "method", quiet) as warming:
            for record in records:
                warming.set_postfix_str(record.method.name, refresh=False)
                before = peak_rss_bytes()
                record.method.run([prompt_ids[0]], warm)
                record.rss_growth_bytes = peak_rss_bytes() - before
                warming.update(1)
        log(f"warmed up {len(methods)} methods in {time.perf_counter() - start:.1f} s")
    batches = [list(range(i, min(i + config.batch_size, len(prompts))))
               for i in range(0, len(prompts), config.batch_size)]
    with progress.bar(len(records) * len(prompts), "bench", "run", quiet, leave=True) as runs_bar:
        for number, batch in enumerate(batches):
            rotation = number % len(records)
            first = prompts[batch[0]]
            for record in records[rotation:] + records[:rotation]:
                runs_bar.set_postfix_str(f"{record.method.name} on {first.id} ({first.category})",
                                         refresh=False)
                runs = record.method.run([prompt_ids[i] for i in batch], options)
                for index, run in zip(batch, runs):
                    record.runs[index] = run
                runs_bar.update(len(batch))
            log(f"batch {number + 1}/{len(batches)} done (prompt {first.id}, {first.category})")
    return BenchRun(prompts=prompts, config=config, methods=records,
                    peak_rss_bytes=peak_rss_bytes(), wall_s=time.perf_counter() - start)
