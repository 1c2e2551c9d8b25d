"""Recipe comparisons for the drafter: learning curves of variants trained at equal budget.

Every variant trains on the same generated data (``--data DIR``: the target's responses and
recorded states in ``DIR/dataset``, written once by ``mtpspec train ... --steps 0 --data DIR``) for the same number of steps of
the same batch shape, and is evaluated every ``--eval-every`` steps on the same held-out sequences
(the data file's ``eval`` split: greedy responses to prompts the recipe never trains on). The
harness runs the variants as ``mtpspec train`` processes (``--parallel`` at once, each with
``--threads``), resumable: run the same command again and each variant continues from its last
checkpoint; ``--report`` only draws what is there.

Output in ``--out``: one folder per variant (a drafter checkpoint, its ``train_log.txt``),
``recipe.json`` (the history of every variant), ``recipe.png`` (acceptance at draft position 1 and
tau at k = 4 against training tokens) and ``recipe.md`` (the table at the last common evaluation).

Usage:
  python bench/recipe.py --model smollm2 --data /work/exp/smol-data --out recipe-smol \\
      --steps 600 --eval-every 100 --variants base hard unroll2 wide1 --parallel 4 --threads 1
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# shared by every variant (SmolLM2-sized head; heads must be a multiple of the target's kv heads)
BASE = {"--d-draft": "384", "--heads": "6", "--layers": "2", "--intermediate": "1024",
        "--clusters": "384", "--top-clusters": "24", "--loss-vocab": "8192", "--batch-size": "8",
        "--seq-len": "256", "--lr": "1e-3", "--unroll": "4", "--labels": "soft"}
# each variant changes one axis of the recipe against "base"
VARIANTS = {
    "base": {},
    "hard": {"--labels": "hard"},                       # hard labels against top-k soft targets
    "unroll2": {"--unroll": "2"},                       # training-time rollout depth
    "unroll6": {"--unroll": "6"},
    "wide1": {"--layers": "1", "--d-draft": "576", "--heads": "9", "--intermediate": "1536"},
    "deep3": {"--layers": "3"},                         # head depth
    "lr3e-3": {"--lr": "3e-3"},
}


def variant_args(name: str, base: dict[str, str]) -> list[str]:
    flags = {**base, **VARIANTS[name]}
    return [item for pair in flags.items() for item in pair]


def run_variants(args: argparse.Namespace) -> None:
    """Run (or resume) every variant, ``--parallel`` at a time."""
    pending = list(args.variants)
    running: list[tuple[str, subprocess.Popen]] = []
    while pending or running:
        while pending and len(running) < args.parallel:
            name = pending.pop(0)
            folder = args.out / name
            folder.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, "-m", "mtpspec.cli", "train", "--out", str(folder),
                       "--data", str(args.data), "--gen-weights", args.gen_weights,
                       "--steps", str(args.steps), "--eval-every", str(args.eval_every),
                       "--seed", str(args.seed), "--threads", str(args.threads),
                       *variant_args(name, args.base)]
            if args.model:
                command += ["--model", args.model]
            log = (folder / "train_log.txt").open("a")
            print(f"[recipe] {name}: {' '.join(command)}", flush=True)
            running.append((name, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)))
        time.sleep(5)
        for name, proc in list(running):
            if proc.poll() is not None:
                print(f"[recipe] {name} finished with exit code {proc.returncode}", flush=True)
                running.remove((name, proc))


def histories(out: Path, names: list[str]) -> dict[str, list[dict]]:
    """Each variant's evaluation history from its checkpoint (drafter.json)."""
    found = {}
    for name in names:
        meta = out / name / "drafter.json"
        if meta.exists():
            found[name] = json.loads(meta.read_text()).get("history", [])
    return found


def report(out: Path, names: list[str]) -> str:
    runs = histories(out, names)
    (out / "recipe.json").write_text(json.dumps(runs, indent=1))
    common = min((h[-1]["step"] for h in runs.values() if h), default=0)
    lines = [f"Variants at step {common} (equal budget; held-out greedy acceptance, clustered head)",
             "",
             "| variant | change | training tokens | acc@1 | acc@2 | acc@3 | acc@4 | tau@4 | tau@6 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, history in runs.items():
        at = [h for h in history if h["step"] == common]
        if not at:
            continue
        h = at[0]
        acc = h["acceptance_per_position"]
        change = " ".join(f"{k} {v}" for k, v in VARIANTS.get(name, {}).items()) or "-"
        lines.append(f"| {name} | {change} | {h.get('tokens', 0):,} | "
                     + " | ".join(f"{a:.3f}" for a in acc[:4])
                     + f" | {h['tau']['4']:.2f} | {h['tau']['6']:.2f} |")
    table = "\n".join(lines)
    (out / "recipe.md").write_text(table + "\n")
    _plot(runs, out / "recipe.png")
    return table


def _plot(runs: dict[str, list[dict]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, history in runs.items():
        if not history:
            continue
        tokens = [h.get("tokens", h["step"]) / 1e6 for h in history]
        left.plot(tokens, [h["acceptance_per_position"][0] for h in history], marker="o", label=name)
        right.plot(tokens, [h["tau"]["4"] for h in history], marker="o", label=name)
    left.set(xlabel="training tokens (M)", ylabel="acceptance at draft position 1",
             title="held-out, greedy")
    right.set(xlabel="training tokens (M)", ylabel="tau (k = 4)", title="held-out, greedy")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--data", type=Path, required=True,
                        help="folder of the shared generated data (DIR/dataset)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variants", nargs="+", default=["base", "hard", "unroll2", "wide1"],
                        choices=sorted(VARIANTS))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gen-weights", default="int8", choices=("int8", "fp32"))
    parser.add_argument("--report", action="store_true", help="only write the table and plot")
    args = parser.parse_args(argv)
    args.base = dict(BASE)
    if not args.report:
        if not (args.data / "dataset").exists() and not (args.data / "data.pt").exists():
            parser.error(f"{args.data} holds no generated data: generate it first "
                         "(mtpspec train ... --steps 0 --data DIR)")
        run_variants(args)
    print(report(args.out, args.variants))


if __name__ == "__main__":
    main()
