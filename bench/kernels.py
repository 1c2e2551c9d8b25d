"""Small-M linear kernels: mtpspec.ops.PackedLinear in every format vs F.linear (MKL), per shape.

Prints a table (format x shape x M -> median ms, GB/s of weight read, floor/ms = fraction of the
bandwidth floor), then one JSON line. Each layer shape cycles through enough copies of its weight
(>96 MB) that L3 cannot hold them, as in a real forward; candidates run interleaved, medians.
Run: python bench/kernels.py [--threads 1] [--formats fp32,int8] [--no-head | --only-head] [--reps 20]
"""
import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F

from mtpspec import ops

BANDWIDTH = 19.5e9  # bytes/s, MEASURED.md
LAYERS = {"qkv 640->1536": (640, 1536), "o 1024->640": (1024, 640),
          "gate_up 640->4096": (640, 4096), "down 2048->640": (2048, 640)}
HEAD = {"head 640->262144": (640, 262144)}


def median_ms(fn, reps: int, rounds: int = 3) -> float:
    per_round = []
    for _ in range(rounds):
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        per_round.append(statistics.median(ts))
    return statistics.median(per_round) * 1e3


def cycler(items):
    state = {"i": 0}

    def next_item():
        state["i"] = (state["i"] + 1) % len(items)
        return items[state["i"]]
    return next_item


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1, help="threads for the packed kernels")
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--formats", default=",".join(ops.FORMATS))
    ap.add_argument("--ms", default="1,2,4,8,9,16")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-head", action="store_true")
    ap.add_argument("--only-head", action="store_true")
    ap.add_argument("--no-baseline", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.torch_threads)
    ops.set_num_threads(args.threads)
    fmts, ms = args.formats.split(","), [int(m) for m in args.ms.split(",")]
    shapes = dict({} if args.only_head else LAYERS, **({} if args.no_head else HEAD))
    assert ops.kernels_available()
    rows, pack_s = [], {}
    print(f"threads={args.threads} torch_threads={args.torch_threads} floor at {BANDWIDTH/1e9} GB/s")
    print(f"{'shape':>18} {'impl':>10} {'M':>3} {'ms':>8} {'GB/s':>6} {'floor/ms':>8}")
    for name, (k, n) in shapes.items():
        w = torch.randn(n, k) / math.sqrt(k)  # [out, in]
        impls = {}
        for fmt in fmts:
            t0 = time.perf_counter()
            layer = ops.PackedLinear.from_weight(w, fmt)
            pack_s[f"{name} {fmt}"] = time.perf_counter() - t0
            copies = max(1, math.ceil(96e6 / layer.nbytes))
            layers = [layer] + [ops.PackedLinear(layer.packed.clone(), layer.scales.clone(), n, k, fmt,
                                                 layer.group_size) for _ in range(copies - 1)]
            impls[fmt] = (cycler(layers), layer.nbytes)
        if not args.no_baseline:
            copies = max(1, math.ceil(96e6 / (w.numel() * 4)))
            ws = [w] + [w.clone() for _ in range(copies - 1)]
            nxt = cycler(ws)
            impls["F.linear"] = (lambda x, nxt=nxt: F.linear(x, nxt()), w.numel() * 4)
        for m in ms:
            x = torch.randn(m, k)
            fns = {f: (lambda nxt=nxt: nxt()(x)) if f in ops.FORMATS else (lambda nxt=nxt: nxt(x))
                   for f, (nxt, _) in impls.items()}
            for fn in fns.values():
                fn()
            reps = max(3, args.reps // 10) if name in HEAD else args.reps
            for f, fn in fns.items():
                ms_ = median_ms(fn, reps)
                nbytes = impls[f][1]
                floor = nbytes / BANDWIDTH * 1e3
                rows.append({"shape": name, "impl": f, "M": m, "ms": round(ms_, 4),
                             "GBps": round(nbytes / ms_ / 1e6, 2), "floor_ms": round(floor, 4),
                             "floor_ratio": round(floor / ms_, 3)})
                print(f"{name:>18} {f:>10} {m:>3} {ms_:8.3f} {nbytes / ms_ / 1e6:6.1f} {floor / ms_:8.2f}",
                      flush=True)
    for key, s in pack_s.items():
        print(f"pack {key}: {s:.2f} s")
    print(json.dumps({"threads": args.threads, "results": rows,
                      "pack_s": {k: round(v, 3) for k, v in pack_s.items()}}))


if __name__ == "__main__":
    main()
