"""Side by side with llama.cpp on the same GGUF: greedy, batch 1, the development prompts.

A CPU user's alternative is llama.cpp. This script runs, in one process and interleaved per prompt:

* ``llama.cpp``: plain greedy decoding through ``llama-cpp-python`` on the GGUF our target is
  loaded from, one method per ``--llama-threads`` count (default 2; ``1,2`` runs both, and ratios
  are then to the faster one; on this 2-vCPU box shared with other work llama.cpp's 2-thread
  barriers stall whenever another process holds a core); temperature 0, top-k 1, no penalty.
  It is fed *our* tokenizer's prompt ids, so both sides see the same tokens;
* ``plain-<fmt>``: our plain decoding in each weight format (fp32, bf16, int8, int4);
* ``mtp-<fmt>``: our speculative decoding with the shipped MTP drafter (``--spec mtp``, the CLI's
  default: the head plus prompt lookup) in ``--spec-weights`` (default: the default format).

Every method generates exactly ``--max-new-tokens`` tokens per prompt (end-of-sequence ignored on
both sides) after a short warm-up; only the decode is timed (first generated token to the last),
so prefill is left out everywhere. The method order rotates per prompt so a slow spell of the
shared machine hits all methods alike; ``--repeats R`` runs each prompt R times per method and
keeps each method's fastest run. Ratios are to llama.cpp's tokens/s in the same run.

The bytes-read floor of a format is the weight bytes one decode step must read (every layer's
packed weights plus the tied LM head; the embedding lookup reads one row) divided by
``--bandwidth`` (19.5 GB/s: torch sum over 1 GiB with 2 threads, ../shared/MEASURED.md). For
llama.cpp it is the GGUF's tensor bytes. "of floor" = floor ms / measured ms per token (100% would
be bandwidth-bound; speculative methods read the weights once per several tokens and can pass it).

llama-cpp-python is optional: ``.venv/bin/pip install 'mtpspec[llamacpp]'`` (it builds llama.cpp
from source, ~10 min on 2 cores, needs cmake and g++). Without it, our side runs alone and the
table says so.

Run: .venv/bin/python bench/vs_llamacpp.py [--prompts docs/mtbench16.jsonl] [--limit N]
     [--formats fp32,bf16,int8,int4] [--spec-weights int8] [--max-new-tokens 128] [--repeats 1]
     [--json docs/vs-llamacpp.json]
Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

import torch

from mtpspec.bench.methods import EngineMethod, Run
from mtpspec.bench.sidebyside import Timing, run_interleaved
from mtpspec.bench.prompts import load_prompts, prompt_token_ids, select_prompts
from mtpspec.bench.quality import common_prefix
from mtpspec.cli import DEFAULT_DRAFT_K
from mtpspec.engine import Engine, GenerateOptions
from mtpspec.ops import FORMATS, PackedLinear, get_num_threads
from mtpspec.proposers.factory import ProposerRequest, make_proposer
from mtpspec.runtime import DEFAULT_WEIGHTS, configure_threads, load_target

ROOT = Path(__file__).resolve().parents[1]
INSTALL_HINT = ("llama-cpp-python is not installed: .venv/bin/pip install 'mtpspec[llamacpp]' "
                "(or llama-cpp-python==0.3.36; builds llama.cpp from source, ~10 min, needs cmake "
                "and g++); running our side only")
LLAMA = "llama.cpp"
MAX_LEN = 4096


class LlamaCppMethod:
    """Plain greedy decoding by llama.cpp, fed token ids, generating a fixed number of tokens."""

    def __init__(self, gguf: Path, threads: int):
        from llama_cpp import Llama

        self.name, self.base, self.draft_k = f"{LLAMA}-t{threads}", LLAMA, None
        start = time.perf_counter()
        self.llm = Llama(model_path=str(gguf), n_ctx=MAX_LEN, n_batch=512, n_threads=threads,
                         n_threads_batch=threads, verbose=False)
        self.load_s = time.perf_counter() - start

    def run(self, prompts: list[list[int]], options: GenerateOptions) -> list[Run]:
        return [self._run_one(prompt, options.max_new_tokens) for prompt in prompts]

    def _run_one(self, prompt: list[int], max_new_tokens: int) -> Run:
        self.llm.reset()  # no prefix reuse between runs: every run prefills the whole prompt
        tokens, times = [], []
        start = time.perf_counter()
        # generate() yields sampled ids forever (it does not stop at end-of-sequence)
        for token in self.llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0,
                                       repeat_penalty=1.0, reset=True):
            tokens.append(int(token))
            times.append(time.perf_counter())
            if len(tokens) == max_new_tokens:
                break
        return Run(token_ids=tokens, text="", prefill_s=times[0] - start,
                   decode_s=times[-1] - times[0], decode_tokens=len(tokens) - 1, stats=None,
                   steps=len(tokens) - 1)


def weight_bytes_per_token(model) -> int:
    """Bytes of packed weight one decode step reads: all layers plus the tied LM head."""
    return sum(m.nbytes for m in model.modules() if isinstance(m, PackedLinear))


def gguf_tensor_bytes(path: Path) -> int:
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors)


def build_methods(args) -> tuple[list, dict[str, int], object]:
    """(methods in run order, weight bytes per token per method, the target with a tokenizer)."""
    methods, floor_bytes, first = [], {}, None
    targets = {}
    for fmt in dict.fromkeys([*args.formats, args.spec_weights]):
        targets[fmt] = load_target(args.model, fmt, with_tokenizer=first is None)
        first = first or targets[fmt]
    for threads in args.llama_threads if args.llama else ():
        llama = LlamaCppMethod(first.source, threads)
        print(f"{llama.name} loaded {first.source.name} in {llama.load_s:.2f} s", flush=True)
        methods.append(llama)
        floor_bytes[llama.name] = gguf_tensor_bytes(first.source)
    for fmt in args.formats:
        target = targets[fmt]
        engine = Engine(target.model, target.tokenizer, None, max_len=MAX_LEN)
        methods.append(EngineMethod(f"plain-{fmt}", "plain", engine, None))
        floor_bytes[f"plain-{fmt}"] = weight_bytes_per_token(target.model)
    target = targets[args.spec_weights]
    built = make_proposer(args.spec, target, ProposerRequest(max_len=MAX_LEN))
    engine = Engine(target.model, target.tokenizer, built.proposer, max_len=MAX_LEN)
    methods.append(EngineMethod(f"{args.spec}-{args.spec_weights}", args.spec, engine, args.draft_k))
    floor_bytes[f"{args.spec}-{args.spec_weights}"] = weight_bytes_per_token(target.model)
    return methods, floor_bytes, first


def summarize(timings: dict[str, Timing], floor_bytes: dict[str, int], args) -> dict:
    """Ratios are to the faster llama.cpp thread count of this run (the baseline)."""
    llamas = [name for name in timings if name.startswith(LLAMA)]
    baseline_name = max(llamas, key=lambda name: timings[name].tokens_per_s, default=None)
    baseline = timings[baseline_name] if baseline_name else None
    results = {}
    for name, timing in timings.items():
        floor_ms = floor_bytes[name] / (args.bandwidth * 1e9) * 1e3
        ms = 1e3 / timing.tokens_per_s
        spec_of = name.startswith(f"{args.spec}-")
        plain = timings.get(f"plain-{name[len(args.spec) + 1:]}") if spec_of else None
        results[name] = {
            "tokens_per_s": timing.tokens_per_s,
            "median_tokens_per_s": timing.median_tokens_per_s,
            "ms_per_token": ms,
            "ratio_to_llamacpp": timing.tokens_per_s / baseline.tokens_per_s if baseline else None,
            "median_ratio_to_llamacpp": (statistics.median(
                (t / s) / (bt / bs) for t, s, bt, bs in zip(timing.tokens, timing.seconds,
                                                             baseline.tokens, baseline.seconds))
                if baseline else None),
            "weight_bytes_per_token": floor_bytes[name],
            "floor_ms_per_token": floor_ms,
            "fraction_of_floor": floor_ms / ms,
            "same_as_llamacpp": (sum(o == b for o, b in zip(timing.outputs, baseline.outputs))
                                 if baseline else None),
            "mean_common_prefix_with_llamacpp": (statistics.fmean(
                common_prefix(o, b) for o, b in zip(timing.outputs, baseline.outputs))
                if baseline else None),
            "same_as_plain_same_format": (sum(o == p for o, p in zip(timing.outputs, plain.outputs))
                                          if plain else None),
            "decode_tokens": sum(timing.tokens), "decode_s": sum(timing.seconds),
        }
    plain_compact = {n: r for n, r in results.items()
                     if n.startswith("plain-") and n != "plain-fp32"}
    best_plain = max(plain_compact, key=lambda n: results[n]["tokens_per_s"], default=None)
    spec = f"{args.spec}-{args.spec_weights}"
    return {
        "benchmark": "mtpspec-vs-llamacpp", "prompts": str(args.prompts),
        "prompt_count": len(next(iter(timings.values())).tokens),
        "max_new_tokens": args.max_new_tokens, "batch_size": 1, "greedy": True,
        "repeats": args.repeats, "draft_k": args.draft_k, "spec_weights": args.spec_weights,
        "kernel_threads": get_num_threads(), "torch_threads": torch.get_num_threads(),
        "llamacpp_threads": args.llama_threads if baseline else None,
        "llamacpp_baseline": baseline_name,
        "llamacpp_version": _llama_version() if baseline else None,
        "bandwidth_gb_s": args.bandwidth, "results": results,
        "best_compact_plain": best_plain,
        "goals": None if baseline is None else {
            "plain_best_compact_ge_1x": (results[best_plain]["ratio_to_llamacpp"] >= 1.0
                                         if best_plain else None),
            "mtp_ge_1_5x": results[spec]["ratio_to_llamacpp"] >= 1.5,
        },
    }


def _llama_version() -> str | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    return getattr(llama_cpp, "__version__", None)


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


def format_table(doc: dict) -> str:
    header = (f"{'method':<14}{'tok/s':>8}{'median':>8}{'ms/tok':>8}{'vs llama.cpp':>13}"
              f"{'weights MB':>11}{'floor ms':>9}{'of floor':>9}{'= llama.cpp':>12}"
              f"{'= plain':>9}")
    lines = [header, "-" * len(header)]
    n = doc["prompt_count"]
    for name, r in doc["results"].items():
        same_llama = _fmt(r["same_as_llamacpp"], "d")
        same_plain = _fmt(r["same_as_plain_same_format"], "d")
        lines.append(
            f"{name:<14}{r['tokens_per_s']:>8.1f}{r['median_tokens_per_s']:>8.1f}"
            f"{r['ms_per_token']:>8.1f}{_fmt(r['ratio_to_llamacpp'], '.2f', suffix='x'):>13}"
            f"{r['weight_bytes_per_token'] / 1e6:>11.0f}{r['floor_ms_per_token']:>9.1f}"
            f"{r['fraction_of_floor']:>9.0%}{same_llama + '/' + str(n):>12}"
            f"{(same_plain + '/' + str(n)) if same_plain != '-' else '':>9}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None,
                        help="GGUF file (default: the embedded Gemma 3 270M Q4_K_M); llama.cpp "
                             "needs a GGUF")
    parser.add_argument("--prompts", type=Path, default=ROOT / "docs" / "mtbench16.jsonl",
                        help="JSONL prompts: MT-bench 'turns' or plain 'prompt' (HumanEval-style)")
    parser.add_argument("--limit", type=int, default=None, help="use the first N prompts")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--formats", default=",".join(FORMATS),
                        help="our plain-decoding weight formats, comma-separated")
    parser.add_argument("--spec-weights", default=DEFAULT_WEIGHTS, choices=FORMATS,
                        help="weight format of our speculative run (default %(default)s)")
    parser.add_argument("--draft-k", type=int, default=DEFAULT_DRAFT_K)
    parser.add_argument("--spec", default="mtp", choices=("mtp", "mtp-only", "ngram"),
                        help="the speculative method (mtp needs a drafter for the model; a model "
                             "without one: ngram)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per prompt and method, interleaved; the fastest counts")
    parser.add_argument("--llama-threads", default="2",
                        help="llama.cpp thread counts, comma-separated (each is a method; ratios "
                             "are to the fastest)")
    parser.add_argument("--no-llama", dest="llama", action="store_false",
                        help="skip llama.cpp even when it is installed")
    parser.add_argument("--bandwidth", type=float, default=19.5, help="GB/s, for the floor")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    args.formats = [f for f in args.formats.split(",") if f]
    if not args.formats or any(f not in FORMATS for f in args.formats):
        parser.error(f"--formats: choose from {', '.join(FORMATS)}, got {args.formats}")
    args.llama_threads = [int(t) for t in args.llama_threads.split(",") if t]
    if args.repeats < 1 or args.max_new_tokens < 2 or min(args.llama_threads, default=0) < 1:
        parser.error("--repeats and --llama-threads must be >= 1, --max-new-tokens >= 2")
    if args.llama and importlib.util.find_spec("llama_cpp") is None:
        print(INSTALL_HINT, flush=True)
        args.llama = False

    configure_threads()
    start = time.perf_counter()
    methods, floor_bytes, target = build_methods(args)
    if args.llama and target.source.suffix != ".gguf":
        parser.error(f"llama.cpp needs a GGUF file, got {target.source}")
    prompts = select_prompts(load_prompts(args.prompts), limit=args.limit)
    prompt_ids = [prompt_token_ids(p, target.tokenizer) for p in prompts]
    print(f"{len(prompts)} prompts x {len(methods)} methods "
          f"({', '.join(m.name for m in methods)}); loaded in {time.perf_counter() - start:.0f} s",
          flush=True)
    timings = run_interleaved(methods, prompt_ids, args.max_new_tokens, args.repeats)
    doc = summarize(timings, floor_bytes, args)
    doc["wall_s"] = time.perf_counter() - start
    print()
    print(format_table(doc))
    if not args.llama:
        print("\nno llama.cpp in this run (not installed, or --no-llama): ratios are '-'")
    if args.json is not None:
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc))
    return doc


if __name__ == "__main__":
    main()
