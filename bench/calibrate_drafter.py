"""Held-out acceptance of a drafter per kind of text, and the calibration table of its confidence.

The target answers the held-out split of the training prompt mix (``drafter/mix.py``: chat,
multi-turn, summarize, translate, context QA, extract, code, file; never benchmark prompts)
greedily; ``evaluate`` then measures the drafter's acceptance per draft position on those
sequences, overall and per task, and the observed acceptance per confidence bin. With ``--write``
the table is stored in the drafter's ``drafter.json`` (``calibration``), which the MTP proposer's
confidence stop reads.

Usage (the shipped Gemma 3 drafter's table was made with this):
  python bench/calibrate_drafter.py --prompts ../shared/data/gsm8k_train.jsonl --write
The last line is JSON.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mtpspec.drafter import shipped_drafter_for
from mtpspec.drafter.checkpoint import load_drafter
from mtpspec.drafter.data import generate_batch
from mtpspec.drafter.mix import mix_prompts
from mtpspec.drafter.train import evaluate
from mtpspec.runtime import load_target
from mtpspec.sampling import SamplingParams


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="target (default: the embedded default)")
    parser.add_argument("--weights", default="int8")
    parser.add_argument("--drafter", type=Path, default=None, help="default: the shipped one")
    parser.add_argument("--prompts", action="append", default=[],
                        help="JSONL files for the mix's 'file' task (repeatable)")
    parser.add_argument("--num-prompts", type=int, default=48)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", action="store_true", help="store the table in drafter.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.time()
    target = load_target(args.model, args.weights)
    folder = args.drafter or shipped_drafter_for(target.weights_hash)
    if folder is None:
        parser.error("no drafter ships for this target: pass --drafter")
    head = load_drafter(folder, target.config, target.weights_hash)
    prompts, tasks = mix_prompts(target.tokenizer, args.num_prompts, 384, args.seed,
                                 tuple(args.prompts), split="heldout")
    sequences = []
    for first in range(0, len(prompts), 16):
        chunk = prompts[first:first + 16]
        responses = generate_batch(target.model, chunk, args.max_new_tokens, SamplingParams())
        sequences += [p + r for p, r in zip(chunk, responses)]
    result = {"all": evaluate(head, target.model, sequences)}
    for task in sorted(set(tasks)):
        result[task] = evaluate(head, target.model, [s for s, t in zip(sequences, tasks) if t == task])
        result[task]["prompts"] = tasks.count(task)
    print("| text | prompts | acc@1 | acc@2 | acc@3 | acc@4 | tau@4 | tau@6 |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in result.items():
        acc = " | ".join(f"{a:.2f}" for a in r["acceptance_per_position"][:4])
        print(f"| {name} | {r.get('prompts', len(prompts))} | {acc} | {r['tau'][4]:.2f} | "
              f"{r['tau'][6]:.2f} |")
    table = result["all"]["calibration"]
    print("confidence (mean per bin) -> observed acceptance:",
          ", ".join(f"{p:.2f}->{o:.2f}" for p, o in zip(table["predicted"], table["observed"])))
    if args.write:
        meta_path = Path(folder) / "drafter.json"
        meta = json.loads(meta_path.read_text())
        meta["calibration"] = {**table, "source": "bench/calibrate_drafter.py: held-out split of "
                               f"the prompt mix, {len(prompts)} prompts, seed {args.seed}, "
                               f"greedy {args.weights} responses of {args.max_new_tokens} tokens"}
        meta_path.write_text(json.dumps(meta, indent=1))
    print(json.dumps({"seconds": round(time.time() - started, 1),
                      **{k: {"tau": v["tau"], "per_position": v["acceptance_per_position"]}
                         for k, v in result.items()}}))


if __name__ == "__main__":
    main()
