// The attention of attention.h.
#include "attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

#include "thread_pool.h"
#include "vec.h"

namespace mtp {
namespace {

constexpr int64_t kBlock = 128;   // key slots per attention block (absolute slot multiples)

template <int NK>
inline void dots(const float* q, const float* k, int64_t ld, int64_t d, float* out) {
  __m256 a0[NK], a1[NK];
  for (int i = 0; i < NK; ++i) a0[i] = a1[i] = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= d; j += 16) {
    const __m256 q0 = _mm256_loadu_ps(q + j), q1 = _mm256_loadu_ps(q + j + 8);
    for (int i = 0; i < NK; ++i) {
      a0[i] = _mm256_fmadd_ps(q0, _mm256_loadu_ps(k + i * ld + j), a0[i]);
      a1[i] = _mm256_fmadd_ps(q1, _mm256_loadu_ps(k + i * ld + j + 8), a1[i]);
    }
  }
  for (; j < d; j += 8) {
    const __m256 q0 = _mm256_loadu_ps(q + j);
    for (int i = 0; i < NK; ++i) a0[i] = _mm256_fmadd_ps(q0, _mm256_loadu_ps(k + i * ld + j), a0[i]);
  }
  for (int i = 0; i < NK; ++i) out[i] = hsum8(_mm256_add_ps(a0[i], a1[i]));
}

// A work item: query rows [r0, r1) of one sequence (a tile), kv head g, key slots [s0, s1),
// taken kBlock slots at a time. Each 4-slot group of keys is loaded once into L1 for all rows x
// heads of the tile, and a block stays in L2 for the weighted sum of its values.
struct AttnItem { int64_t r0, r1, g, s0, s1; };

// o[0:d] = o[0:d] * alpha + sum_s p[s] * v[s, 0:d] (o is not read when alpha == 0)
template <int NR>
inline void weighted_rows(const float* p, const float* v, int64_t n, int64_t ld, float alpha, float* out) {
  __m256 acc[NR];
  const __m256 al = _mm256_set1_ps(alpha);
  for (int i = 0; i < NR; ++i) acc[i] = alpha == 0.f ? _mm256_setzero_ps() : _mm256_mul_ps(_mm256_loadu_ps(out + 8 * i), al);
  for (int64_t s = 0; s < n; ++s) {
    const __m256 ps = _mm256_broadcast_ss(p + s);
    for (int i = 0; i < NR; ++i) acc[i] = _mm256_fmadd_ps(ps, _mm256_loadu_ps(v + s * ld + 8 * i), acc[i]);
  }
  for (int i = 0; i < NR; ++i) _mm256_storeu_ps(out + 8 * i, acc[i]);
}

void weighted_sum(const float* p, const float* v, int64_t n, int64_t d, float alpha, float* out) {
  for (int64_t j = 0; j < d; j += 64) {
    switch (std::min<int64_t>(8, (d - j) / 8)) {
      case 8: weighted_rows<8>(p, v + j, n, d, alpha, out + j); break;
      case 7: weighted_rows<7>(p, v + j, n, d, alpha, out + j); break;
      case 6: weighted_rows<6>(p, v + j, n, d, alpha, out + j); break;
      case 5: weighted_rows<5>(p, v + j, n, d, alpha, out + j); break;
      case 4: weighted_rows<4>(p, v + j, n, d, alpha, out + j); break;
      case 3: weighted_rows<3>(p, v + j, n, d, alpha, out + j); break;
      case 2: weighted_rows<2>(p, v + j, n, d, alpha, out + j); break;
      default: weighted_rows<1>(p, v + j, n, d, alpha, out + j); break;
    }
  }
}

// per (row, head) of the item, online over its blocks: unnormalized output [Dh], max, sum
// (sum 0: the row sees no slot of the item)
void attend_item(const Attention& a, const AttnItem& it, float* part, float* sc /*[rows*group, kBlock]*/) {
  const int64_t group = a.H / a.kvh, d = a.Dh, rows = it.r1 - it.r0;
  for (int64_t q = 0; q < rows * group; ++q) {
    part[q * (d + 2) + d] = -std::numeric_limits<float>::infinity();
    part[q * (d + 2) + d + 1] = 0.f;
  }
  const float* kseq = a.kc + (a.rowb[it.r0] * a.kvh + it.g) * a.S * d;
  const float* vseq = a.vc + (a.rowb[it.r0] * a.kvh + it.g) * a.S * d;
  // blocks at absolute slot multiples of kBlock: a row's blocks never depend on its tile
  for (int64_t b0 = it.s0 / kBlock * kBlock; b0 < it.s1; b0 += kBlock) {
    const int64_t n = std::min(it.s1, b0 + kBlock) - b0;
    const float* k = kseq + b0 * d;
    const float* v = vseq + b0 * d;
    auto lo = [&](int64_t i) { return std::max<int64_t>(a.lo[it.r0 + i] - b0, 0); };  // visible slots of
    auto hi = [&](int64_t i) { return std::min<int64_t>(a.hi[it.r0 + i] - b0, n); };  // row i, in block
    int64_t s = 0;
    for (; s + 4 <= n; s += 4)
      for (int64_t i = 0; i < rows; ++i) {
        if (s + 4 <= lo(i) || s >= hi(i)) continue;
        for (int64_t j = 0; j < group; ++j)
          dots<4>(a.q + ((it.r0 + i) * a.H + it.g * group + j) * d, k + s * d, d, d, sc + (i * group + j) * kBlock + s);
      }
    for (; s < n; ++s)
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < group; ++j)
          dots<1>(a.q + ((it.r0 + i) * a.H + it.g * group + j) * d, k + s * d, d, d, sc + (i * group + j) * kBlock + s);
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t l0 = lo(i), l1 = hi(i), m = l1 - l0;
      if (m <= 0) continue;
      for (int64_t j = 0; j < group; ++j) {
        float* o = part + (i * group + j) * (d + 2);
        float* e = sc + (i * group + j) * kBlock + l0;
        float mx = o[d];
        if (a.softcap > 0.f) {
          for (int64_t t = 0; t < m; ++t) e[t] = a.softcap * std::tanh((e[t] * a.scale) / a.softcap);
        } else {
          for (int64_t t = 0; t < m; ++t) e[t] = e[t] * a.scale;
        }
        for (int64_t t = 0; t < m; ++t) mx = std::max(mx, e[t]);
        const float alpha = std::exp(o[d] - mx);  // rescales what earlier blocks summed (0 at first)
        const __m256 mv = _mm256_set1_ps(mx);
        __m256 acc = _mm256_setzero_ps();
        int64_t t = 0;
        for (; t + 8 <= m; t += 8) {
          const __m256 x = exp8(_mm256_sub_ps(_mm256_loadu_ps(e + t), mv));
          _mm256_storeu_ps(e + t, x);
          acc = _mm256_add_ps(acc, x);
        }
        float sum = hsum8(acc);
        for (; t < m; ++t) { e[t] = std::exp(e[t] - mx); sum += e[t]; }
        weighted_sum(e, v + l0 * d, m, d, alpha, o);
        o[d] = mx;
        o[d + 1] = o[d + 1] * alpha + sum;
      }
    }
  }
}

}  // namespace

constexpr int64_t kTileRows = 16;
constexpr int64_t kSplit = 2 * kBlock;  // key slots per attention work item (a multiple of kBlock)

void attention(const Attention& a, int64_t N, int64_t threads) {
  const int64_t group = a.H / a.kvh, d = a.Dh, stride = kTileRows * group * (d + 2);
  struct Tile { int64_t r0, r1, lo, hi; };
  std::vector<Tile> tiles;
  std::vector<int64_t> tile_of_row(N);
  for (int64_t r0 = 0; r0 < N;) {  // consecutive rows of one sequence
    int64_t r1 = r0 + 1;
    while (r1 < N && r1 - r0 < kTileRows && a.rowb[r1] == a.rowb[r0]) ++r1;
    Tile t{r0, r1, a.lo[r0], a.hi[r0]};
    for (int64_t r = r0; r < r1; ++r) {
      t.lo = std::min(t.lo, a.lo[r]);
      t.hi = std::max(t.hi, a.hi[r]);
      tile_of_row[r] = (int64_t)tiles.size();
    }
    tiles.push_back(t);
    r0 = r1;
  }
  // Key ranges are split at absolute multiples of kSplit slots, whatever the tiles and threads:
  // each row then sums the same parts in the same order alone, in a batch or in a verification
  // block, so its output is bit-identical in all three (greedy speculative decoding stays exact)
  std::vector<AttnItem> items;
  std::vector<int64_t> first;  // per (tile, g): its first item; then the end
  for (const Tile& t : tiles)
    for (int64_t g = 0; g < a.kvh; ++g) {
      first.push_back((int64_t)items.size());
      for (int64_t c = t.lo / kSplit * kSplit; c < t.hi; c += kSplit)
        items.push_back({t.r0, t.r1, g, std::max(c, t.lo), std::min(t.hi, c + kSplit)});
    }
  first.push_back((int64_t)items.size());
  std::unique_ptr<float[]> part(new float[std::max<int64_t>(8, (int64_t)items.size() * stride)]);  // not zeroed
  float* pp = part.get();
  parallel_for((int64_t)items.size(), threads, [&](int64_t t) {
    thread_local std::vector<float> sc;
    sc.resize(kTileRows * group * kBlock);
    attend_item(a, items[t], pp + t * stride, sc.data());
  });
  for (int64_t r = 0; r < N; ++r)
    for (int64_t g = 0; g < a.kvh; ++g) {
      const int64_t tg = tile_of_row[r] * a.kvh + g, t0 = first[tg], t1 = first[tg + 1];
      for (int64_t j = 0; j < group; ++j) {
        float* out = a.out + (r * a.H + g * group + j) * d;
        auto at = [&](int64_t t) { return pp + t * stride + ((r - items[t].r0) * group + j) * (d + 2); };
        float mx = -std::numeric_limits<float>::infinity(), den = 0.f;
        int64_t seen = 0, last = -1;
        for (int64_t t = t0; t < t1; ++t)
          if (at(t)[d + 1] > 0.f) { mx = std::max(mx, at(t)[d]); ++seen; last = t; }
        if (seen == 0) { std::fill(out, out + d, 0.f); continue; }  // no visible slot: attends to nothing
        if (seen == 1) {
          const float* o = at(last);
          for (int64_t i = 0; i < d; ++i) out[i] = o[i] / o[d + 1];
          continue;
        }
        std::fill(out, out + d, 0.f);
        for (int64_t t = t0; t < t1; ++t) {
          const float* o = at(t);
          if (!(o[d + 1] > 0.f)) continue;
          const float w = std::exp(o[d] - mx);
          den += w * o[d + 1];
          for (int64_t i = 0; i < d; ++i) out[i] += w * o[i];
        }
        for (int64_t i = 0; i < d; ++i) out[i] = out[i] / den;
      }
    }
}

}  // namespace mtp
