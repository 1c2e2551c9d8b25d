"""Serving load: throughput and latency at 1, 4, 8 and 16 concurrent clients, speculative vs plain.

Starts ``mtpspec serve`` processes on loopback with the same model: plain (``--spec none``),
speculative (``--spec mtp`` by default), and speculative with ``--max-verify-rows N`` (drafting
that shrinks as the batch fills), and drives each with C concurrent clients sending greedy
``/v1/completions`` requests (MT-bench first turns framed as ``Question: ...\\nAnswer:``), streamed
so that each client times its own first token (TTFT) and the mean time per output token after it
(TPOT). The servers take turns at every concurrency level, in one run, so the ratios are what to
read on a noisy shared machine. Greedy outputs must equal the plain server's at 1 client (batching
and speculation are lossless); mismatches are counted and reported, and so are failed requests
(any non-200 answer or broken stream), which must be 0.

Prints a table for people and, last, one JSON line for machines.

    .venv/bin/python bench/serve_bench.py --weights int8 --max-tokens 64 --requests 16
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mtpspec.bench.prompts import load_prompts  # noqa: E402


@dataclass
class Level:
    """One (server, concurrency) measurement."""

    tokens: int
    wall_s: float
    steps: int
    generated: int
    draft_n: int
    draft_n_accepted: int
    texts: list[str]
    ttft_s: list[float]     # per request
    tpot_s: list[float]     # per request with more than one token
    errors: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    @property
    def tau(self) -> float:
        return self.generated / self.steps if self.steps else 0.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args, spec: str, verify_rows: int = 0) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "mtpspec.cli", "serve", "--spec", spec, "--port", str(port),
               "--weights", args.weights, "--max-len", str(args.max_len),
               "--max-batch-size", str(args.max_batch_size), "--draft-k", str(args.draft_k),
               "--max-verify-rows", str(verify_rows)]
    if args.model:
        command += ["--model", args.model]
    process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + args.start_timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"serve_bench: the {spec} server exited: {process.stderr.read()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return process, url
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.5)
    process.kill()
    raise SystemExit(f"serve_bench: the {spec} server did not start in {args.start_timeout} s")


def complete(url: str, prompt: str, max_tokens: int) -> dict:
    """One streamed greedy completion: text, usage, TTFT and TPOT (s), or ``error``."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()
    request = urllib.request.Request(url + "/v1/completions", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    first, text, usage = None, [], None
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            for line in response:
                if not line.startswith(b"data: {"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return {"error": event["error"]["message"]}
                if event.get("usage"):
                    usage = event["usage"]
                for choice in event["choices"]:
                    if choice["text"]:
                        first = first if first is not None else time.perf_counter()
                        text.append(choice["text"])
    except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError) as err:
        return {"error": f"{type(err).__name__}: {err}"}
    end = time.perf_counter()
    if usage is None:
        return {"error": "the stream ended without usage"}
    first = first if first is not None else end
    tokens = usage["completion_tokens"]
    return {"text": "".join(text), "usage": usage, "ttft": first - start,
            "tpot": (end - first) / (tokens - 1) if tokens > 1 else None}


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def scrape(url: str) -> dict[str, float]:
    """Unlabelled samples of the server's /metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
        lines = response.read().decode().splitlines()
    return {line.split()[0]: float(line.split()[1]) for line in lines
            if line and not line.startswith("#") and "{" not in line}


def measure(url: str, prompts: list[str], clients: int, max_tokens: int) -> Level:
    before = scrape(url)
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(lambda p: complete(url, p, max_tokens), prompts))
    wall = time.perf_counter() - start
    after = scrape(url)
    delta = {name: after[name] - before.get(name, 0.0) for name in after}
    good = [a for a in answers if "error" not in a]
    usages = [a["usage"] for a in good]
    return Level(tokens=sum(u["completion_tokens"] for u in usages), wall_s=wall,
                 steps=int(delta["mtpspec_verification_steps_total"]),
                 generated=int(delta["mtpspec_verified_tokens_total"]),
                 draft_n=sum(u["draft_n"] for u in usages),
                 draft_n_accepted=sum(u["draft_n_accepted"] for u in usages),
                 texts=[a.get("text") for a in answers],
                 ttft_s=[a["ttft"] for a in good],
                 tpot_s=[a["tpot"] for a in good if a["tpot"] is not None],
                 errors=len(answers) - len(good))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="GGUF or HF folder (default: embedded)")
    parser.add_argument("--weights", default="int8")
    parser.add_argument("--spec", default="mtp", help="the speculative servers' --spec")
    parser.add_argument("--draft-k", type=int, default=4)
    parser.add_argument("--verify-rows", type=int, default=16,
                        help="also run a speculative server with --max-verify-rows N (0: don't)")
    parser.add_argument("--prompts", type=Path, default=ROOT / "docs" / "mtbench16.jsonl")
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--requests", type=int, default=16, help="requests per level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--start-timeout", type=float, default=300.0)
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    texts = [p.text if p.verbatim else f"Question: {p.text}\nAnswer:"
             for p in load_prompts(args.prompts)]
    prompts = [texts[i % len(texts)] for i in range(args.requests)]
    setups = {"plain": ("none", 0), "spec": (args.spec, 0)}
    if args.verify_rows:
        setups[f"spec-rows{args.verify_rows}"] = (args.spec, args.verify_rows)

    servers: dict[str, tuple[subprocess.Popen, str]] = {}
    results: dict[int, dict[str, Level]] = {}
    try:
        for name, (spec, rows) in setups.items():
            servers[name] = start_server(args, spec, rows)
        for _, url in servers.values():  # warm-up: kernels, caches, the first prefill
            complete(url, texts[0], 8)
        for clients in levels:  # the servers take turns at every level
            results[clients] = {}
            for name in setups:
                level = measure(servers[name][1], prompts, clients, args.max_tokens)
                results[clients][name] = level
                print(f"serve_bench: {name} c={clients}: {level.tokens} tokens in "
                      f"{level.wall_s:.1f} s ({level.tokens_per_s:.1f} tok/s)", file=sys.stderr)
    finally:
        for process, _ in servers.values():
            process.send_signal(signal.SIGINT)
        for process, _ in servers.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()

    base = results[levels[0]]["plain"]
    rows = []
    for clients in levels:
        plain = results[clients]["plain"]
        for name, level in results[clients].items():
            rows.append({
                "clients": clients, "server": name, "requests": len(prompts),
                "tok_s": round(level.tokens_per_s, 2),
                "vs_plain": round(level.tokens_per_s / plain.tokens_per_s, 3),
                "vs_plain_c1": round(level.tokens_per_s / base.tokens_per_s, 3),
                "tau": round(level.tau, 3),
                "acceptance": round(level.draft_n_accepted / level.draft_n, 4)
                if level.draft_n else 0.0,
                "mismatches_vs_plain_c1": sum(a != b for a, b in zip(level.texts, base.texts)),
                "ttft_p50_ms": round(1000 * percentile(level.ttft_s, 0.5), 1),
                "ttft_p99_ms": round(1000 * percentile(level.ttft_s, 0.99), 1),
                "tpot_p50_ms": round(1000 * percentile(level.tpot_s, 0.5), 1),
                "tpot_p99_ms": round(1000 * percentile(level.tpot_s, 0.99), 1),
                "errors": level.errors,
            })
    print(f"\nmtpspec serve: {args.weights}, {args.max_tokens} new tokens, {len(prompts)} requests "
          f"per level, greedy, spec = {args.spec} k={args.draft_k}, max batch {args.max_batch_size}")
    print("| clients | server | total tok/s | vs plain (same clients) | TTFT p50 / p99 ms "
          "| TPOT p50 / p99 ms | tau | acceptance | mismatches | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clients']} | {r['server']} | {r['tok_s']:.1f} | {r['vs_plain']:.2f}x | "
              f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | "
              f"{r['tpot_p50_ms']:.1f} / {r['tpot_p99_ms']:.1f} | {r['tau']:.2f} | "
              f"{r['acceptance']:.1%} | {r['mismatches_vs_plain_c1']} | {r['errors']} |")
    doc = {"bench": "serve", "weights": args.weights, "spec": args.spec, "draft_k": args.draft_k,
           "verify_rows": args.verify_rows, "max_tokens": args.max_tokens,
           "requests": len(prompts), "max_batch_size": args.max_batch_size,
           "cpus": os.cpu_count(), "levels": rows}
    if args.json is not None:
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
