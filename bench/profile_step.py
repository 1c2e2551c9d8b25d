"""Where a decode step's time goes on the default model: per format, kernel threads, path and M,
against the bytes-read floor.

Prints median ms of a target forward over M new tokens (M = 1 plain decode, M = k+1 verification)
on a ~200-token cache: with logits for every row (``forward``), without logits (``body``), the LM
head alone (``head``), one MTP draft step per head kind, and a whole plain-decoding step of the
engine (``engine_step``: forward + argmax + the Python loop, from a 64-token greedy generation),
for each weight format, each count of kernel threads, and each path: ``fused`` (one C++ call per
forward, mtpspec.fused) and ``python`` (the reference layers). Same process, same caches; the
paths alternate within each of ``--rounds`` rounds and each cell reports its best round's median,
so that another process that runs for a while on this 2-vCPU box inflates neither path alone.

With ``--screen`` (int8): the greedy tokens of M real final states by the full head + argmax and by
the argmax screen (``mtpspec.screen``), which verification uses.

Then, per format (fused path, the most threads), a breakdown of one plain decode step: body, LM
head, the rest of the forward (embedding, final norm), and engine/Python overhead, each against
its floor: weight bytes read / ``--bandwidth`` (19.5 GB/s, ../shared/MEASURED.md).
Compare within a run. The last line is JSON.
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
from mtpspec.engine import Engine, GenerateOptions
from mtpspec.ops import PackedLinear
from mtpspec.proposers.base import DraftState
from mtpspec.proposers.mtp import MTPProposer
from mtpspec.runtime import load_target
from mtpspec.sampling import SamplingParams

ENGINE_TOKENS = 64


def median_ms(fn, reps=15):
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def engine_step_ms(model, ctx: int) -> float:
    """ms per token of plain greedy decoding by the engine (a ``ctx``-token prompt, 64 tokens)."""
    prompt = torch.randint(3, 1000, (ctx,), generator=torch.Generator().manual_seed(0)).tolist()
    engine = Engine(model, None, None, max_len=ctx + ENGINE_TOKENS + 8)
    result = engine.generate([prompt], GenerateOptions(max_new_tokens=ENGINE_TOKENS,
                                                       ignore_eos=True))[0]
    return result.stats.decode_s * 1e3 / (len(result.token_ids) - 1)


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
        screen = getattr(model, "_screen", None)
        if screen is not None and path == "fused":  # greedy tokens: full head + argmax vs screen
            states = model(ids, pos, cache, num_logits=0)[1][0]  # [m, d] real final states
            row[f"argmax_m{m}"] = median_ms(lambda: model.lm_head(states).argmax(-1), args.reps)
            row[f"screen_m{m}"] = median_ms(lambda: screen(states), args.reps)
    for kind in filter(None, args.kinds.split(",")):
        proposer = proposers[kind, path]
        state = DraftState(tokens=[[5] * ctx], hidden=hidden, positions=torch.tensor([ctx]),
                           cache=cache, params=SamplingParams(), generator=None)
        row[f"draft_step_{kind}"] = median_ms(lambda: proposer.propose(state, 4), args.reps) / 4
    if args.engine:
        row["engine_step"] = engine_step_ms(model, ctx)
    return row


def weight_bytes(model) -> tuple[int, int]:
    """(bytes of the layers' packed weights, bytes of the tied LM head) read per decode step."""
    body = sum(m.nbytes for m in model.layers.modules() if isinstance(m, PackedLinear))
    return body, model.embed.nbytes


def breakdown(row: dict[str, float], body_bytes: int, head_bytes: int, gbs: float) -> dict:
    """One plain decode step (M = 1) split into parts, each with its floor in ms."""
    floor = {"body": body_bytes / gbs / 1e6, "head": head_bytes / gbs / 1e6}
    parts = {"body": row["body_m1"], "head": row["head_m1"],
             "forward_rest": max(row["forward_m1"] - row["body_m1"] - row["head_m1"], 0.0)}
    out = {"floor_ms": floor["body"] + floor["head"], "floor_body_ms": floor["body"],
           "floor_head_ms": floor["head"], "forward_ms": row["forward_m1"], **{
               f"{name}_ms": ms for name, ms in parts.items()}}
    if "engine_step" in row:
        out["engine_step_ms"] = row["engine_step"]
        out["engine_overhead_ms"] = max(row["engine_step"] - row["forward_m1"], 0.0)
        out["step_fraction_of_floor"] = out["floor_ms"] / row["engine_step"]
    out["body_fraction_of_floor"] = floor["body"] / row["body_m1"]
    out["head_fraction_of_floor"] = floor["head"] / row["head_m1"]
    return {k: round(v, 3) for k, v in out.items()}


def format_breakdown(fmt: str, b: dict) -> str:
    step = b.get("engine_step_ms", b["forward_ms"])
    text = (f"{fmt}: step {step:.1f} ms = body {b['body_ms']:.1f} (floor {b['floor_body_ms']:.1f},"
            f" {b['body_fraction_of_floor']:.0%}) + head {b['head_ms']:.1f} (floor "
            f"{b['floor_head_ms']:.1f}, {b['head_fraction_of_floor']:.0%}) + rest of forward "
            f"{b['forward_rest_ms']:.1f}")
    if "engine_overhead_ms" in b:
        text += (f" + engine/Python {b['engine_overhead_ms']:.1f}; floor {b['floor_ms']:.1f} ms:"
                 f" {b['step_fraction_of_floor']:.0%} of floor speed")
    return text


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
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch intra-op threads (1, as the CLI: runtime.configure_threads)")
    parser.add_argument("--draft-weights", default="fp32", help="format the fused drafter packs in")
    parser.add_argument("--no-engine", dest="engine", action="store_false",
                        help="skip the engine's plain-decoding step")
    parser.add_argument("--bandwidth", type=float, default=19.5, help="GB/s, for the floor")
    parser.add_argument("--screen", action="store_true",
                        help="int8: also time greedy tokens by full head + argmax (argmax_m*) and "
                             "by the argmax screen (screen_m*) on real final states")
    args = parser.parse_args()
    if "1" not in args.ms.split(","):
        parser.error("--ms must include 1 (the plain decode step)")
    torch.set_num_threads(args.torch_threads)
    paths = args.paths.split(",")
    thread_counts = [int(t) for t in args.threads.split(",")]
    results, breakdowns, head = {}, {}, None
    for fmt in args.formats.split(","):
        target = load_target(None, fmt, with_tokenizer=False)
        model, config = target.model, target.config
        if head is None and args.kinds:
            head = load_drafter(shipped_drafter_for(target.weights_hash), config,
                                target.weights_hash)
        cache = model.new_cache(1, args.ctx + 64)
        if args.screen:
            model.enable_argmax_screen()  # int8 only: the argmax screen (mtpspec.screen)
        ctx = args.ctx
        model(torch.randint(0, 1000, (1, ctx)), torch.arange(ctx)[None], cache, num_logits=0)
        hidden = torch.randn(1, config.hidden_size)
        proposers = {(kind, path): MTPProposer(head, model, kind, use_fused=path == "fused",
                                               fused_weights=args.draft_weights)
                     for kind in filter(None, args.kinds.split(",")) for path in paths}
        for threads in thread_counts:
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
        best = f"{fmt}/t{max(thread_counts)}/{paths[0]}"
        breakdowns[best] = breakdown(results[best], *weight_bytes(model), args.bandwidth)
    print()
    for key, b in breakdowns.items():
        print(format_breakdown(key, b))
    print(json.dumps({"bandwidth_gb_s": args.bandwidth, "ctx": args.ctx, "results": results,
                      "breakdown": breakdowns}))


if __name__ == "__main__":
    main()
