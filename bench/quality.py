"""Accuracy of each weight format against float32 on the default model (issue #7, item 4).

Per format (float32 first: it is the reference):
* perplexity of a fixed text shipped in the repo (``docs/quality-text.txt``, ~2.2k tokens of
  original prose), teacher-forced, and the top-1 agreement with float32 at every position;
* greedy continuations (batch 1, ``--max-new-tokens``, end-of-sequence ignored) of the development
  prompts against float32's: identical continuations, mean/min first-divergence position, and the
  fraction of tokens before the first divergence.
Prints a table, then one JSON line (``--json FILE`` writes it too). Times nothing that matters.

Run: .venv/bin/python bench/quality.py [--prompts docs/mtbench16.jsonl]
     [--formats fp32,bf16,int8,int4]
     [--max-new-tokens 128] [--limit N] [--json docs/quality.json]
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

from mtpspec.bench.prompts import load_prompts, prompt_token_ids, select_prompts
from mtpspec.bench.quality import greedy_agreement, score_text, top1_agreement
from mtpspec.engine import Engine, GenerateOptions
from mtpspec.ops import FORMATS
from mtpspec.runtime import configure_threads, load_target

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = "fp32"


def evaluate(fmt: str, args, text: str, prompts) -> dict:
    """Text score and greedy continuations of one format (the model is dropped afterwards)."""
    target = load_target(args.model, fmt)
    ids = target.tokenizer.encode(text)
    start = time.perf_counter()
    score = score_text(target.model, ids)
    engine = Engine(target.model, target.tokenizer, None, max_len=4096)
    options = GenerateOptions(max_new_tokens=args.max_new_tokens, ignore_eos=True)
    outputs = [engine.generate([prompt_token_ids(p, target.tokenizer)], options)[0].token_ids
               for p in prompts]
    print(f"{fmt}: perplexity {score.perplexity:.3f} over {score.tokens} tokens; "
          f"{len(outputs)} continuations in {time.perf_counter() - start:.0f} s", flush=True)
    return {"score": score, "outputs": outputs}


def format_table(doc: dict) -> str:
    header = (f"{'format':<7}{'perplexity':>11}{'vs fp32':>9}{'top-1 = fp32':>13}"
              f"{'identical':>11}{'1st diverg.':>12}{'min':>5}{'prefix':>8}{'tok match':>10}")
    lines = [header, "-" * len(header)]
    for fmt, r in doc["results"].items():
        g = r["greedy_vs_fp32"]
        lines.append(f"{fmt:<7}{r['perplexity']:>11.3f}{r['perplexity_ratio_to_fp32']:>8.4f}x"
                     f"{r['top1_agreement_with_fp32']:>12.2%} "
                     f"{g['identical']:>6}/{g['prompts']:<4}{g['mean_first_divergence']:>12.1f}"
                     f"{g['min_first_divergence']:>5}{g['prefix_fraction']:>8.1%}"
                     f"{g['token_match_fraction']:>10.1%}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="GGUF file or HF folder (default: embedded)")
    parser.add_argument("--text", type=Path, default=ROOT / "docs" / "quality-text.txt")
    parser.add_argument("--prompts", type=Path, default=ROOT / "docs" / "mtbench16.jsonl",
                        help="JSONL prompts (MT-bench 'turns' or 'prompt')")
    parser.add_argument("--limit", type=int, default=None, help="use the first N prompts")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--formats", default=",".join(FORMATS),
                        help="comma-separated; fp32 is always run first as the reference")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    formats = [REFERENCE] + [f for f in args.formats.split(",") if f and f != REFERENCE]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        parser.error(f"--formats: choose from {', '.join(FORMATS)}, got {unknown}")

    configure_threads()
    text = args.text.read_text(encoding="utf-8")
    prompts = select_prompts(load_prompts(args.prompts), limit=args.limit)
    runs = {fmt: evaluate(fmt, args, text, prompts) for fmt in formats}
    ref = runs[REFERENCE]
    results = {}
    for fmt, run in runs.items():
        score = run["score"]
        results[fmt] = {
            "perplexity": score.perplexity, "mean_nll": score.mean_nll, "text_tokens": score.tokens,
            "perplexity_ratio_to_fp32": score.perplexity / ref["score"].perplexity,
            "top1_agreement_with_fp32": top1_agreement(ref["score"], score),
            "greedy_vs_fp32": asdict(greedy_agreement(ref["outputs"], run["outputs"])),
        }
    doc = {"benchmark": "mtpspec-quality", "text": args.text.name, "prompts": str(args.prompts),
           "prompt_count": len(prompts), "max_new_tokens": args.max_new_tokens, "batch_size": 1,
           "greedy": True, "reference": REFERENCE, "results": results}
    print()
    print(format_table(doc))
    line = json.dumps(doc)
    if args.json is not None:
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    print(line)
    return doc


if __name__ == "__main__":
    main()
