"""Progress bars for the waits a user sits through: packing a model, dequantizing a GGUF, a bench.

A thin layer over ``tqdm`` (rates and ETA included) with one rule: bars are drawn only on a
terminal. ``bar`` returns a tqdm that does nothing when ``quiet`` is set or stderr is not a
terminal (a pipe, a log file, a test), so callers update it unconditionally; ``write`` prints a
line on stderr above any open bar instead of through it.

Must not: print to stdout (the CLI's results and JSON go there), or decide anything but display.
"""
from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
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


def write(line: str) -> None:
    """Print ``line`` on stderr without breaking an open bar."""
    tqdm.write(line, file=sys.stderr)
