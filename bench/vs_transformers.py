"""Side by side: our plain decoding vs transformers' ``model.generate`` on the same weights.

The foundation's bar: one-token decode at batch 1 on the default model is at least as fast as
transformers' generate on the same weights in its fastest dtype on this machine. This script
measures exactly that, in one process: greedy, batch 1, every prompt generating
``--max-new-tokens`` tokens (end-of-sequence ignored on both sides: both time the same tokens) by

* ours: ``Engine`` plain decoding (no drafter), once per ``--weights`` format;
* transformers: ``Gemma3ForCausalLM.generate`` on the same dequantized weights, in float32 and
  bfloat16 (its fastest dtype here; see MEASURED.md).

Every method first warms up on the first prompt; then the prompts run one at a time, all methods
per prompt, the method order rotated per prompt so a slow spell of the shared machine hits all of
them alike (``--repeats R`` runs each prompt R times per method, still interleaved, and keeps each
method's fastest run: on a machine shared with other work that is the least disturbed one).
Only the decode is timed: from the first generated token to the last (our engine's ``decode_s``;
for transformers a streamer notes when the first generated token arrives), so the prompt's
prefill is left out of both. It prints a table (decode tok/s, ms per token, the ratio to
the best transformers dtype, greedy agreement with transformers float32), then one JSON line.

Run: python bench/vs_transformers.py [--prompts mt_bench_question.jsonl] [--limit 3]
     [--max-new-tokens 128] [--weights fp32,int8] [--repeats 1] [--threads N] [--model PATH]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mtpspec.bench.methods import EngineMethod, HFMethod, Method, build_hf_model
from mtpspec.bench.sidebyside import Timing, run_interleaved
from mtpspec.bench.prompts import BUILTIN_PROMPTS, load_prompts, prompt_token_ids, select_prompts
from mtpspec.engine import Engine
from mtpspec.loading import load_weights
from mtpspec.ops import FORMATS
from mtpspec.runtime import Target, configure_threads, load_target

HF_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def build_methods(args) -> tuple[list[Method], Target]:
    """Ours per weight format, then transformers per dtype; returns (methods, the first target)."""
    methods: list[Method] = []
    first = None
    for fmt in args.weights:
        target = load_target(args.model, fmt, with_tokenizer=first is None)
        first = first or target
        engine = Engine(target.model, target.tokenizer, None, max_len=4096)
        methods.append(EngineMethod(f"ours-{fmt}", "plain", engine, None))
    tensors = load_weights(first.source).tensors  # dequantized float32, Hugging Face names
    for name, dtype in HF_DTYPES.items():
        model = build_hf_model(first.config, tensors, dtype)
        # no end-of-sequence ids: it generates the full length, as ours does with ignore_eos
        methods.append(HFMethod(f"hf-{name}", model, (), first.config.pad_token_id))
    hf32 = next(m for m in methods if m.name == "hf-fp32")
    if {p.dtype for p in hf32.model.parameters()} != {torch.float32}:
        raise RuntimeError("building the bfloat16 model changed the float32 one")
    return methods, first


def summarize(timings: dict[str, Timing], args, model_name: str, prompt_count: int) -> dict:
    hf_names = [name for name in timings if name.startswith("hf-")]
    hf_best = max(hf_names, key=lambda name: timings[name].tokens_per_s)
    reference = timings["hf-fp32"].outputs
    results = {}
    for name, timing in timings.items():
        prefixes = [common_prefix(out, ref) for out, ref in zip(timing.outputs, reference)]
        results[name] = {
            "tokens_per_s": timing.tokens_per_s,
            "median_tokens_per_s": timing.median_tokens_per_s,
            "ms_per_token": 1e3 / timing.tokens_per_s,
            "decode_tokens": sum(timing.tokens),
            "decode_s": sum(timing.seconds),
            "ratio_to_hf_best": timing.tokens_per_s / timings[hf_best].tokens_per_s,
            "median_ratio_to_hf_best": (timing.median_tokens_per_s
                                        / timings[hf_best].median_tokens_per_s),
            "same_as_hf_fp32": sum(p == len(ref) == len(out) for p, out, ref
                                   in zip(prefixes, timing.outputs, reference)),
            "mean_common_prefix_with_hf_fp32": statistics.fmean(prefixes),
        }
    ours = [name for name in timings if name.startswith("ours-")]
    return {
        "benchmark": "mtpspec-vs-transformers", "model": model_name, "prompts": prompt_count,
        "prompt_source": str(args.prompts) if args.prompts else "builtin",
        "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "batch_size": 1,
        "greedy": True, "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "hf_best": hf_best, "results": results,
        "at_least_as_fast_as_hf_best": {name: results[name]["ratio_to_hf_best"] >= 1.0
                                        for name in ours},
    }


def format_table(doc: dict) -> str:
    header = (f"{'method':<10} {'decode tok/s':>12} {'median':>8} {'ms/token':>9} "
              f"{'vs ' + doc['hf_best']:>11} {'median vs':>10} {'same as hf-fp32':>16} "
              f"{'common prefix':>14}")
    lines = [header, "-" * len(header)]
    for name, r in doc["results"].items():
        lines.append(f"{name:<10} {r['tokens_per_s']:>12.2f} {r['median_tokens_per_s']:>8.2f} "
                     f"{r['ms_per_token']:>9.1f} {r['ratio_to_hf_best']:>10.2f}x "
                     f"{r['median_ratio_to_hf_best']:>9.2f}x "
                     f"{r['same_as_hf_fp32']:>10d}/{doc['prompts']:<5d} "
                     f"{r['mean_common_prefix_with_hf_fp32']:>14.1f}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="GGUF file or HF folder (default: embedded)")
    parser.add_argument("--prompts", default=None,
                        help="JSONL prompts (MT-bench 'turns': first turn; default: built-in set)")
    parser.add_argument("--limit", type=int, default=None, help="use the first N prompts")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per prompt and method, interleaved; the fastest counts (for a "
                             "machine shared with other work)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads for both sides (default: torch's, here 2)")
    parser.add_argument("--weights", default="fp32,int8",
                        help=f"our weight formats, comma-separated, from {', '.join(FORMATS)}")
    args = parser.parse_args(argv)
    args.weights = [w for w in args.weights.split(",") if w]
    unknown = [w for w in args.weights if w not in FORMATS]
    if unknown or not args.weights:
        parser.error(f"--weights: choose from {', '.join(FORMATS)}, got {args.weights}")
    if args.repeats < 1 or args.max_new_tokens < 2 or (args.threads or 1) < 1:
        parser.error("--repeats and --threads must be >= 1, --max-new-tokens >= 2")

    configure_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    methods, target = build_methods(args)
    print(f"loaded {len(methods)} methods in {time.perf_counter() - start:.0f} s", flush=True)
    source = load_prompts(args.prompts) if args.prompts else list(BUILTIN_PROMPTS)
    prompts = select_prompts(source, limit=args.limit)
    prompt_ids = [prompt_token_ids(p, target.tokenizer) for p in prompts]
    timings = run_interleaved(methods, prompt_ids, args.max_new_tokens, args.repeats,
                  log=lambda message: print(message, flush=True))
    doc = summarize(timings, args, target.name, len(prompts))
    doc["wall_s"] = time.perf_counter() - start
    print()
    print(format_table(doc))
    print(json.dumps(doc))
    return doc


if __name__ == "__main__":
    main()
