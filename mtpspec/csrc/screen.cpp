// The argmax screen of screen.h (design, bound and proof: mtpspec/screen.py).
#include "screen.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "thread_pool.h"

namespace mtp {
namespace screen {
namespace {


// One half panel (8 tokens) for MR rows: approx[r][t] = scale[t] * sum_g sc[r][g] * (sum_k u[t][k] a[r][k] - corr[r][g])
// and lo[r] = max(lo[r], approx - beta[t] * radius[r]).  u: [Kp/4][8][4] uint8 (q + 128);
// a: [MR][Kp] int8; corr, sc: [MR][ng]. The k loop is not unrolled on purpose: unrolled, GCC
// turned the accumulator chains into an addition tree and spilled it.
template <int MR>
__attribute__((noinline)) void micro(const uint8_t* __restrict u, const int8_t* __restrict a, int64_t Kp,
                                            const int32_t* corr, const float* sc, int64_t ng,
                                            const float* scale, const float* beta, const float* radius,
                                            float* approx, int64_t ntok, __m256* lo) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 facc[MR];
  MTP_UNROLL for (int r = 0; r < MR; ++r) facc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    __m256i acc[MR];
    MTP_UNROLL for (int r = 0; r < MR; ++r) acc[r] = _mm256_setzero_si256();
#pragma GCC unroll 1
    for (int64_t k4 = g * 8; k4 < g * 8 + 8; ++k4) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(u + k4 * 32));
      MTP_UNROLL for (int r = 0; r < MR; ++r) {
        int32_t quad;
        std::memcpy(&quad, a + r * Kp + k4 * 4, 4);
        const __m256i p16 = _mm256_maddubs_epi16(wv, _mm256_set1_epi32(quad));
        acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(p16, ones));
      }
    }
    MTP_UNROLL for (int r = 0; r < MR; ++r) {
      const __m256i v = _mm256_sub_epi32(acc[r], _mm256_set1_epi32(corr[r * ng + g]));
      facc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), _mm256_set1_ps(sc[r * ng + g]), facc[r]);
    }
  }
  const __m256 s = _mm256_loadu_ps(scale), b = _mm256_loadu_ps(beta);
  MTP_UNROLL for (int r = 0; r < MR; ++r) {
    const __m256 v = _mm256_mul_ps(facc[r], s);
    _mm256_storeu_ps(approx + r * ntok, v);
    lo[r] = _mm256_max_ps(lo[r], _mm256_fnmadd_ps(b, _mm256_set1_ps(radius[r]), v));
  }
}

}  // namespace

// See the bound in mtpspec/screen.py: R = (||e|| * 1.001 + (g(K+1) + g(ng+1) + 3u) * (||x|| + ||e||)
// + (K + ng) * 2^-149) / (1 - 4u), rounded up, with g(n) = n u / (1 - n u) and u = 2^-24.
void quantize_rows(const float* xp, int64_t M, int64_t K, int64_t Kp, int8_t* a, int32_t* corr,
                   float* sc, float* radius) {
  const int64_t ng = Kp / 32;
  const double u = std::ldexp(1.0, -24);
  auto gamma = [u](int64_t n) { return (double)n * u / (1.0 - (double)n * u); };
  const double rel = gamma(K + 1) + gamma(ng + 1) + 3.0 * u;
  const double tiny = (double)(K + ng) * std::ldexp(1.0, -149);
  std::fill(a, a + M * Kp, 0);
  for (int64_t r = 0; r < M; ++r) {
    double err2 = 0.0, norm2 = 0.0;
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t k0 = g * 32, k1 = std::min(K, k0 + 32);
      float amax = 0.f;
      for (int64_t k = k0; k < k1; ++k) amax = std::max(amax, std::fabs(xp[r * K + k]));
      const float scl = amax > 0.f ? amax / 63.f : 1.f;
      int32_t sum = 0;
      for (int64_t k = k0; k < k1; ++k) {
        const double v = xp[r * K + k];
        const int q = (int)std::max(-63.0, std::min(63.0, std::nearbyint(v / scl)));
        a[r * Kp + k] = (int8_t)q;
        sum += q;
        const double e = v - (double)q * (double)scl;
        err2 += e * e;
        norm2 += v * v;
      }
      corr[r * ng + g] = 128 * sum;
      sc[r * ng + g] = scl;
    }
    const double en = std::sqrt(err2), xn = std::sqrt(norm2);
    const double R = (en * 1.001 + rel * (xn + en) + tiny) / (1.0 - 4.0 * u);
    radius[r] = (float)std::max(1e-30, R * (1.0 + 1e-6));
  }
}

namespace {

struct Job {
  const uint8_t* u; const float* scale; const float* beta;
  const int8_t* a; const int32_t* corr; const float* sc; const float* radius;
  int64_t M, Kp, ng, ntok, ppc, npanels;
  float* approx;   // [M, ntok]
  float* lo_max;   // [nchunks, M]
};

template <int MR>
void rows_block(const Job& j, int64_t p, int64_t r0, __m256* lo) {
  for (int half = 0; half < 2; ++half) {
    const int64_t t0 = p * 16 + half * 8;
    micro<MR>(j.u + (p * 2 + half) * (j.Kp / 4) * 32, j.a + r0 * j.Kp, j.Kp, j.corr + r0 * j.ng,
              j.sc + r0 * j.ng, j.ng, j.scale + t0, j.beta + t0, j.radius + r0,
              j.approx + r0 * j.ntok + t0, j.ntok, lo + r0);
  }
}

void run_chunk(const void* ctx, int64_t c) {
  const Job& j = *static_cast<const Job*>(ctx);
  const int64_t p0 = c * j.ppc, p1 = std::min(j.npanels, p0 + j.ppc);
  __m256 lo[64];
  for (int64_t r = 0; r < j.M; ++r) lo[r] = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t p = p0; p < p1; ++p) {
    for (int64_t r0 = 0; r0 < j.M;) {
      const int64_t left = j.M - r0;
      const int rows = left >= 8 || left == 4 ? 4 : left == 7 || left == 3 ? 3 : left >= 2 ? 2 : 1;
      switch (rows) {
        case 4: rows_block<4>(j, p, r0, lo); break;
        case 3: rows_block<3>(j, p, r0, lo); break;
        case 2: rows_block<2>(j, p, r0, lo); break;
        default: rows_block<1>(j, p, r0, lo); break;
      }
      r0 += rows;
    }
  }
  for (int64_t r = 0; r < j.M; ++r) {
    alignas(32) float v[8];
    _mm256_store_ps(v, lo[r]);
    j.lo_max[c * j.M + r] = *std::max_element(v, v + 8);
  }
}

}  // namespace

void panel_estimates(const Copy& c, const int8_t* a, const int32_t* corr, const float* sc,
                     const float* radius, int64_t p, float* out) {
  __m256 lo = _mm256_setzero_ps();
  const int64_t Kp = c.Kp;
  for (int half = 0; half < 2; ++half)
    micro<1>(c.u + (p * 2 + half) * (Kp / 4) * 32, a, Kp, corr, sc, Kp / 32, c.scale + p * 16 + half * 8,
             c.beta + p * 16 + half * 8, radius, out + half * 8, 0, &lo);
}

namespace {

// candidates: tokens whose upper bound reaches their row's largest lower bound, found over
// equal slices of (row, tokens) so that the pool's threads share the scan evenly
struct Scan {
  const Job* job; const float* T; const int64_t* ord; int64_t N, slices;
  std::vector<int64_t>* found;  // [M * slices] token ids
};

void scan_slice(const void* ctx, int64_t task) {
  const Scan& c = *static_cast<const Scan*>(ctx);
  const Job& j = *c.job;
  const int64_t r = task / c.slices, slice = task % c.slices;
  const int64_t per = (j.ntok / 8 + c.slices - 1) / c.slices * 8;
  const int64_t t1 = std::min(j.ntok, (slice + 1) * per);
  const float* v = j.approx + r * j.ntok;
  const __m256 R = _mm256_set1_ps(j.radius[r]), T = _mm256_set1_ps(c.T[r]);
  std::vector<int64_t>& out = c.found[task];
  out.clear();
  for (int64_t t0 = slice * per; t0 < t1; t0 += 8) {
    const __m256 hi = _mm256_fmadd_ps(_mm256_loadu_ps(j.beta + t0), R, _mm256_loadu_ps(v + t0));
    int mask = _mm256_movemask_ps(_mm256_cmp_ps(hi, T, _CMP_GE_OQ));
    while (mask) {
      const int64_t t = t0 + __builtin_ctz(mask);
      mask &= mask - 1;
      const int64_t id = c.ord ? c.ord[t] : t;
      if (id >= 0 && id < c.N) out.push_back(id);  // else a padding row
    }
  }
}
}  // namespace

void argmax(const Copy& cp, const PackedRef& head, const int64_t* order, const float* xp, int64_t M,
            int64_t K, int64_t threads, int64_t chunk_bytes, int64_t* tp, int64_t* counts) {
  const int64_t Kp = cp.Kp, ng = Kp / 32, npanels = cp.npanels, ntok = npanels * 16;
  // 1. activations: per row and group of 32, scale = max|x| / 63, a = round(x / scale)
  std::vector<int8_t> a(M * Kp, 0);
  std::vector<int32_t> corr(M * ng, 0);
  std::vector<float> sc(M * ng, 0.f), radius(M, 0.f);
  quantize_rows(xp, M, K, Kp, a.data(), corr.data(), sc.data(), radius.data());

  // 2. every token's estimate, and the largest lower bound per row and chunk
  const int64_t ppc = std::max<int64_t>(1, chunk_bytes / (Kp * 16));
  const int64_t nchunks = (npanels + ppc - 1) / ppc;
  thread_local std::vector<float> approx;  // reused: a fresh buffer would page-fault on every call
  if ((int64_t)approx.size() < M * ntok) approx.resize(M * ntok);
  std::vector<float> lo_max(nchunks * M);
  Job j{cp.u, cp.scale, cp.beta, a.data(), corr.data(), sc.data(), radius.data(), M, Kp, ng, ntok, ppc,
        npanels, approx.data(), lo_max.data()};
  pool::run(run_chunk, &j, nchunks, threads);

  // 3. per row: the threshold (less 2^-140: the absolute rounding of results below 2^-126, see the
  // proof), candidates, their exact logits
  std::vector<float> T(M, -std::numeric_limits<float>::infinity());
  for (int64_t c = 0; c < nchunks; ++c)
    for (int64_t r = 0; r < M; ++r) T[r] = std::max(T[r], lo_max[c * M + r]);
  for (int64_t r = 0; r < M; ++r) T[r] = T[r] - 0x1p-140f;
  const int64_t slices = 16;
  std::vector<std::vector<int64_t>> found(M * slices);
  Scan scan{&j, T.data(), order, head.N, slices, found.data()};
  pool::run(scan_slice, &scan, M * slices, threads);
  // exact logits of the candidates' panels, by the full product's own kernel; the best of them
  // (first token id on ties) is the argmax: every other token is strictly below it
  alignas(32) float out[16];
  std::vector<int64_t> panels;
  for (int64_t r = 0; r < M; ++r) {
    panels.clear();
    for (int64_t slice = 0; slice < slices; ++slice)
      for (int64_t id : found[r * slices + slice]) panels.push_back(id / 16);
    counts[r] = (int64_t)panels.size();
    std::sort(panels.begin(), panels.end());
    panels.erase(std::unique(panels.begin(), panels.end()), panels.end());
    float best = -std::numeric_limits<float>::infinity();
    int64_t arg = -1;
    for (int64_t p : panels) {  // ascending token ids
      packed_panels(head, xp + r * K, p, p + 1, out, p * 16);
      for (int64_t lane = 0; lane < 16 && p * 16 + lane < head.N; ++lane)
        if (out[lane] > best || arg < 0) { best = out[lane]; arg = p * 16 + lane; }
    }
    tp[r] = arg;
  }
}

}  // namespace screen
}  // namespace mtp
