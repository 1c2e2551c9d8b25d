"""Progress bars for the waits a user sits through: packing a model, dequantizing a GGUF, a bench.

A thin layer over ``tqdm`` (rates and ETA included) with one rule: bars are drawn only on a
terminal. ``bar`` returns a tqdm that does nothing when ``quiet`` is set or stderr is not a
terminal (a pipe, a log file, a test), so callers update it unconditionally; ``waiting`` is the
same for one long call that reports nothing (a ticking elapsed time, drawn after a second);
``write`` prints a line on stderr above any open bar instead of through it.

Must not: print to stdout (the CLI's results and JSON go there), or decide anything but display.
"""
from __future__ import annotations

import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def shown(quiet: bool = False) -> bool:
    """Whether bars are drawn: not ``quiet`` and stderr is a terminal."""
    return not quiet and sys.stderr.isatty()


def bar(total: float | None, desc: str, unit: str = "it", quiet: bool = False,
        unit_scale: bool = False, leave: bool = False) -> tqdm:
    """A progress bar on stderr (a silent one unless ``shown(quiet)``); use it as a context
    manager and ``update(n)`` it. ``leave``: keep the finished bar on screen."""
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, leave=leave,
                disable=not shown(quiet), file=sys.stderr, dynamic_ncols=True)


def track(items: Iterable[T], total: int, desc: str, unit: str = "it",
          quiet: bool = False) -> Iterator[T]:
    """``items``, advancing a bar of ``total`` steps as each is taken."""
    with bar(total, desc, unit, quiet) as progress:
        for item in items:
            yield item
            progress.update(1)


@contextmanager
def waiting(desc: str, quiet: bool = False, delay_s: float = 1.0) -> Iterator[None]:
    """Show ``desc`` and the elapsed time while the body runs, if it takes over ``delay_s``."""
    with tqdm(total=None, desc=desc, bar_format="{desc}: {elapsed}", delay=delay_s, leave=False,
              disable=not shown(quiet), file=sys.stderr) as clock:
        done = threading.Event()

        def tick() -> None:
            while not done.wait(0.5):
                clock.refresh()
        ticker = threading.Thread(target=tick, name="mtpspec-progress", daemon=True)
        if not clock.disable:
            ticker.start()
        try:
            yield
        finally:
            done.set()
            if ticker.is_alive():
                ticker.join()


def write(line: str) -> None:
    """Print ``line`` on stderr without breaking an open bar."""
    tqdm.write(line, file=sys.stderr)
