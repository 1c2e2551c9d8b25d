"""Checks of ``mtpspec train`` at scale on a tiny random Gemma 3, each printing one JSON line:

    ddp     one process vs ``--nproc 2`` (torchrun, gloo on CPU; nccl with --device cuda): wall
            time, the largest weight difference, the losses of both;
    resume  an uninterrupted run vs one SIGKILLed at random moments and restarted with the same
            command until it finishes: whether the drafters are equal bit for bit.

    python bench/train_scale_check.py ddp [--steps 40] [--device cpu]
    python bench/train_scale_check.py resume [--seed 0]

Larger than the tests (64 prompts, tens of steps), small enough for a 2-core CPU in a minute.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from tiny_hf import write_tiny_hf_model  # noqa: E402

RECIPE = ["--num-prompts", "64", "--eval-prompts", "2", "--max-new-tokens", "32",
          "--gen-batch", "4", "--batch-size", "8", "--seq-len", "40", "--unroll", "3",
          "--d-draft", "32", "--layers", "2", "--heads", "4", "--intermediate", "64",
          "--clusters", "8", "--top-clusters", "2", "--lr", "1e-2", "--quiet"]
CLI = [sys.executable, "-c", "import sys; from mtpspec.cli import main; sys.exit(main())", "train"]


def setup(root: Path) -> tuple[list[str], dict]:
    model = write_tiny_hf_model(root / "tiny", chat_template=True)
    gen = torch.Generator().manual_seed(0)
    prompts = [[2] + torch.randint(3, 500, (int(n),), generator=gen).tolist()
               for n in torch.randint(2, 7, (66,), generator=gen)]
    (root / "prompts.json").write_text(json.dumps(prompts))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "MTPSPEC_CACHE": str(root / "cache")}
    return ["--model", str(model), "--prompt-ids", str(root / "prompts.json"), *RECIPE], env


def state(out: Path) -> dict:
    return torch.load(out / "train_state.pt", weights_only=False)


def check_ddp(root: Path, args: argparse.Namespace) -> dict:
    common, env = setup(root)
    common += ["--steps", str(args.steps), "--eval-every", str(args.steps // 2),
               "--device", args.device]
    wall = {}
    for nproc in (1, 2):
        started = time.time()
        subprocess.run(CLI + ["--nproc", str(nproc), "--out", str(root / f"out{nproc}"), *common],
                       env=env, check=True, capture_output=True)
        wall[nproc] = round(time.time() - started, 1)
    one, two = state(root / "out1"), state(root / "out2")
    diff = max(float((one["head"][k].float() - two["head"][k].float()).abs().max())
               for k in one["head"])
    return {"check": "ddp", "steps": args.steps, "wall_s": wall, "max_abs_weight_diff": diff,
            "loss_1proc": [h["loss"] for h in one["history"]],
            "loss_2proc": [h["loss"] for h in two["history"]]}


def check_resume(root: Path, args: argparse.Namespace) -> dict:
    common, env = setup(root)
    common += ["--steps", "120", "--eval-every", "60", "--save-every", "7"]
    started = time.time()
    subprocess.run(CLI + ["--out", str(root / "straight"), *common], env=env, check=True,
                   capture_output=True)
    straight_s = time.time() - started
    rng, kills, finished = random.Random(args.seed), [], False
    while not finished and len(kills) < 30:
        proc = subprocess.Popen(CLI + ["--out", str(root / "resumed"), *common], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        delay = rng.uniform(3.0, max(4.0, 0.7 * straight_s))
        try:
            finished = proc.wait(timeout=delay) == 0
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            path = root / "resumed" / "train_state.pt"
            chunks = root / "resumed" / "dataset" / "train"
            kills.append({"after_s": round(delay, 1),
                          "checkpoint_step": state(root / "resumed")["step"] if path.exists()
                          else None,
                          "chunks_written": len(list(chunks.glob("chunk-?????")))
                          if chunks.exists() else 0})
    one, two = state(root / "straight"), state(root / "resumed")
    return {"check": "resume", "uninterrupted_s": round(straight_s, 1), "kills": kills,
            "finished": finished,
            "weights_bitwise_equal": all(torch.equal(one["head"][k], two["head"][k])
                                         for k in one["head"]),
            "drafter_files_equal": (root / "straight" / "drafter.safetensors").read_bytes()
            == (root / "resumed" / "drafter.safetensors").read_bytes()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("check", choices=("ddp", "resume"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = check_ddp if args.check == "ddp" else check_resume
        print(json.dumps(run(Path(tmp), args)))


if __name__ == "__main__":
    main()
