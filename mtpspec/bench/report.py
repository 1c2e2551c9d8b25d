"""Benchmark summaries: the JSON document, the terminal table, and the PNG plot.

``summarize`` turns a ``BenchRun`` into one JSON-ready dict; ``format_table`` renders it for people
and ``plot`` draws it. Ratios are taken only within one run (the baseline is ``plain`` from the
same process), and nothing here times anything.

JSON document (``mtpspec bench --json OUT``; the last line of stdout is the same document)::

    benchmark        "mtpspec-bench"; version: 1
    model, weights   the target (name, weight format); hf and hf-lookup use float32 weights, hf-bf16
                     bfloat16
    settings         max_new_tokens, temperature, top_k, top_p, seed, batch_size, greedy (bool),
                     draft_ks (list), warmup (bool)
    prompts          {"source": file or "builtin", "count": n, "categories": {category: n}}
    methods          method names in run order, e.g. ["plain", "ngram@k=2", "ngram@k=4", "hf"]
    peak_rss_bytes   the process's resident-memory high-water mark (process-wide: all methods)
    wall_s           seconds for warm-up plus all runs
    results[method]:
      method            the base method ("plain", "ngram", "draft-model", "mtp", "hf", "hf-bf16",
                        "hf-lookup")
      draft_k           draft length (hf-lookup: prompt_lookup_num_tokens; null without drafting)
      tokens            generated tokens over all prompts
      tokens_per_s      decode-only throughput: tokens after the first / time after the first token
      end_to_end_tokens_per_s   all generated tokens / (prefill + decode time)
      prefill_s, decode_s       summed over prompts (a batch's time is shared out by tokens)
      speedup           tokens_per_s / plain's tokens_per_s (null when plain was not run)
      end_to_end_speedup        the same for end_to_end_tokens_per_s
      speedup_median    median over prompts of the per-prompt decode speedup: robust to one slow
                        spell of a shared machine (null without plain)
      tau               mean acceptance length: generated tokens / target verification steps, the
                        bonus token included (plain: 1.0; hf methods: tokens per streamed chunk)
      acceptance_rate   draft_n_accepted / draft_n (null when nothing was drafted, and for hf)
      acceptance_per_position   [rate at draft position 1, 2, ...]
      draft_n, draft_n_accepted draft tokens proposed and accepted (llama-server's names)
      steps             target verification steps after prefill
      mismatches        greedy runs: prompts whose token_ids differ from plain's (must be 0 for
                        our methods; hf may differ on near-ties); null for sampling or without plain
      mismatched_ids    the ids of those prompts
      extra_memory_bytes  memory the method adds over the target: draft model weights + its KV
                        cache, the MTP head's own weights, the hf model's weights; 0 for plain and
                        ngram; null when unknown
      rss_growth_bytes  rise of the process's peak RSS during this method's warm-up (rough)
      categories[category]  tokens, tokens_per_s, end_to_end_tokens_per_s, speedup,
                        end_to_end_speedup, speedup_median, tau, acceptance_rate,
                        acceptance_per_position, draft_n, draft_n_accepted, mismatches: as above,
                        over that category
      outputs           one per prompt, in prompt order: id (the file's id or question_id),
                        category, token_ids (generated tokens only), text, prefill_s, decode_s
"""
from __future__ import annotations

import math
import statistics
from collections import Counter
from functools import reduce

from mtpspec.bench.methods import Run
from mtpspec.bench.runner import BenchRun
from mtpspec.metrics import SpecStats

BASELINE = "plain"


def _rate(count: float, seconds: float) -> float | None:
    return round(count / seconds, 3) if seconds > 0 else None


def _ratio(value: float | None, base: float | None) -> float | None:
    return round(value / base, 4) if value is not None and base else None


def _aggregate(runs: list[Run], baseline: list[Run] | None, greedy: bool, ids: list) -> dict:
    """Throughput, acceptance and exactness of ``runs`` (one method, some prompts)."""
    tokens = sum(len(r.token_ids) for r in runs)
    decode_tokens = sum(r.decode_tokens for r in runs)
    prefill_s = sum(r.prefill_s for r in runs)
    decode_s = sum(r.decode_s for r in runs)
    out = {
        "tokens": tokens,
        "tokens_per_s": _rate(decode_tokens, decode_s),
        "end_to_end_tokens_per_s": _rate(tokens, prefill_s + decode_s),
        "prefill_s": round(prefill_s, 4), "decode_s": round(decode_s, 4),
    }
    engine_stats = [r.stats for r in runs if r.stats is not None]
    if len(engine_stats) == len(runs):
        stats = reduce(SpecStats.merge, engine_stats, SpecStats())
        accepted = round(stats.acceptance_rate, 4) if stats.draft_proposed else None
        out.update(tau=round(stats.tau, 4), acceptance_rate=accepted,
                   acceptance_per_position=[round(x, 4) for x in stats.acceptance_per_position],
                   draft_n=stats.draft_proposed, draft_n_accepted=stats.draft_accepted,
                   steps=stats.steps)
    else:
        steps = sum(r.steps or 0 for r in runs)
        out.update(tau=round(decode_tokens / steps, 4) if steps else None, acceptance_rate=None,
                   acceptance_per_position=[], draft_n=None, draft_n_accepted=None, steps=steps)
    out["speedup_median"] = None
    if baseline is not None:
        ratios = [(r.decode_tokens / r.decode_s) / (b.decode_tokens / b.decode_s)
                  for r, b in zip(runs, baseline)
                  if r.decode_s > 0 and b.decode_s > 0 and r.decode_tokens and b.decode_tokens]
        out["speedup_median"] = round(statistics.median(ratios), 4) if ratios else None
    if greedy and baseline is not None:
        differ = [i for i, run, base in zip(ids, runs, baseline) if run.token_ids != base.token_ids]
        out.update(mismatches=len(differ), mismatched_ids=differ)
    else:
        out.update(mismatches=None, mismatched_ids=None)
    return out


def _add_speedups(entry: dict, base: dict | None) -> None:
    entry["speedup"] = _ratio(entry["tokens_per_s"], base and base["tokens_per_s"])
    entry["end_to_end_speedup"] = _ratio(entry["end_to_end_tokens_per_s"],
                                         base and base["end_to_end_tokens_per_s"])


def summarize(bench: BenchRun, model: str = "", weights: str = "", source: str = "builtin",
              draft_ks: tuple[int, ...] = ()) -> dict:
    """The JSON document described in the module docstring."""
    config, prompts = bench.config, bench.prompts
    greedy = config.sampling.greedy
    by_name = {record.method.name: record for record in bench.methods}
    base_record = by_name.get(BASELINE)
    categories = list(dict.fromkeys(p.category for p in prompts))
    ids = [p.id for p in prompts]

    def pick(runs: list, category: str | None) -> list:
        return [r for r, p in zip(runs, prompts) if category is None or p.category == category]

    def pick_ids(category: str) -> list:
        return [p.id for p in prompts if p.category == category]

    baseline_all = base_record.runs if base_record else None
    base_summary = _aggregate(baseline_all, None, False, ids) if baseline_all else None
    base_by_category = {c: _aggregate(pick(baseline_all, c), None, False, pick_ids(c))
                        for c in categories} if baseline_all else {}
    results = {}
    for record in bench.methods:
        method = record.method
        entry = {"method": method.base, "draft_k": method.draft_k}
        entry.update(_aggregate(record.runs, baseline_all, greedy, ids))
        _add_speedups(entry, base_summary)
        entry["extra_memory_bytes"] = method.extra_memory_bytes
        entry["rss_growth_bytes"] = record.rss_growth_bytes
        entry["categories"] = {}
        for category in categories:
            sub = _aggregate(pick(record.runs, category),
                             pick(baseline_all, category) if baseline_all else None,
                             greedy, pick_ids(category))
            sub.pop("mismatched_ids")
            _add_speedups(sub, base_by_category.get(category))
            entry["categories"][category] = sub
        entry["outputs"] = [
            {"id": p.id, "category": p.category, "token_ids": r.token_ids, "text": r.text,
             "prefill_s": round(r.prefill_s, 4), "decode_s": round(r.decode_s, 4)}
            for p, r in zip(prompts, record.runs)
        ]
        results[method.name] = entry
    sampling = config.sampling
    return {
        "benchmark": "mtpspec-bench", "version": 1, "model": model, "weights": weights,
        "settings": {"max_new_tokens": config.max_new_tokens, "temperature": sampling.temperature,
                     "top_k": sampling.top_k, "top_p": sampling.top_p, "seed": sampling.seed,
                     "batch_size": config.batch_size, "greedy": greedy,
                     "draft_ks": list(draft_ks), "warmup": config.warmup},
        "prompts": {"source": source, "count": len(prompts),
                    "categories": dict(Counter(p.category for p in prompts))},
        "methods": list(results),
        "peak_rss_bytes": bench.peak_rss_bytes,
        "wall_s": round(bench.wall_s, 3),
        "results": results,
    }


# --- the terminal table ---------------------------------------------------------------------------

def _fmt(value, spec: str = ".2f", suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:{spec}}{suffix}"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def _grid(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    line = lambda row: "  ".join(  # noqa: E731
        cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def format_table(doc: dict) -> str:
    """Readable tables: one row per method, then speedup per category, then acceptance."""
    settings, results = doc["settings"], doc["results"]
    mode = "greedy" if settings["greedy"] else (
        f"T={settings['temperature']} top_k={settings['top_k']} top_p={settings['top_p']}")
    title = (f"{doc['model']} ({doc['weights']}), {doc['prompts']['count']} prompts from "
             f"{doc['prompts']['source']}, {settings['max_new_tokens']} new tokens, {mode}, "
             f"batch {settings['batch_size']}")
    header = ["method", "tok/s", "e2e tok/s", "speedup", "median x", "e2e x", "tau", "accept",
              "drafted", "accepted", "mismatch", "extra MiB"]
    rows = []
    for name, r in results.items():
        rows.append([name, _fmt(r["tokens_per_s"]), _fmt(r["end_to_end_tokens_per_s"]),
                     _fmt(r["speedup"], ".2f", "x"), _fmt(r["speedup_median"], ".2f", "x"),
                     _fmt(r["end_to_end_speedup"], ".2f", "x"),
                     _fmt(r["tau"]), _fmt(r["acceptance_rate"], ".1%"), _fmt(r["draft_n"], "d"),
                     _fmt(r["draft_n_accepted"], "d"), _fmt(r["mismatches"], "d"),
                     _mib(r["extra_memory_bytes"])])
    parts = [title, "", _grid(header, rows)]
    categories = list(doc["prompts"]["categories"])
    if len(categories) > 1 or any(r["speedup"] is not None for r in results.values()):
        cat_rows = [[c] + [_fmt(r["categories"][c]["speedup"], ".2f", "x") for r in results.values()]
                    for c in categories]
        parts += ["", "speedup (decode tok/s vs plain) per category",
                  _grid(["category", *results], cat_rows)]
    width = max((len(r["acceptance_per_position"]) for r in results.values()), default=0)
    if width:
        acc_rows = [[name] + [_fmt(x, ".2f") for x in r["acceptance_per_position"]]
                    + [""] * (width - len(r["acceptance_per_position"]))
                    for name, r in results.items() if r["acceptance_per_position"]]
        parts += ["", "acceptance per draft position",
                  _grid(["method", *(str(i + 1) for i in range(width))], acc_rows)]
    parts += ["", f"peak RSS {_mib(doc['peak_rss_bytes'])} MiB (whole process), "
                  f"wall {doc['wall_s']:.1f} s"]
    return "\n".join(parts)


# --- the plot -------------------------------------------------------------------------------------

def _bars(axis, results: dict, names: list[str], categories: list[str], key: str) -> None:
    """Grouped bars of ``results[name][key]`` per category (the last one, "all", the overall)."""
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        r = results[name]
        values = [r["categories"][c][key] or 0.0 for c in categories[:-1]] + [r[key] or 0.0]
        axis.bar([x + i * width for x in range(len(categories))], values, width, label=name)
    axis.axhline(1.0, color="black", linewidth=0.8)
    axis.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(categories))])
    axis.set_xticklabels(categories, rotation=30, ha="right")
    if names:
        axis.legend(fontsize="small", framealpha=0.9)


def plot(doc: dict, path: str) -> str | None:
    """Write a PNG: decode speedup and tau per category and method, acceptance per draft position.

    Returns None on success, or a note saying why no plot was written (matplotlib missing).
    """
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed (pip install 'mtpspec[bench]'); no plot written"
    matplotlib.use("Agg")
    from matplotlib import pyplot
    from matplotlib.ticker import MaxNLocator

    results = doc["results"]
    categories = [*doc["prompts"]["categories"], "all"]
    compared = [name for name, r in results.items() if name != BASELINE and r["speedup"] is not None]
    drafting = [name for name, r in results.items() if r["draft_n"]]
    figure, (left, middle, right) = pyplot.subplots(1, 3, figsize=(18, 4.8))
    _bars(left, results, compared, categories, "speedup")
    left.set_ylabel("decode speedup vs plain")
    left.set_title("speedup per category")
    _bars(middle, results, drafting, categories, "tau")
    middle.set_ylabel("tau: tokens per target pass")
    middle.set_title("mean acceptance length per category")
    for name, r in results.items():
        rates = r["acceptance_per_position"]
        if rates:
            right.plot(range(1, len(rates) + 1), rates, marker="o", label=name)
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.set_xlabel("draft position")
    right.set_ylabel("acceptance rate")
    right.set_ylim(0, 1.02)
    right.set_title("acceptance per draft position")
    if right.lines:
        right.legend(fontsize="small")
    figure.suptitle(f"{doc['model']} ({doc['weights']})")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
    return None
