"""Weight-only packed linear layers for small M (the decode and verification hot path).

What: ``PackedLinear`` stores a ``[out, in]`` weight in one of ``FORMATS`` and multiplies float32
activations ``x [..., in]`` by it with float32 accumulation, for M = rows of x in 1..16 (any M works).
``dequantized()`` / ``rows(idx)`` give the float32 weight the layer really multiplies by.

Why: at M = 1..9 a linear layer should cost one read of its weight (bytes / ~19.5 GB/s). The stock
kernels on this machine (Zen 3, AVX2+FMA, 2 vCPUs, torch 2.13 CPU) are far from that, so the layer
runs its own AVX2 kernel (``mtpspec/csrc/packed.cpp``, built by ``mtpspec.native``: ~35 s once,
cached under ~/.cache/torch_extensions; needs g++ and ninja). On the portable path (no compiler,
a CPU without AVX2/FMA/F16C, or ``MTPSPEC_PORTABLE=1``) it multiplies with ``F.linear`` on the
dequantized weight: the same float32 weights, correct, slow.

Measured (bench/kernels.py; medians, rotating >96 MB of weight copies so L3 cannot hold them):
- ``F.linear`` / ``x @ Wt`` / ``torch.mm`` (MKL SGEMM for every M, incl. M=1): at the floor for
  M=1 only; 2-3x over it at M=2..16 on 1 thread (640->4096: M=1 0.45-0.7 ms, M=8 1.4-1.6 ms vs
  floor 0.54). ``torch.ops.aten._weight_int8pack_mm`` and ``_weight_int4pack_mm_for_cpu`` are
  scalar on AVX2-only CPUs: 640->4096 M=1 takes 2.5 / 5.1 ms (18-38x their floor), and grow
  linearly with M. ``F.linear`` on bf16 weights (oneDNN, no native bf16 here) ~ fp32 at M=1 and
  4x worse per row after. So none of them is used.
- The "16 ms at M=2..8 with 2 threads" pathology: all these shapes go to MKL SGEMM(T,N); for M>=2
  it splits the work over the 2 OpenMP threads with a static partition and a closing barrier. When
  another process holds the second vCPU (other workers share this box), the barrier waits for the
  scheduler to run the preempted OMP thread: whole scheduler ticks, so 12/16/24/32 ms. M=1 takes
  MKL's single-threaded gemv path and never sees it. ``torch.backends.mkldnn`` does not matter (fp32
  linear never goes to oneDNN). Fix at run time, no env vars: ``torch.set_num_threads(1)`` (works
  after import; same numbers as OMP_NUM_THREADS=1), or this module's kernels, whose pool never
  waits for a helper thread that has not started a chunk (see ``set_num_threads``).
- This kernel: weight packed in panels of 16 output channels, k-major (``[P, K, 16]``), streamed
  once; each panel is multiplied against blocks of up to 6 rows held in 8-12 AVX2
  accumulators, dequantizing in registers (bf16: shift; int8: sign-extend + convert, per-channel
  scale at the end; int4: nibble unpack + one FMA with the group's fp16 scale/offset). fp32 runs
  at the bandwidth floor for M=1..4 on one core and is 1.7-2x faster than MKL at M=8..16. The
  quantized formats reach 0.4-0.6 of their (much lower) floor at M=1 and are compute-bound from
  M=4 (one core does ~60-70 GFLOP/s): see the table in the report / bench output.
- LM head 640->262144, 1 kernel thread, box under load from other workers (medians, ms; floor in
  brackets): M=1 fp32 49 [34], bf16 29 [17], int8 25 [8.6], int4 26 [5.4]; M=4 54 / 36 / 25 / 28;
  M=8 71 / 49 / 44 / 55; F.linear fp32: 54 / 172 / 146. int8 is the fastest at M>=2 (int4's
  unpacking costs more than its smaller read once compute-bound); int4 is for memory.
- Threads: default 2 (or the CPUs this process may use, if fewer). On the quiet box (2026-11-27,
  int8, fused stack) 2 threads take a one-token forward from 22.7 to 13.2 ms and M=5 from 47 to
  23 ms. When another process holds the second vCPU, a helper that claimed a chunk and got
  descheduled made the caller wait a scheduler slice (2 threads were 30-60% slower than 1); the
  pool now notices such a wait and runs the caller alone for 50 ms (``set_backoff_ms``), which
  brings 2 threads back to 1-thread speed or better under that load.
- Building these kernels in one translation unit with the fused layers changed GCC's inlining and
  left the micro-kernel's accumulators on the stack (M >= 4 fell from ~90 to ~33 GFLOP/s); the
  micro-kernel is out of line with forced unrolling, and now in its own file (``packed.cpp``).

Formats: fp32; bf16 (round-to-nearest-even); int8 symmetric per output channel (fp32 scales);
int4 asymmetric per group of ``group_size`` inputs along K (fp16 scale + fp16 offset, 5 bits/weight
at group 32), which represents a GGUF Q4_K sub-block's affine grid up to fp16 rounding.

Must not: hold an unpacked copy of the weight, or need autograd (inference only).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtpspec import native

FORMATS = ("fp32", "bf16", "int8", "int4")


def set_num_threads(n: int) -> None:
    """Threads the packed kernels use (default 2). n > 1 starts n-1 helper threads that claim
    chunks of output panels; the caller never waits for a helper that has not started one, so a
    helper starved by another process costs at most the chunk it holds (~64 KB of weight)."""
    global _THREADS
    _THREADS = max(1, int(n))


def set_spin_us(us: int) -> None:
    """How long idle helper threads spin before sleeping (default 200 us)."""
    ext = _extension()
    if ext is not None:
        ext.set_spin_us(int(us))


def set_backoff_ms(ms: int) -> None:
    """After the caller waited > 200 us (and > 8 of its own chunks) for a chunk a helper had
    claimed, which happens when another process holds the helper's core, run the kernels on the
    caller alone for ``ms`` milliseconds (default 50; 0 never backs off)."""
    ext = _extension()
    if ext is not None:
        ext.set_backoff_ms(int(ms))


def _default_threads() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(2, cpus))


_THREADS = _default_threads()
_CHUNK_BYTES = 64 * 1024  # weight bytes per work item handed to a thread
_FMT_CODE = {"fp32": 0, "bf16": 1, "int8": 2, "int4": 3}
_PANEL = 16  # output channels per packed panel


def get_num_threads() -> int:
    """Threads the packed kernels (and the fused layers) use now."""
    return _THREADS


def _extension():
    """The native module (``mtpspec.native``), or None on the portable path."""
    return native.extension()


def fused_extension():
    """The native module when the fused stacks may be used (``mtpspec.fused``), else None."""
    return native.extension()


def kernels_available() -> bool:
    return _extension() is not None


def _to_panels(t: Tensor) -> Tensor:
    """[P*16, K] -> [P, K, 16]: one panel of 16 output channels, k-major."""
    n, k = t.shape
    return t.reshape(n // _PANEL, _PANEL, k).transpose(1, 2).contiguous()


class PackedLinear(nn.Module):
    """y = x @ W.T for float32 x, with W stored packed in ``fmt`` (see the module docstring)."""

    def __init__(self, packed: Tensor, scales: Tensor, out_features: int, in_features: int,
                 fmt: str, group_size: int):
        super().__init__()
        self.register_buffer("packed", packed)  # fp32/bf16/int8: [P, K, 16]; int4: [P, K, 8] uint8
        self.register_buffer("scales", scales)  # int8: [P*16] f32; int4: [P, K/G, 2, 16] f16; else []
        self.out_features, self.in_features = out_features, in_features
        self.fmt, self.group_size = fmt, group_size

    @classmethod
    @torch.no_grad()
    def from_weight(cls, weight: Tensor, fmt: str, group_size: int = 32) -> "PackedLinear":
        if fmt not in FORMATS:
            raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
        n, k = weight.shape  # [out, in]
        w = weight.detach().to(torch.float32)
        npad = -n % _PANEL
        if npad:
            w = torch.cat([w, w.new_zeros(npad, k)])  # [P*16, K]
        empty = torch.empty(0)
        if fmt == "fp32":
            return cls(_to_panels(w), empty, n, k, fmt, 0)
        if fmt == "bf16":
            return cls(_to_panels(w.to(torch.bfloat16)), empty, n, k, fmt, 0)
        if fmt == "int8":
            scale = w.abs().amax(1) / 127.0  # [P*16]
            scale[scale == 0] = 1.0
            q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
            return cls(_to_panels(q), scale, n, k, fmt, 0)
        return cls(*_pack_int4(w, group_size), n, k, fmt, group_size)

    def kernel_weight(self):
        """This weight as the native ``PackedWeight`` the C++ stacks and products take (None on
        the portable path)."""
        ext = _extension()
        if ext is None:
            return None
        return ext.PackedWeight(self.packed, self.scales, _FMT_CODE[self.fmt], self.out_features,
                                self.in_features, self.group_size)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales))

    def forward(self, x: Tensor) -> Tensor:  # [..., in] f32 -> [..., out] f32
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(torch.float32).contiguous()  # [M, K]
        ext = _extension()
        if ext is None:
            y = F.linear(x2, self.dequantized())
        else:
            y = ext.packed_linear(x2, self.kernel_weight(), _THREADS, _CHUNK_BYTES)
        return y.reshape(*lead, self.out_features)

    @torch.no_grad()
    def rows(self, idx: Tensor) -> Tensor:  # [L] int -> [L, in] f32, dequantized rows of W
        idx = idx.to(torch.long).reshape(-1)
        ext = _extension()
        if ext is not None and idx.device.type == "cpu" and self.packed.device.type == "cpu":
            return ext.packed_rows(idx.contiguous(), self.kernel_weight())
        p, j = idx // _PANEL, idx % _PANEL  # panel and lane of each row
        if self.fmt == "fp32":
            return self.packed[p, :, j]
        if self.fmt == "bf16":
            return self.packed[p, :, j].to(torch.float32)
        if self.fmt == "int8":
            return self.packed[p, :, j].to(torch.float32) * self.scales[idx][:, None]
        byte = self.packed[p, :, j % 8]  # [L, K] uint8
        q = torch.where((j < 8)[:, None], byte & 15, byte >> 4).to(torch.float32)
        g = self.group_size
        s = self.scales[p, :, 0, j].to(torch.float32).repeat_interleave(g, 1)[:, : self.in_features]
        b = self.scales[p, :, 1, j].to(torch.float32).repeat_interleave(g, 1)[:, : self.in_features]
        return q * s + b

    def dequantized(self) -> Tensor:  # [out, in] f32
        return self.rows(torch.arange(self.out_features))

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.fmt == "int4" else ""
        return f"{self.in_features} -> {self.out_features}, fmt={self.fmt}{g}"


def _pack_int4(w: Tensor, group: int) -> tuple[Tensor, Tensor]:
    """w [P*16, K] f32 -> (bytes [P, K, 8] uint8, fp16 scale/offset [P, ceil(K/G), 2, 16])."""
    n, k = w.shape
    ng = -(-k // group)
    pad = ng * group - k
    wg = F.pad(w, (0, pad)).reshape(n, ng, group)  # [N, ng, G]
    lo, hi = wg.amin(2), wg.amax(2)  # [N, ng]
    if pad:  # the padded zeros of the last group must not widen its range
        lo[:, -1], hi[:, -1] = w[:, (ng - 1) * group:].amin(1), w[:, (ng - 1) * group:].amax(1)
    scale = ((hi - lo) / 15).to(torch.float16)
    scale[scale == 0] = 1.0
    offset = lo.to(torch.float16)
    q = torch.round((wg - offset.float()[..., None]) / scale.float()[..., None]).clamp_(0, 15)
    q = _to_panels(q.to(torch.uint8).reshape(n, ng * group)[:, :k])  # [P, K, 16]
    nibbles = (q[..., :8] | (q[..., 8:] << 4)).contiguous()  # lane j: channel j | channel j+8
    p = n // _PANEL
    sb = torch.stack([t.reshape(p, _PANEL, ng).transpose(1, 2) for t in (scale, offset)], 2)
    return nibbles, sb.contiguous()  # [P, K, 8], [P, ng, 2, 16]
