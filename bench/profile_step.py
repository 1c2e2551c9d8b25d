"""Where a decode step's time goes on the default model: per format, kernel threads, path and M.

Prints median ms of a target forward over M new tokens (M = 1 plain decode, M = k+1 verification)
on a ~200-token cache: with logits for every row (``forward``), without logits (``body``), the LM
head alone (``head``), and one MTP draft step per head kind, for each weight format, each count of
kernel threads, and each path: ``fused`` (one C++ call per forward, mtpspec.fused) and ``python``
(the reference layers). Same process, same caches; the paths alternate within each of ``--rounds``
rounds and each cell reports its best round's median, so that another process that runs for a
while on this 2-vCPU box inflates neither path alone. Compare within a run.
Usage: python bench/profile_step.py [--formats fp32,int8] [--threads 1,2] [--paths fused,python]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mtpspec import ops
from mtpspec.drafter import load_drafter, shipped_drafter_for
from mtpspec.loading import load_weights
from mtpspec.models.gemma3 import Gemma3Model
from mtpspec.proposers.base import DraftState
from mtpspec.proposers.mtp import MTPProposer
from mtpspec.sampling import SamplingParams


def median_ms(fn, reps=15):
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(model, cache, proposers, path, hidden, args) -> dict[str, float]:
    """Median ms of each measured call for one path, in one round."""
    ctx, row = args.ctx, {}
    for m in [int(x) for x in args.ms.split(",")]:
        ids = torch.randint(0, 1000, (1, m))
        pos = torch.arange(ctx, ctx + m)[None]
        row[f"forward_m{m}"] = median_ms(lambda: model(ids, pos, cache, num_logits=None), args.reps)
        row[f"body_m{m}"] = median_ms(lambda: model(ids, pos, cache, num_logits=0), args.reps)
        x = torch.randn(m, model.config.hidden_size)
        row[f"head_m{m}"] = median_ms(lambda: model.lm_head(x), args.reps)
    for kind in filter(None, args.kinds.split(",")):
        proposer = proposers[kind, path]
        state = DraftState(tokens=[[5] * ctx], hidden=hidden, positions=torch.tensor([ctx]),
                           cache=cache, params=SamplingParams(), generator=None)
        row[f"draft_step_{kind}"] = median_ms(lambda: proposer.propose(state, 4), args.reps) / 4
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--formats", default="fp32,bf16,int8,int4")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--ms", default="1,2,4,5,8")
    parser.add_argument("--paths", default="fused,python")
    parser.add_argument("--kinds", default="clustered,frequency")
    parser.add_argument("--ctx", type=int, default=200, help="tokens already in the cache")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--draft-weights", default="fp32", help="format the fused drafter packs in")
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)
    loaded = load_weights(None)
    head = load_drafter(shipped_drafter_for(loaded.weights_hash), loaded.config, loaded.weights_hash)
    paths = args.paths.split(",")
    results = {}
    for fmt in args.formats.split(","):
        model = Gemma3Model(loaded.config, loaded.tensors, fmt)
        cache = model.new_cache(1, args.ctx + 64)
        ctx = args.ctx
        model(torch.randint(0, 1000, (1, ctx)), torch.arange(ctx)[None], cache, num_logits=0)
        hidden = torch.randn(1, loaded.config.hidden_size)
        proposers = {(kind, path): MTPProposer(head, model, kind, use_fused=path == "fused",
                                               fused_weights=args.draft_weights)
                     for kind in filter(None, args.kinds.split(",")) for path in paths}
        for threads in [int(t) for t in args.threads.split(",")]:
            ops.set_num_threads(threads)
            rows = {path: {} for path in paths}
            for _ in range(args.rounds):
                for path in paths:
                    model.use_fused = path == "fused"
                    for key, ms in measure(model, cache, proposers, path, hidden, args).items():
                        rows[path][key] = min(ms, rows[path].get(key, float("inf")))
            for path, row in rows.items():
                results[f"{fmt}/t{threads}/{path}"] = {k: round(v, 2) for k, v in row.items()}
                print(f"{fmt} threads={threads} {path:6s}: "
                      + "  ".join(f"{k}={v:.1f}" for k, v in row.items()), flush=True)
        model.use_fused = True
    print(json.dumps(results))


if __name__ == "__main__":
    main()
