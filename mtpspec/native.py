"""Build and load the native kernels (``mtpspec/csrc``), after checking the CPU can run them.

What: ``extension()`` returns the compiled module (packed products, argmax screen, attention, the
one decoder-layer body and the target/draft stacks over it) or None; ``available()`` says which.
The sources are real C++ files under ``mtpspec/csrc`` (headers, one concern per file), built with
``torch.utils.cpp_extension.load`` on first use into ``~/.cache/torch_extensions`` under a name
derived from a hash of every source file and the flags, so checkouts of different versions
(worktrees, installed copies) never rebuild over each other and an unchanged tree loads in ~1 s.

CPU dispatch: the kernels are compiled with ``-mavx2 -mfma -mf16c``; a CPU without those would die
of an illegal instruction on the first call. So before building or loading, the CPU's flags are
read (``/proc/cpuinfo``; elsewhere torch's own capability probe) and, without all three, nothing
native is loaded: one warning, then the portable path everywhere (``PackedLinear`` multiplies with
``F.linear`` on the dequantized weight, the Python reference layers run, greedy tokens come from
the full LM head). ``MTPSPEC_PORTABLE=1`` forces that path on any CPU (tests compare the two).

``MTPSPEC_SANITIZE=undefined`` builds a separate copy with ``-fsanitize=undefined`` (run the
per-op and stack tests under it to check the C++ for undefined behaviour; ASan needs the
sanitizer runtime preloaded into Python, ``LD_PRELOAD=$(g++ -print-file-name=libasan.so)``).

A build failure on a CPU that has the features is an error worth seeing: ``extension()`` warns
and returns None, and ``require()`` (what the exactness tests call) raises it.

Must not: import ``ops``, ``screen`` or ``fused`` (they import this module), or load the
extension on a CPU without AVX2, FMA and F16C.
"""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import time
import warnings
from pathlib import Path

CSRC = Path(__file__).parent / "csrc"
SOURCES = ("thread_pool.cpp", "packed.cpp", "screen.cpp", "attention.cpp", "layer.cpp", "stacks.cpp",
           "bindings.cpp")
REQUIRED_FEATURES = ("avx2", "fma", "f16c")
CFLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-Wall", "-Wextra",
          "-Wno-unused-parameter")
PORTABLE_ENV = "MTPSPEC_PORTABLE"
SANITIZE_ENV = "MTPSPEC_SANITIZE"  # e.g. "undefined": a UBSan build (its own cache entry)


class NativeUnavailable(RuntimeError):
    """The native kernels cannot run here (and why)."""


def cpu_features() -> set[str]:
    """The CPU's instruction-set flags that matter here (lower case)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split()) & set(REQUIRED_FEATURES)
    if platform.machine().lower() in ("x86_64", "amd64"):  # no /proc: ask torch's probe
        import torch

        capability = torch.backends.cpu.get_cpu_capability()
        if capability.startswith("AVX2") or capability.startswith("AVX512"):
            return set(REQUIRED_FEATURES)
    return set()


def portable_reason() -> str | None:
    """Why the portable path must be used here, or None when the native kernels may run."""
    if os.environ.get(PORTABLE_ENV, "") not in ("", "0"):
        return f"{PORTABLE_ENV} is set"
    missing = [f for f in REQUIRED_FEATURES if f not in cpu_features()]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    return None


def _flags() -> tuple[list[str], list[str]]:
    """(compiler flags, linker flags), with the sanitizer of ``MTPSPEC_SANITIZE`` if set."""
    sanitize = os.environ.get(SANITIZE_ENV, "")
    if not sanitize:
        return list(CFLAGS), []
    extra = [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-g"]
    return [*CFLAGS, *extra], [f"-fsanitize={sanitize}"]


def build_name() -> str:
    """Extension name: a hash of every source and header, of the flags and of where the sources
    are (torch's build files name them by absolute path, so two checkouts sharing one build folder
    would rebuild over each other)."""
    cflags, ldflags = _flags()
    digest = hashlib.sha256(" ".join(cflags + ldflags).encode())
    digest.update(str(CSRC.resolve()).encode())
    for path in sorted(CSRC.iterdir()):
        if path.suffix in (".h", ".cpp"):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return f"mtpspec_native_{digest.hexdigest()[:12]}"


@functools.lru_cache(maxsize=None)
def _load():
    """(module or None, error message or None); built or loaded once per process."""
    reason = portable_reason()
    if reason is not None:
        return None, f"portable path: {reason}"
    try:
        from torch.utils.cpp_extension import load

        cflags, ldflags = _flags()
        clear_stale_lock(build_name())
        module = load(name=build_name(), sources=[str(CSRC / s) for s in SOURCES],
                      extra_cflags=cflags, extra_ldflags=ldflags, extra_include_paths=[str(CSRC)])
        return module, None
    except (RuntimeError, OSError, ImportError) as err:  # no compiler / ninja, or a build error
        return None, f"native build failed: {err}"


STALE_LOCK_S = 15 * 60  # a build takes 1-3 minutes on 2 cores; an older lock was left by a kill


def clear_stale_lock(name: str) -> bool:
    """Remove the build lock of ``name`` when it is older than ``STALE_LOCK_S``: a build killed
    mid-way leaves it behind, and torch then waits for it forever. True if one was removed."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        lock = Path(_get_build_directory(name, verbose=False)) / "lock"
        if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink(missing_ok=True)
            warnings.warn(f"mtpspec: removed a stale native build lock ({lock})", stacklevel=3)
            return True
    except (ImportError, OSError):
        pass
    return False


def extension():
    """The native module, or None (the portable path; warned once)."""
    module, error = _load()
    if module is None:
        _warn_once(error)
    return module


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(f"mtpspec: native kernels unavailable ({message}); using the portable torch path",
                  stacklevel=3)


def available() -> bool:
    return extension() is not None


def require():
    """The native module; raises ``NativeUnavailable`` with the build error or the reason."""
    module, error = _load()
    if module is None:
        raise NativeUnavailable(error)
    return module


def main() -> int:
    """``python -m mtpspec.native``: build (or load) the kernels and say which path runs; exit 1
    when the build fails on a CPU that can run them (what CI checks first)."""
    reason = portable_reason()
    if reason is not None:
        print(f"mtpspec.native: portable path ({reason})")
        return 0
    try:
        module = require()
    except NativeUnavailable as err:
        print(f"mtpspec.native: {err}")
        return 1
    print(f"mtpspec.native: built {module.__name__} from {CSRC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
