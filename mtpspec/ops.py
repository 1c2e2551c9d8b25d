"""Weight-only packed linear layers for small M (the decode and verification hot path).

What: ``PackedLinear`` stores a ``[out, in]`` weight in one of ``FORMATS`` and multiplies float32
activations ``x [..., in]`` by it with float32 accumulation, for M = rows of x in 1..16 (any M works).
``dequantized()`` / ``rows(idx)`` give the float32 weight the layer really multiplies by.

Why: at M = 1..9 a linear layer should cost one read of its weight (bytes / ~19.5 GB/s). The stock
kernels on this machine (Zen 3, AVX2+FMA, 2 vCPUs, torch 2.13 CPU) are far from that, so the layer
runs its own AVX2 kernel, built once with ``torch.utils.cpp_extension.load_inline`` (~35 s, cached
under ~/.cache/torch_extensions; needs g++ and ninja). Without a compiler it falls back to
``F.linear`` on the dequantized weight: correct, slow.

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
- Building this module's kernels together with ``mtpspec.fused``'s C++ changed GCC's inlining and
  left the micro-kernel's accumulators on the stack (M >= 4 fell from ~90 to ~33 GFLOP/s); the
  micro-kernel is now out of line with forced unrolling, so its code no longer depends on callers.

Formats: fp32; bf16 (round-to-nearest-even); int8 symmetric per output channel (fp32 scales);
int4 asymmetric per group of ``group_size`` inputs along K (fp16 scale + fp16 offset, 5 bits/weight
at group 32), which represents a GGUF Q4_K sub-block's affine grid up to fp16 rounding.

Must not: hold an unpacked copy of the weight, or need autograd (inference only).
"""
from __future__ import annotations

import functools
import hashlib
import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FORMATS = ("fp32", "bf16", "int8", "int4")

_CPP = r"""
#include <torch/extension.h>
#include <immintrin.h>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

// Packed weight: panels of 16 output channels, k-major inside a panel.
//   fp32 [P, K, 16] float | bf16 [P, K, 16] uint16 | int8 [P, K, 16] int8 (+ scale [P*16] float)
//   int4 [P, K, 8] bytes, byte j = q(ch j) | q(ch j+8) << 4 (+ [P, K/G, 2, 16] fp16: scale, offset)
enum { F32 = 0, BF16 = 1, I8 = 2, I4 = 3 };

struct Job {
  const float* x; int64_t M, K, N;
  const uint8_t* w; const void* s; int64_t G;
  float* y; int fmt; int64_t panels_per_chunk, npanels;
  int64_t n_base = 0;  // output channel n is written to column n - n_base of y
  int64_t m_out = -1;  // rows of y written (-1: all M; fewer when x was padded with a row)
};

template <int FMT>
static inline void load_w(const uint8_t* w, int64_t k, __m256& w0, __m256& w1, const float* sb) {
  if constexpr (FMT == F32) {
    const float* p = reinterpret_cast<const float*>(w) + k * 16;
    w0 = _mm256_loadu_ps(p); w1 = _mm256_loadu_ps(p + 8);
  } else if constexpr (FMT == BF16) {
    const uint16_t* p = reinterpret_cast<const uint16_t*>(w) + k * 16;
    // bf16 -> fp32: zero-extend to 32 bits, shift into the high half
    w0 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
    w1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8))), 16));
  } else if constexpr (FMT == I8) {
    const __m128i* a = reinterpret_cast<const __m128i*>(w + k * 16);
    w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(a)));
    w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + k * 16 + 8))));
  } else {
    __m256i e = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + k * 8)));
    __m256i lo = _mm256_and_si256(e, _mm256_set1_epi32(15));
    __m256i hi = _mm256_srli_epi32(e, 4);
    // scale/offset come from an L1 buffer as memory operands: no registers taken from the rows
    w0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), _mm256_load_ps(sb), _mm256_load_ps(sb + 16));
    w1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), _mm256_load_ps(sb + 8), _mm256_load_ps(sb + 24));
  }
}

// y[r, 16q : 16q+16] = sum_k x[r, k] * W[panel p+q][k, 0:16] for r < MR, q < NP.
// Every output element is one accumulator fed by one FMA per k, in k order, then (int8) scaled:
// the same operations in the same order whatever MR and NP are, so a row's result never depends
// on how many rows share the call. That makes speculative decoding exact on this path: a
// verification pass over k+1 tokens, a batch of sequences, a prefill chunk and a one-token decode
// step give each token bit-identical numbers, so greedy speculative output is plain greedy output
// even at near-ties (tests/test_ops.py). FMA latency is hidden by independent accumulators across
// rows and panels (MR x NP x 2 of them), never by splitting k, which would change the sums.
// Kept out of line with its loops fully unrolled, so that the accumulators stay in registers
// whatever the callers look like (inlined into a large caller, GCC kept them on the stack: 2.5x
// slower at MR >= 4).
#define MTP_UNROLL _Pragma("GCC unroll 16")
template <int FMT, int MR, int NP>
__attribute__((noinline)) static void micro(const Job& j, int64_t p, int64_t r0, float* out /*[MR, 64]*/) {
  const int64_t K = j.K;
  const float* x = j.x + r0 * K;
  const int64_t esize = FMT == F32 ? 64 : FMT == BF16 ? 32 : FMT == I8 ? 16 : 8;
  const uint8_t* w[NP];
  MTP_UNROLL for (int q = 0; q < NP; ++q) w[q] = j.w + (p + q) * K * esize;
  __m256 acc[NP][MR][2];
  MTP_UNROLL for (int q = 0; q < NP; ++q)
    MTP_UNROLL for (int r = 0; r < MR; ++r) acc[q][r][0] = acc[q][r][1] = _mm256_setzero_ps();
  const int64_t G = FMT == I4 ? j.G : K;
  const int64_t ng = (K + G - 1) / G;
  for (int64_t g = 0; g < ng; ++g) {
    alignas(32) float sb[NP][32];  // int4: each panel's group scales (16) then offsets (16), fp32
    if constexpr (FMT == I4) {
      MTP_UNROLL for (int q = 0; q < NP; ++q) {
        const __m128i* s = reinterpret_cast<const __m128i*>(reinterpret_cast<const uint16_t*>(j.s) + ((p + q) * ng + g) * 32);
        for (int i = 0; i < 4; ++i) _mm256_store_ps(sb[q] + 8 * i, _mm256_cvtph_ps(_mm_loadu_si128(s + i)));
      }
    }
    const int64_t k1 = std::min(K, (g + 1) * G);
    for (int64_t k = g * G; k < k1; ++k) {
      MTP_UNROLL for (int q = 0; q < NP; ++q) {
        __m256 w0, w1;
        load_w<FMT>(w[q], k, w0, w1, sb[q]);
        MTP_UNROLL for (int r = 0; r < MR; ++r) {
          const __m256 xb = _mm256_broadcast_ss(x + r * K + k);
          acc[q][r][0] = _mm256_fmadd_ps(xb, w0, acc[q][r][0]);
          acc[q][r][1] = _mm256_fmadd_ps(xb, w1, acc[q][r][1]);
        }
      }
    }
  }
  MTP_UNROLL for (int q = 0; q < NP; ++q) {
    __m256 sc0 = _mm256_set1_ps(1.f), sc1 = sc0;
    if constexpr (FMT == I8) {
      const float* sc = reinterpret_cast<const float*>(j.s) + (p + q) * 16;
      sc0 = _mm256_loadu_ps(sc); sc1 = _mm256_loadu_ps(sc + 8);
    }
    MTP_UNROLL for (int r = 0; r < MR; ++r) {
      __m256 a0 = acc[q][r][0], a1 = acc[q][r][1];
      if constexpr (FMT == I8) { a0 = _mm256_mul_ps(a0, sc0); a1 = _mm256_mul_ps(a1, sc1); }
      _mm256_storeu_ps(out + r * 64 + q * 16, a0); _mm256_storeu_ps(out + r * 64 + q * 16 + 8, a1);
    }
  }
}

// rows x np panels from panel p; np is the number of panels handled at once (1 for a remainder)
template <int FMT>
static int block(const Job& j, int64_t p, int64_t r0, int rows, int64_t left, float* out) {
  switch (rows) {  // 6-12 independent accumulators (more spill at 3 rows x 2 panels: measured)
    case 1: if (left >= 4) { micro<FMT, 1, 4>(j, p, r0, out); return 4; } break;
    case 2: if (left >= 2) { micro<FMT, 2, 2>(j, p, r0, out); return 2; } break;
    case 3: micro<FMT, 3, 1>(j, p, r0, out); return 1;
    case 4: micro<FMT, 4, 1>(j, p, r0, out); return 1;
    case 5: micro<FMT, 5, 1>(j, p, r0, out); return 1;
    default: micro<FMT, 6, 1>(j, p, r0, out); return 1;
  }
  if (rows == 1) micro<FMT, 1, 1>(j, p, r0, out);  // fewer panels left than a group
  else micro<FMT, 2, 1>(j, p, r0, out);
  return 1;
}

// panels [p0, p1) of the job; output channel n of row r goes to y[r * N + n]. Up to 4 panels
// (the weights one row block reads) at a time; every row block reuses them from cache.
template <int FMT>
static void run_panels(const Job& j, int64_t p0, int64_t p1) {
  const int max_rows = 6;
  const int64_t nblocks = (j.M + max_rows - 1) / max_rows;
  alignas(32) float out[6 * 64];
  for (int64_t pg = p0; pg < p1; pg += 4) {
    const int64_t pe = std::min(p1, pg + 4);
    int64_t r0 = 0;
    for (int64_t b = 0; b < nblocks; ++b) {
      // spread rows evenly over blocks: 8 -> 4+4, 9 -> 5+4, 16 -> 6+5+5
      const int rows = (int)((j.M - r0) / (nblocks - b) + ((j.M - r0) % (nblocks - b) ? 1 : 0));
      for (int64_t p = pg; p < pe;) {
        const int np = block<FMT>(j, p, r0, rows, pe - p, out);
        const int keep = j.m_out < 0 ? rows : (int)std::min<int64_t>(rows, j.m_out - r0);
        for (int q = 0; q < np; ++q) {
          const int64_t n0 = (p + q) * 16, nv = std::min<int64_t>(16, j.N - n0);
          for (int r = 0; r < keep; ++r)
            std::memcpy(j.y + (r0 + r) * j.N + n0 - j.n_base, out + r * 64 + q * 16, nv * sizeof(float));
        }
        p += np;
      }
      r0 += rows;
    }
  }
}

static void run_panels_any(const Job& j, int64_t p0, int64_t p1) {
  switch (j.fmt) {
    case F32: run_panels<F32>(j, p0, p1); break;
    case BF16: run_panels<BF16>(j, p0, p1); break;
    case I8: run_panels<I8>(j, p0, p1); break;
    default: run_panels<I4>(j, p0, p1); break;
  }
}

static void run_chunk_any(const void* ctx, int64_t c) {
  const Job& j = *static_cast<const Job*>(ctx);
  const int64_t p0 = c * j.panels_per_chunk;
  run_panels_any(j, p0, std::min(j.npanels, p0 + j.panels_per_chunk));
}

// ---- a tiny pool: helpers claim chunks from a shared ticket; the caller never waits for a helper
// that has not started a chunk, so a helper descheduled by another process costs nothing.
// A job is any task function over chunk indices 0..n-1 (a matrix product, attention, ...).
namespace pool {
typedef void (*TaskFn)(const void* ctx, int64_t chunk);
constexpr uint64_t kMask = (1ull << 20) - 1;
static TaskFn task_fn = nullptr;
static const void* task_ctx = nullptr;
static std::atomic<uint64_t> ticket{0};  // gen << 40 | n << 20 | next
static std::atomic<int64_t> done{0};
// leaked on purpose: detached helpers may still wait on them during static destruction at exit
static std::mutex& mu = *new std::mutex;
static std::mutex& call_mu = *new std::mutex;
static std::condition_variable& cv = *new std::condition_variable;
static int64_t nhelpers_started = 0;
static std::atomic<bool> stop{false};
static std::atomic<int64_t> spin_us{200};
static uint64_t gen = 0;
// stall back-off: when the caller has to wait long for a chunk a helper claimed (the helper was
// descheduled: another process holds its core), jobs run on the caller alone for a while
static std::atomic<int64_t> backoff_ms{50};
static int64_t solo_until_ns = 0;

static inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
      std::chrono::steady_clock::now().time_since_epoch()).count();
}

enum { NONE_LEFT = 0, RAN = 1, RETRY = 2 };
static int try_one() {
  uint64_t t = ticket.load(std::memory_order_acquire);
  const uint64_t n = (t >> 20) & kMask, i = t & kMask;
  if (i >= n) return NONE_LEFT;
  if (!ticket.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel)) return RETRY;
  task_fn(task_ctx, (int64_t)i);
  done.fetch_add(1, std::memory_order_release);
  return RAN;
}

static void helper_loop() {
  using clk = std::chrono::steady_clock;
  auto idle_since = clk::now();
  int polls = 0;
  while (!stop.load(std::memory_order_relaxed)) {
    if (try_one()) { idle_since = clk::now(); continue; }
    _mm_pause();
    if (++polls < 256) continue;
    polls = 0;
    if (clk::now() - idle_since < std::chrono::microseconds(spin_us.load(std::memory_order_relaxed))) continue;
    uint64_t seen = ticket.load(std::memory_order_acquire);
    std::unique_lock<std::mutex> lk(mu);
    cv.wait(lk, [&] {
      uint64_t t = ticket.load(std::memory_order_acquire);
      return stop.load() || (t != seen && (t & kMask) < ((t >> 20) & kMask));
    });
    idle_since = clk::now();
  }
}

static void ensure(int64_t nhelpers) {
  for (; nhelpers_started < nhelpers; ++nhelpers_started) std::thread(helper_loop).detach();
}

static void run(TaskFn fn, const void* ctx, int64_t nchunks, int64_t threads) {
  std::unique_lock<std::mutex> call_lk(call_mu, std::defer_lock);
  if (threads > 1 && nchunks > 1) {
    call_lk.lock();
    if (backoff_ms.load(std::memory_order_relaxed) > 0 && now_ns() < solo_until_ns) call_lk.unlock();
  }
  if (!call_lk.owns_lock()) {
    for (int64_t c = 0; c < nchunks; ++c) fn(ctx, c);
    return;
  }
  ensure(threads - 1);
  task_fn = fn;
  task_ctx = ctx;
  done.store(0, std::memory_order_relaxed);
  gen = (gen + 1) & ((1ull << 24) - 1);
  ticket.store(gen << 40 | (uint64_t)nchunks << 20, std::memory_order_release);
  { std::lock_guard<std::mutex> lk(mu); }
  cv.notify_all();
  const int64_t t0 = now_ns();
  int64_t mine = 0;
  for (int r; (r = try_one()) != NONE_LEFT;) mine += r == RAN;
  const int64_t t1 = now_ns();
  while (done.load(std::memory_order_acquire) < nchunks) _mm_pause();
  const int64_t waited = now_ns() - t1, per_chunk = (t1 - t0) / std::max<int64_t>(mine, 1);
  if (waited > std::max<int64_t>(200000, 8 * per_chunk))
    solo_until_ns = now_ns() + backoff_ms.load(std::memory_order_relaxed) * 1000000;
}
}  // namespace pool

// f(i) for i in [0, n), spread over the pool (f must not call the pool itself)
template <class F>
static void parallel_for(int64_t n, int64_t threads, const F& f) {
  pool::run([](const void* c, int64_t i) { (*static_cast<const F*>(c))(i); }, &f, n, threads);
}

// y [M, N] = x [M, K] @ W.T for a packed weight (raw pointers; what packed_linear and the fused
// layers share)
struct PackedRef {
  const uint8_t* w; const void* s; int fmt; int64_t N, K, G;
};

static void packed_matmul(const PackedRef& p, const float* x, int64_t M, float* y, int64_t threads,
                          int64_t chunk_bytes) {
  if (M == 0) return;
  const int64_t npanels = (p.N + 15) / 16;
  const int64_t esize = p.fmt == F32 ? 64 : p.fmt == BF16 ? 32 : p.fmt == I8 ? 16 : 8;
  // whole groups of 4 panels per chunk: one-row products run 4 panels at a time (see micro)
  int64_t ppc = (std::max<int64_t>(1, chunk_bytes / (p.K * esize)) + 3) / 4 * 4;
  int64_t nchunks = (npanels + ppc - 1) / ppc;
  if (nchunks > (int64_t)pool::kMask) { ppc = (npanels + pool::kMask - 1) / pool::kMask; nchunks = (npanels + ppc - 1) / ppc; }
  // a block of 3 rows is slow (6 accumulators leave FMA latency exposed; 12 spill): run 3 and
  // 7 rows as 4 and 8 with a zero row, whose results are dropped (rows never mix: same numbers)
  std::vector<float> padded;
  int64_t rows = M;
  if (M == 3 || M == 7) {
    padded.assign(x, x + M * p.K);
    padded.resize((M + 1) * p.K, 0.f);
    x = padded.data();
    rows = M + 1;
  }
  Job j{x, rows, p.K, p.N, p.w, p.s, p.G, y, p.fmt, ppc, npanels};
  j.m_out = M;
  pool::run(run_chunk_any, &j, nchunks, threads);
}

static PackedRef packed_ref(const torch::Tensor& w, const torch::Tensor& s, int64_t fmt, int64_t N,
                            int64_t K, int64_t G) {
  TORCH_CHECK(w.is_contiguous() && w.device().is_cpu(), "packed weight must be a contiguous CPU tensor");
  return PackedRef{(const uint8_t*)w.data_ptr(), s.numel() ? s.data_ptr() : nullptr, (int)fmt, N, K, G};
}

// row n of a packed weight, dequantized exactly as PackedLinear.rows does (no FMA contraction)
static void packed_row(const PackedRef& p, int64_t n, float* out) {
  const int64_t panel = n / 16, lane = n % 16, K = p.K;
  if (p.fmt == F32) {
    const float* w = reinterpret_cast<const float*>(p.w) + panel * K * 16 + lane;
    for (int64_t k = 0; k < K; ++k) out[k] = w[k * 16];
  } else if (p.fmt == BF16) {
    const uint16_t* w = reinterpret_cast<const uint16_t*>(p.w) + panel * K * 16 + lane;
    for (int64_t k = 0; k < K; ++k) { uint32_t b = (uint32_t)w[k * 16] << 16; std::memcpy(out + k, &b, 4); }
  } else if (p.fmt == I8) {
    const int8_t* w = reinterpret_cast<const int8_t*>(p.w) + panel * K * 16 + lane;
    const float sc = reinterpret_cast<const float*>(p.s)[n];
    for (int64_t k = 0; k < K; ++k) out[k] = (float)w[k * 16] * sc;
  } else {
    const uint8_t* w = p.w + panel * K * 8 + (lane % 8);
    const int shift = lane < 8 ? 0 : 4;
    const int64_t ng = (K + p.G - 1) / p.G;
    const uint16_t* sb = reinterpret_cast<const uint16_t*>(p.s) + panel * ng * 32;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t g = k / p.G;
      const float s = _cvtsh_ss(sb[g * 32 + lane]), b = _cvtsh_ss(sb[g * 32 + 16 + lane]);
      const float q = (float)((w[k * 8] >> shift) & 15);
      const float qs = q * s;
      out[k] = qs + b;
    }
  }
}

torch::Tensor packed_rows(torch::Tensor idx, torch::Tensor w, torch::Tensor s, int64_t fmt, int64_t N,
                          int64_t K, int64_t G) {
  TORCH_CHECK(idx.scalar_type() == torch::kLong && idx.is_contiguous());
  const PackedRef p = packed_ref(w, s, fmt, N, K, G);
  const int64_t L = idx.numel();
  auto out = torch::empty({L, K}, torch::kFloat);
  const int64_t* ids = idx.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  for (int64_t i = 0; i < L; ++i) {
    TORCH_CHECK(ids[i] >= 0 && ids[i] < N, "row index out of range");
    packed_row(p, ids[i], o + i * K);
  }
  return out;
}

torch::Tensor packed_linear(torch::Tensor x, torch::Tensor w, torch::Tensor s, int64_t fmt,
                            int64_t N, int64_t G, int64_t threads, int64_t chunk_bytes) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous());
  const int64_t M = x.size(0), K = x.size(1);
  auto y = torch::empty({M, N}, x.options());
  packed_matmul(packed_ref(w, s, fmt, N, K, G), x.data_ptr<float>(), M, y.data_ptr<float>(), threads,
                chunk_bytes);
  return y;
}

void set_spin_us(int64_t us) { pool::spin_us.store(us); }
void set_backoff_ms(int64_t ms) { pool::backoff_ms.store(ms); }
"""

# Python bindings; the fused layers (mtpspec.fused) add theirs through register_fused when built
_BINDINGS = r"""
#ifdef MTPSPEC_WITH_FUSED
void register_fused(pybind11::module_& m);
#endif
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("packed_linear", &packed_linear);
  m.def("packed_rows", &packed_rows);
  m.def("set_spin_us", &set_spin_us);
  m.def("set_backoff_ms", &set_backoff_ms);
#ifdef MTPSPEC_WITH_FUSED
  register_fused(m);
  m.def("screen_argmax", &screen::screen_argmax);
#endif
}
"""


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


@functools.lru_cache(maxsize=None)
def _extension():
    """Build (or load the cached build of) the AVX2 kernels; None if that is not possible.

    One extension holds these kernels and the fused decoder layers of ``mtpspec.fused`` (so they
    share one thread pool); if the fused part does not build, the plain kernels are built alone."""
    flags = ["-O3", "-mavx2", "-mfma", "-mf16c", "-std=c++17", "-ffp-contract=off"]
    try:
        from torch.utils.cpp_extension import load_inline

        from mtpspec.fused_kernels import CPP as fused_cpp
        from mtpspec.screen import CPP as screen_cpp

        sources = [_CPP, screen_cpp, fused_cpp, _BINDINGS]
        return load_inline(name=_build_name("mtpspec_ops", sources), cpp_sources=sources,
                           extra_cflags=[*flags, "-DMTPSPEC_WITH_FUSED"])
    except (RuntimeError, OSError, ImportError) as err:  # no compiler / ninja / AVX2 toolchain
        warnings.warn(f"mtpspec.ops: fused layers unavailable ({err}); using the Python layers")
    try:
        from torch.utils.cpp_extension import load_inline

        sources = [_CPP, _BINDINGS]
        return load_inline(name=_build_name("mtpspec_ops_plain", sources), cpp_sources=sources,
                           extra_cflags=flags)
    except (RuntimeError, OSError, ImportError) as err:
        warnings.warn(f"mtpspec.ops: AVX2 kernels unavailable ({err}); using F.linear fallback")
        return None


def _build_name(stem: str, sources: list[str]) -> str:
    """One build folder per source version: checkouts of different versions (worktrees, installed
    copies) then share ~/.cache/torch_extensions without rebuilding over each other."""
    digest = hashlib.sha256("".join(sources).encode()).hexdigest()[:12]
    return f"{stem}_{digest}"


def fused_extension():
    """The extension if it holds the fused layers (``mtpspec.fused``), else None."""
    ext = _extension()
    return ext if ext is not None and hasattr(ext, "Gemma3Stack") else None


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

    def kernel_spec(self) -> tuple[Tensor, Tensor, int, int, int, int]:
        """What the C++ layers of ``mtpspec.fused`` take: (packed, scales, format code, out, in,
        group size)."""
        return (self.packed, self.scales, _FMT_CODE[self.fmt], self.out_features, self.in_features,
                self.group_size)

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
            y = ext.packed_linear(x2, self.packed, self.scales, _FMT_CODE[self.fmt],
                                  self.out_features, self.group_size, _THREADS, _CHUNK_BYTES)
        return y.reshape(*lead, self.out_features)

    @torch.no_grad()
    def rows(self, idx: Tensor) -> Tensor:  # [L] int -> [L, in] f32, dequantized rows of W
        idx = idx.to(torch.long).reshape(-1)
        ext = _extension()
        if ext is not None and idx.device.type == "cpu" and self.packed.device.type == "cpu":
            return ext.packed_rows(idx.contiguous(), self.packed, self.scales, _FMT_CODE[self.fmt],
                                   self.out_features, self.in_features, self.group_size)
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
