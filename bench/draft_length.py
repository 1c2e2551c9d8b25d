"""How long should drafts be? Fixed draft lengths against the dynamic ones, side by side.

For each proposer (``--specs``: mtp = MTP head + prompt lookup, mtp-only, ngram) it runs fixed
draft lengths (``--draft-k``), the confidence stop (``--confidence``: the MTP head stops a row's
draft once its estimate that the whole draft is accepted falls below the threshold; ``--cap`` is
then the longest draft) and the acceptance-following schedule (``--adaptive``: k grows after a
fully accepted block, shrinks after a rejection), plus plain decoding, on the same prompts. These
run without the draft policy (``mtpspec.draft_policy``); ``policy`` variants run with it and the
default confidence stop, as ``mtpspec generate`` does (``--no-policy`` leaves them out). Methods
are interleaved per prompt (rotating the order) after a warm-up, so that a noisy 2-core machine
slows all of them alike; speedups are against plain decoding in the same run, and every method's
output is compared with plain decoding's (sampled too: ``--temperature``; a seeded sampled request
gives the same tokens with any draft lengths).

Usage: python bench/draft_length.py --prompts docs/mtbench16.jsonl --weights int8
The last line is JSON.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field

from mtpspec.bench.prompts import load_prompts, prompt_token_ids, select_prompts
from mtpspec.engine import Engine, GenerateOptions
from mtpspec.metrics import SpecStats
from mtpspec.proposers.factory import DEFAULT_DRAFT_CONFIDENCE, ProposerRequest, make_proposer
from mtpspec.runtime import configure_threads, load_target
from mtpspec.sampling import SamplingParams


@dataclass
class Variant:
    name: str
    spec: str | None          # None: plain decoding
    draft_k: int
    confidence: float | None = None
    adaptive: bool = False
    policy: bool = False      # the draft policy chooses lengths (the default confidence stop)
    tokens: int = 0
    seconds: float = 0.0
    stats: SpecStats | None = None
    outputs: list[list[int]] = field(default_factory=list)


def variants(args) -> list[Variant]:
    out = [Variant("plain", None, 0)]
    for spec in args.specs.split(","):
        for k in (int(x) for x in args.draft_k.split(",")):
            out.append(Variant(f"{spec} k={k}", spec, k))
        if spec != "ngram":  # the confidence stop needs the head's probabilities
            for c in (float(x) for x in filter(None, args.confidence.split(","))):
                out.append(Variant(f"{spec} conf={c} cap={args.cap}", spec, args.cap, c))
        if args.adaptive:
            out.append(Variant(f"{spec} adaptive cap={args.cap}", spec, args.cap, None, True))
        if args.policy:
            confidence = DEFAULT_DRAFT_CONFIDENCE if spec != "ngram" else None
            out.append(Variant(f"{spec} policy cap={args.cap}", spec, args.cap, confidence,
                               policy=True))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", default="docs/mtbench16.jsonl")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--weights", default="int8")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--specs", default="mtp,ngram")
    parser.add_argument("--draft-k", default="2,3,4,5,6")
    parser.add_argument("--confidence", default="0.15,0.25,0.4")
    parser.add_argument("--cap", type=int, default=6, help="longest draft of the dynamic variants")
    parser.add_argument("--adaptive", action="store_true", help="also run the adaptive schedule")
    parser.add_argument("--no-policy", dest="policy", action="store_false",
                        help="leave out the variants under the draft policy")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    configure_threads()
    target = load_target(None, args.weights)
    prompts = [prompt_token_ids(p, target.tokenizer)
               for p in select_prompts(load_prompts(args.prompts), limit=args.limit)]
    runs = variants(args)
    proposers = {}
    for spec in {v.spec for v in runs if v.spec is not None}:
        proposers[spec] = make_proposer(spec, target, ProposerRequest(min_confidence=None)).proposer
    # one engine per variant: the policy's measured costs last across its prompts
    engines = {v.name: Engine(target.model, target.tokenizer, proposers.get(v.spec),
                              policy=v.policy) for v in runs}

    def generate(v: Variant, prompt: list[int], max_new: int):
        proposer = proposers.get(v.spec)
        inner = getattr(proposer, "mtp", proposer)  # the hybrid's MTP proposer
        if hasattr(inner, "min_confidence"):
            inner.min_confidence = v.confidence
        options = GenerateOptions(max_new_tokens=max_new, draft_k=v.draft_k, adaptive_k=v.adaptive,
                                  sampling=sampling)
        return engines[v.name].generate([prompt], options)[0]

    for v in runs:  # warm-up: caches, packed copies, rope tables
        generate(v, prompts[0], 16)
    for i, prompt in enumerate(prompts):
        order = runs[i % len(runs):] + runs[:i % len(runs)]
        for v in order:
            result = generate(v, prompt, args.max_new_tokens)
            v.tokens += len(result.token_ids) - 1  # the first token comes from the prefill
            v.seconds += result.stats.decode_s
            v.stats = result.stats if v.stats is None else v.stats + result.stats
            v.outputs.append(result.token_ids)
        print(f"prompt {i + 1}/{len(prompts)}", flush=True)
    plain = runs[0]
    base = plain.tokens / plain.seconds
    rows = []
    print(f"\n{'method':28s} {'tok/s':>7s} {'speedup':>8s} {'tau':>5s} {'mism':>4s}  acceptance per position")
    for v in runs:
        rate = v.tokens / v.seconds
        mismatches = sum(a != b for a, b in zip(v.outputs, plain.outputs))
        summary = v.stats.as_dict()
        per_pos = summary["acceptance_per_position"]
        print(f"{v.name:28s} {rate:7.1f} {rate / base:7.2f}x {summary['tau']:5.2f} {mismatches:4d}  "
              f"{' '.join(f'{x:.2f}' for x in per_pos)}")
        rows.append({"method": v.name, "spec": v.spec, "draft_k": v.draft_k,
                     "confidence": v.confidence, "adaptive": v.adaptive, "policy": v.policy,
                     "tokens_per_s": round(rate, 2), "speedup": round(rate / base, 3),
                     "tau": summary["tau"], "mismatches": mismatches,
                     "acceptance_per_position": per_pos})
    print(json.dumps({"prompts": args.prompts, "n": len(prompts), "weights": args.weights,
                      "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                      "top_p": args.top_p, "seed": args.seed, "results": rows}))


if __name__ == "__main__":
    main()
