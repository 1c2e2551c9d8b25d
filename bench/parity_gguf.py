"""Real-model parity: our native fp32 greedy continuations against transformers' on the same GGUF.

For a GGUF of any supported family (default: the embedded SmolLM2-135M-Instruct), both sides start
from the same token ids (our tokenizer's; the prompts are chat-formatted with the model's template
when it has one) and decode greedily for ``--max-new-tokens`` tokens, end-of-sequence ignored:

* ours: ``Engine`` plain decoding of the native model in fp32 (``--weights`` to try another format);
* transformers: ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)`` in float32, its own
  dequantization and its own modeling code, ``generate(do_sample=False)``.

It prints, per prompt, whether the continuations are identical and where they first differ, then
one JSON line: ``{"identical": n, "prompts": N, ...}``. Nothing here is timed.

Run: python bench/parity_gguf.py [--model smollm2|PATH.gguf] [--prompts mtbench_question.jsonl]
     [--limit 16] [--max-new-tokens 64] [--weights fp32]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mtpspec.bench.prompts import load_prompts, prompt_token_ids, select_prompts
from mtpspec.engine import Engine, GenerateOptions
from mtpspec.runtime import configure_threads, load_target


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--prompts", type=Path, default=Path("docs/mtbench16.jsonl"))
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--weights", default="fp32")
    args = parser.parse_args()
    configure_threads()
    torch.set_num_threads(2)  # transformers' side uses torch's own threads
    from transformers import AutoModelForCausalLM

    target = load_target(args.model, args.weights)
    hf = AutoModelForCausalLM.from_pretrained(str(target.source.parent), gguf_file=target.source.name,
                                              dtype=torch.float32).eval()
    engine = Engine(target.model, target.tokenizer, None, max_len=4096)
    prompts = select_prompts(load_prompts(args.prompts), limit=args.limit)
    identical, rows = 0, []
    for prompt in prompts:
        ids = prompt_token_ids(prompt, target.tokenizer)
        ours = engine.generate([ids], GenerateOptions(max_new_tokens=args.max_new_tokens,
                                                      ignore_eos=True))[0].token_ids
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=args.max_new_tokens,
                              min_new_tokens=args.max_new_tokens, do_sample=False)
        theirs = out[0, len(ids):].tolist()
        diff = first_difference(ours, theirs)
        identical += diff is None
        rows.append({"prompt": prompt.text[:40], "first_difference": diff})
        print(f"{'same' if diff is None else f'differs at {diff}':>14}  {prompt.text[:60]!r}", flush=True)
    print(json.dumps({"model": target.name, "weights": args.weights, "identical": identical,
                      "prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "rows": rows}))


if __name__ == "__main__":
    main()
