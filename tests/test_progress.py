"""Progress bars (``mtpspec.progress``): drawn on a terminal with rates and ETA, silent on a pipe
or with ``quiet``; and where they are used: a first start's packing (``runtime``) and the
benchmark's warm-up and runs (``bench.runner``). A fake terminal stands in for stderr."""
from __future__ import annotations

import io
import sys

from mtpspec import progress
from mtpspec.bench.methods import EngineMethod
from mtpspec.bench.prompts import BenchPrompt
from mtpspec.bench.runner import BenchConfig, run_bench
from mtpspec.engine import Engine
from mtpspec.proposers.ngram import NgramProposer
from mtpspec.runtime import load_target

from conftest import tiny_model
from tiny_hf import ByteTokenizer, write_tiny_hf_model


class Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def terminal(monkeypatch) -> Terminal:
    """Make stderr a fake terminal for the rest of the test (called in the test's body: pytest's
    output capture sets ``sys.stderr`` again between a fixture and the test)."""
    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    return screen


def test_bars_only_on_a_terminal_and_not_quiet(monkeypatch):
    screen = terminal(monkeypatch)
    with progress.bar(10, "work", "item", leave=True) as bar:
        bar.update(10)
    drawn = screen.getvalue()
    assert "work" in drawn and "10/10" in drawn and "item/s" in drawn and "<" in drawn  # rate, ETA
    with progress.bar(10, "hushed", quiet=True) as bar:
        bar.update(10)
    assert "hushed" not in screen.getvalue()
    assert list(progress.track(range(3), 3, "tracked")) == [0, 1, 2]
    assert "tracked" in screen.getvalue()
    pipe = io.StringIO()  # a pipe or a file
    monkeypatch.setattr(sys, "stderr", pipe)
    assert not progress.shown()
    with progress.bar(5, "piped") as bar:
        bar.update(5)
    progress.write("a line")
    assert pipe.getvalue() == "a line\n"


def test_first_start_packing_shows_a_bar(tmp_path, monkeypatch):
    screen = terminal(monkeypatch)
    monkeypatch.setenv("MTPSPEC_CACHE", str(tmp_path / "cache"))
    folder = write_tiny_hf_model(tmp_path / "model")
    load_target(folder, "int8", quiet=True)
    assert "packing" not in screen.getvalue()
    monkeypatch.setenv("MTPSPEC_CACHE", str(tmp_path / "other"))
    load_target(folder, "int8")
    drawn = screen.getvalue()
    assert "packing model as int8" in drawn and "weight/s" in drawn
    before = len(drawn)
    load_target(folder, "int8")  # read back from the store: nothing to wait for
    assert "packing" not in screen.getvalue()[before:]


def test_bench_shows_warm_up_and_runs_per_method_and_prompt(monkeypatch):
    screen = terminal(monkeypatch)
    target, tokenizer = tiny_model(seed=0), ByteTokenizer()
    methods = [EngineMethod("plain", "plain", Engine(target, tokenizer, None, 256), None),
               EngineMethod("ngram", "ngram", Engine(target, tokenizer, NgramProposer(), 256), 3)]
    prompts = [BenchPrompt(i, "general", f"p{i}", True) for i in range(3)]
    ids = [[2] + [10 + i, 11 + i] * 4 for i in range(3)]
    run_bench(methods, prompts, ids, BenchConfig(max_new_tokens=4))
    drawn = screen.getvalue()
    assert "bench: warm-up" in drawn and "/2 [" in drawn
    assert "bench" in drawn and "6/6" in drawn and "run/s" in drawn  # 2 methods x 3 prompts
    assert "ngram on 2 (general)" in drawn or "plain on 2 (general)" in drawn
    size = len(drawn)
    run_bench(methods, prompts, ids, BenchConfig(max_new_tokens=4), quiet=True)
    assert len(screen.getvalue()) == size
