// Products with packed weights for small row counts: the micro-kernel and its drivers.
//
// The weight is streamed once in panels of 16 output channels; each panel is multiplied against
// blocks of up to 6 rows held in 8-12 AVX2 accumulators, dequantizing in registers (bf16: shift;
// int8: sign-extend + convert, per-channel scale at the end; int4: nibble unpack + one FMA with
// the group's fp16 scale/offset). Measurements and the formats' definitions: mtpspec/ops.py.
#include "packed.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "thread_pool.h"

namespace mtp {
namespace {

struct Job {
  const float* x; int64_t M, K, N;
  const uint8_t* w; const void* s; int64_t G;
  float* y; int fmt; int64_t panels_per_chunk, npanels;
  int64_t n_base = 0;  // output channel n is written to column n - n_base of y
  int64_t m_out = -1;  // rows of y written (-1: all M; fewer when x was padded with a row)
};

template <int FMT>
inline void load_w(const uint8_t* w, int64_t k, __m256& w0, __m256& w1, const float* sb) {
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
template <int FMT, int MR, int NP>
__attribute__((noinline)) void micro(const Job& j, int64_t p, int64_t r0, float* out /*[MR, 64]*/) {
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
int block(const Job& j, int64_t p, int64_t r0, int rows, int64_t left, float* out) {
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
void run_panels(const Job& j, int64_t p0, int64_t p1) {
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

void run_panels_any(const Job& j, int64_t p0, int64_t p1) {
  switch (j.fmt) {
    case F32: run_panels<F32>(j, p0, p1); break;
    case BF16: run_panels<BF16>(j, p0, p1); break;
    case I8: run_panels<I8>(j, p0, p1); break;
    default: run_panels<I4>(j, p0, p1); break;
  }
}

void run_chunk_any(const void* ctx, int64_t c) {
  const Job& j = *static_cast<const Job*>(ctx);
  const int64_t p0 = c * j.panels_per_chunk;
  run_panels_any(j, p0, std::min(j.npanels, p0 + j.panels_per_chunk));
}

}  // namespace

void packed_matmul(const PackedRef& p, const float* x, int64_t M, float* y, int64_t threads,
                          int64_t chunk_bytes) {
  if (M == 0) return;
  const int64_t npanels = (p.N + 15) / 16;
  const int64_t esize = p.fmt == F32 ? 64 : p.fmt == BF16 ? 32 : p.fmt == I8 ? 16 : 8;
  // whole groups of 4 panels per chunk: one-row products run 4 panels at a time (see micro)
  int64_t ppc = (std::max<int64_t>(1, chunk_bytes / (p.K * esize)) + 3) / 4 * 4;
  int64_t nchunks = (npanels + ppc - 1) / ppc;
  if (nchunks > (int64_t)pool::kMaxChunks) { ppc = (npanels + pool::kMaxChunks - 1) / pool::kMaxChunks; nchunks = (npanels + ppc - 1) / ppc; }
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

void packed_panels(const PackedRef& p, const float* x, int64_t p0, int64_t p1, float* y, int64_t n_base) {
  Job j{x, 1, p.K, p.N, p.w, p.s, p.G, y, p.fmt, p1 - p0, (p.N + 15) / 16, n_base};
  run_panels_any(j, p0, p1);
}

void packed_row(const PackedRef& p, int64_t n, float* out) {
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

}  // namespace mtp
