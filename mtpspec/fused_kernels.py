"""C++ source of the fused decoder layers (``mtpspec.fused``), built into ``ops``'s extension.

What: ``Gemma3Stack`` (embedding, every Gemma 3 decoder layer, final norm, for rows with their own
positions and cache slots) and ``DraftStack`` (one MTP draft step with query-only attention over
target layers' caches, and the clustered LM head), as pybind11 classes over raw pointers into the
packed weights (``ops.PackedLinear``), the norm scales and the ``KVCache`` buffers. They use the
packed matrix kernels, ``parallel_for`` and the thread pool defined in ``ops._CPP``, which precedes
this source in the same translation unit.

Why a separate module: ``ops`` compiles it with its kernels into one extension (one thread pool);
keeping the text here keeps ``fused`` readable. See ``mtpspec.fused`` for the design and numbers.
"""

CPP = r"""
#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <numeric>
#include <tuple>

namespace fused {

using PackedSpec = std::tuple<torch::Tensor, torch::Tensor, int64_t, int64_t, int64_t, int64_t>;
constexpr int64_t kBlock = 128;   // key slots per attention block (absolute slot multiples)
constexpr int64_t kMaxHeadDim = 512;

struct Linear {  // a packed weight (see ops.py) and the tensors that own it
  torch::Tensor w, s;
  PackedRef ref{};
  Linear() = default;
  explicit Linear(const PackedSpec& t) : w(std::get<0>(t)), s(std::get<1>(t)) {
    ref = packed_ref(w, s, std::get<2>(t), std::get<3>(t), std::get<4>(t), std::get<5>(t));
  }
};

static const float* vec_of(const torch::Tensor& t, int64_t n) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat && t.is_contiguous() && t.device().is_cpu() &&
              t.numel() == n, "norm scales must be contiguous float32 CPU vectors of the right size");
  return t.data_ptr<float>();
}

static std::unique_ptr<float[]> scratch(int64_t n) { return std::unique_ptr<float[]>(new float[std::max<int64_t>(n, 8)]); }

// ---- vector math
static inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// e^x (Cephes expf: ~1 ulp); inputs below -88.4 give ~0
static inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f));
  x = _mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f));
  __m256 fx = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f));
  fx = _mm256_floor_ps(fx);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, z, _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(n));
}

static inline __m256 tanh8(__m256 v) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256 a = _mm256_andnot_ps(sign, v);
  const __m256 e = exp8(_mm256_mul_ps(a, _mm256_set1_ps(-2.f)));
  const __m256 one = _mm256_set1_ps(1.f);
  const __m256 t = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
  return _mm256_or_ps(t, _mm256_and_ps(v, sign));
}

// out = x / rms(x) * scale (Gemma RMSNorm with scale = 1 + w precomputed), as rms_norm in gemma3.py
static void rms_norm(const float* x, const float* scale, int64_t n, float eps, float* out) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 v0 = _mm256_loadu_ps(x + i), v1 = _mm256_loadu_ps(x + i + 8);
    a0 = _mm256_fmadd_ps(v0, v0, a0);
    a1 = _mm256_fmadd_ps(v1, v1, a1);
  }
  float ss = hsum8(_mm256_add_ps(a0, a1));
  for (; i < n; ++i) ss += x[i] * x[i];
  const float r = 1.f / std::sqrt(ss / (float)n + eps);
  for (i = 0; i < n; ++i) out[i] = (x[i] * r) * scale[i];
}

// x += rms_norm(y) (the sandwich norms' residual add)
static void add_rms_norm(float* x, const float* y, const float* scale, int64_t n, float eps, float* tmp) {
  rms_norm(y, scale, n, eps, tmp);
  for (int64_t i = 0; i < n; ++i) x[i] = x[i] + tmp[i];
}

// rotate-half rotary: out = x * cos + cat(-x2, x1) * sin
static void rotary(const float* x, const float* c, const float* s, int64_t d, float* out) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < half; ++i) out[i] = x[i] * c[i] + (-x[i + half]) * s[i];
  for (int64_t i = half; i < d; ++i) out[i] = x[i] * c[i] + x[i - half] * s[i];
}

// out = gelu_tanh(g) * u, in ATen's order: 0.5 * x * (1 + tanh(beta * (x + kappa * x^3)))
static void gelu_mul(const float* g, const float* u, int64_t n, float* out) {
  const float beta = (float)(1.41421356237309504880 * 1.12837916709551257390 * 0.5), kappa = 0.044715f;
  const __m256 vb = _mm256_set1_ps(beta), vk = _mm256_set1_ps(kappa), vh = _mm256_set1_ps(0.5f),
               one = _mm256_set1_ps(1.f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(g + i);
    const __m256 x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
    const __m256 inner = _mm256_mul_ps(vb, _mm256_add_ps(x, _mm256_mul_ps(vk, x3)));
    const __m256 y = _mm256_mul_ps(_mm256_mul_ps(vh, x), _mm256_add_ps(one, tanh8(inner)));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(y, _mm256_loadu_ps(u + i)));
  }
  for (; i < n; ++i) {
    const float x = g[i], inner = beta * (x + kappa * (x * x * x));
    out[i] = ((0.5f * x) * (1.f + std::tanh(inner))) * u[i];
  }
}

// f(r) for each of n rows; over the pool when there is enough work to pay for it
template <class F>
static void for_rows(int64_t n, int64_t width, int64_t threads, const F& f) {
  const int64_t min_work = 1 << 14;
  if (threads <= 1 || n < 2 || n * width < 2 * min_work) {
    for (int64_t r = 0; r < n; ++r) f(r);
    return;
  }
  const int64_t per = std::max<int64_t>(1, min_work / std::max<int64_t>(width, 1));
  parallel_for((n + per - 1) / per, threads, [&](int64_t c) {
    for (int64_t r = c * per, end = std::min(n, (c + 1) * per); r < end; ++r) f(r);
  });
}

// ---- attention of query rows over cache slots [lo, hi) of their sequence
struct Attention {
  const float* q;              // [N, H, Dh], normed and rotated
  const float* kc; const float* vc;  // one layer of the cache: [Bc, kvh, S, Dh]
  int64_t H, kvh, S, Dh;
  float scale;
  const int64_t* rowb; const int64_t* lo; const int64_t* hi;  // per row: cache sequence, slot range
  float* out;                  // [N, H * Dh]
};

template <int NK>
static inline void dots(const float* q, const float* k, int64_t ld, int64_t d, float* out) {
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
static inline void weighted_rows(const float* p, const float* v, int64_t n, int64_t ld, float alpha, float* out) {
  __m256 acc[NR];
  const __m256 al = _mm256_set1_ps(alpha);
  for (int i = 0; i < NR; ++i) acc[i] = alpha == 0.f ? _mm256_setzero_ps() : _mm256_mul_ps(_mm256_loadu_ps(out + 8 * i), al);
  for (int64_t s = 0; s < n; ++s) {
    const __m256 ps = _mm256_broadcast_ss(p + s);
    for (int i = 0; i < NR; ++i) acc[i] = _mm256_fmadd_ps(ps, _mm256_loadu_ps(v + s * ld + 8 * i), acc[i]);
  }
  for (int i = 0; i < NR; ++i) _mm256_storeu_ps(out + 8 * i, acc[i]);
}

static void weighted_sum(const float* p, const float* v, int64_t n, int64_t d, float alpha, float* out) {
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
static void attend_item(const Attention& a, const AttnItem& it, float* part, float* sc /*[rows*group, kBlock]*/) {
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
        for (int64_t t = 0; t < m; ++t) { e[t] = e[t] * a.scale; mx = std::max(mx, e[t]); }
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

constexpr int64_t kTileRows = 16;
constexpr int64_t kSplit = 2 * kBlock;  // key slots per attention work item (a multiple of kBlock)

static void attention(const Attention& a, int64_t N, int64_t threads) {
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
  auto part = scratch((int64_t)items.size() * stride);
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

struct RopeTables {  // cos/sin for global and local layers; positions < len are in both
  const float *cos_g, *sin_g, *cos_l, *sin_l;
  int64_t len;
};

static RopeTables rope_tables(const std::vector<torch::Tensor>& t, int64_t dh) {
  TORCH_CHECK(t.size() == 4, "rope: cos/sin for global then local layers");
  for (const auto& x : t)
    TORCH_CHECK(x.scalar_type() == torch::kFloat && x.is_contiguous() && x.dim() == 2 && x.size(1) == dh,
                "rope tables must be contiguous float32 [len, head_dim]");
  TORCH_CHECK(t[0].sizes() == t[1].sizes() && t[2].sizes() == t[3].sizes(), "cos and sin tables differ");
  return {t[0].data_ptr<float>(), t[1].data_ptr<float>(), t[2].data_ptr<float>(), t[3].data_ptr<float>(),
          std::min(t[0].size(0), t[2].size(0))};
}

static void check_cache(const torch::Tensor& k, const torch::Tensor& v, int64_t layers, int64_t batch,
                        int64_t kvh, int64_t dh) {
  for (const auto& c : {k, v})
    TORCH_CHECK(c.scalar_type() == torch::kFloat && c.is_contiguous() && c.device().is_cpu() && c.dim() == 5 &&
                c.size(0) >= layers && c.size(1) >= batch && c.size(2) == kvh && c.size(4) == dh,
                "cache must be contiguous float32 [L, B, kv_heads, S, head_dim] on the CPU");
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v caches differ in shape");
}

static const int64_t* long_data(const torch::Tensor& t, int64_t n, const char* what) {
  TORCH_CHECK(t.scalar_type() == torch::kLong && t.is_contiguous() && t.numel() == n, what);
  return t.data_ptr<int64_t>();
}

// ---- the target's decoder stack
class Gemma3Stack {
 public:
  // dims: hidden, heads, kv heads, head dim, intermediate, window, chunk bytes
  // reals: eps, query scale, embedding scale; linears: embedding, then qkv, o, gate_up, down per layer
  // norms: input, post-attn, pre-ffw, post-ffw, q, k per layer, then the final norm
  Gemma3Stack(std::vector<int64_t> dims, std::vector<double> reals, std::vector<bool> is_global,
              std::vector<PackedSpec> linears, std::vector<torch::Tensor> norms)
      : is_global_(is_global), norms_(norms) {
    TORCH_CHECK(dims.size() == 7 && reals.size() == 3);
    d_ = dims[0]; H_ = dims[1]; kvh_ = dims[2]; dh_ = dims[3]; inter_ = dims[4]; window_ = dims[5]; chunk_ = dims[6];
    eps_ = (float)reals[0]; qscale_ = (float)reals[1]; embed_scale_ = (float)reals[2];
    L_ = (int64_t)is_global.size();
    TORCH_CHECK(dh_ % 8 == 0 && dh_ <= kMaxHeadDim && H_ % kvh_ == 0, "unsupported head layout");
    TORCH_CHECK((int64_t)linears.size() == 1 + 4 * L_ && (int64_t)norms.size() == 6 * L_ + 1);
    for (const auto& t : linears) lin_.emplace_back(t);
    const int64_t qkv = (H_ + 2 * kvh_) * dh_;
    TORCH_CHECK(lin_[0].ref.K == d_, "embedding width");
    for (int64_t l = 0; l < L_; ++l) {
      const Linear* w = &lin_[1 + 4 * l];
      TORCH_CHECK(w[0].ref.N == qkv && w[0].ref.K == d_ && w[1].ref.N == d_ && w[1].ref.K == H_ * dh_ &&
                  w[2].ref.N == 2 * inter_ && w[2].ref.K == d_ && w[3].ref.N == d_ && w[3].ref.K == inter_,
                  "layer weight shapes");
      for (int i = 0; i < 4; ++i) vec_of(norms_[6 * l + i], d_);
      for (int i = 4; i < 6; ++i) vec_of(norms_[6 * l + i], dh_);
    }
    vec_of(norms_[6 * L_], d_);
  }

  // tokens, positions [B, T] int64 -> hidden states after the final norm [B, T, d]
  torch::Tensor forward(torch::Tensor tokens, torch::Tensor positions, torch::Tensor cache_k,
                        torch::Tensor cache_v, std::vector<torch::Tensor> rope, int64_t threads) {
    TORCH_CHECK(tokens.dim() == 2 && positions.sizes() == tokens.sizes(), "tokens and positions: [B, T]");
    const int64_t B = tokens.size(0), T = tokens.size(1), N = B * T;
    const int64_t* tok = long_data(tokens, N, "tokens: contiguous int64");
    const int64_t* pos = long_data(positions, N, "positions: contiguous int64");
    check_cache(cache_k, cache_v, L_, B, kvh_, dh_);
    const RopeTables rt = rope_tables(rope, dh_);
    const int64_t S = cache_k.size(3);
    for (int64_t r = 0; r < N; ++r) {
      TORCH_CHECK(pos[r] >= 0 && pos[r] < S && pos[r] < rt.len, "position outside the cache or rope tables");
      TORCH_CHECK(tok[r] >= 0 && tok[r] < lin_[0].ref.N, "token id out of range");
    }
    auto out = torch::empty({B, T, d_}, torch::kFloat);
    pybind11::gil_scoped_release no_gil;
    std::vector<int64_t> rowb(N), lo_g(N, 0), lo_l(N), hi(N);
    for (int64_t r = 0; r < N; ++r) {
      rowb[r] = r / T;
      hi[r] = pos[r] + 1;
      lo_l[r] = std::max<int64_t>(0, pos[r] - window_ + 1);
    }
    const int64_t qkv_w = (H_ + 2 * kvh_) * dh_;
    auto x = scratch(N * d_), h = scratch(N * d_), qkv = scratch(N * qkv_w), q = scratch(N * H_ * dh_),
         att = scratch(N * H_ * dh_), o = scratch(N * d_), gu = scratch(N * 2 * inter_), act = scratch(N * inter_);
    for_rows(N, d_, threads, [&](int64_t r) {
      float* xr = x.get() + r * d_;
      packed_row(lin_[0].ref, tok[r], xr);
      for (int64_t i = 0; i < d_; ++i) xr[i] = xr[i] * embed_scale_;
    });
    float* kc = cache_k.data_ptr<float>();
    float* vc = cache_v.data_ptr<float>();
    const int64_t layer_stride = cache_k.stride(0);
    for (int64_t l = 0; l < L_; ++l) {
      const Linear* w = &lin_[1 + 4 * l];
      auto scale = [&](int i) { return norms_[6 * l + i].data_ptr<float>(); };
      const bool glob = is_global_[l];
      const float* cosv = glob ? rt.cos_g : rt.cos_l;
      const float* sinv = glob ? rt.sin_g : rt.sin_l;
      float* kl = kc + l * layer_stride;
      float* vl = vc + l * layer_stride;
      const float *s_in = scale(0), *s_pa = scale(1), *s_pf = scale(2), *s_pff = scale(3), *s_q = scale(4), *s_k = scale(5);
      for_rows(N, d_, threads, [&](int64_t r) { rms_norm(x.get() + r * d_, s_in, d_, eps_, h.get() + r * d_); });
      packed_matmul(w[0].ref, h.get(), N, qkv.get(), threads, chunk_);
      for_rows(N, qkv_w, threads, [&](int64_t r) {
        alignas(32) float tmp[kMaxHeadDim];
        const float* row = qkv.get() + r * qkv_w;
        const float* c = cosv + pos[r] * dh_;
        const float* s = sinv + pos[r] * dh_;
        for (int64_t j = 0; j < H_; ++j) {
          rms_norm(row + j * dh_, s_q, dh_, eps_, tmp);
          rotary(tmp, c, s, dh_, q.get() + (r * H_ + j) * dh_);
        }
        for (int64_t g = 0; g < kvh_; ++g) {
          const int64_t slot = ((rowb[r] * kvh_ + g) * S + pos[r]) * dh_;
          rms_norm(row + (H_ + g) * dh_, s_k, dh_, eps_, tmp);
          rotary(tmp, c, s, dh_, kl + slot);
          std::memcpy(vl + slot, row + (H_ + kvh_ + g) * dh_, dh_ * sizeof(float));
        }
      });
      Attention a{q.get(), kl, vl, H_, kvh_, S, dh_, qscale_, rowb.data(), glob ? lo_g.data() : lo_l.data(), hi.data(), att.get()};
      attention(a, N, threads);
      packed_matmul(w[1].ref, att.get(), N, o.get(), threads, chunk_);
      for_rows(N, d_, threads, [&](int64_t r) {
        float* xr = x.get() + r * d_;
        add_rms_norm(xr, o.get() + r * d_, s_pa, d_, eps_, h.get() + r * d_);
        rms_norm(xr, s_pf, d_, eps_, h.get() + r * d_);
      });
      packed_matmul(w[2].ref, h.get(), N, gu.get(), threads, chunk_);
      for_rows(N, inter_, threads, [&](int64_t r) {
        const float* g = gu.get() + r * 2 * inter_;
        gelu_mul(g, g + inter_, inter_, act.get() + r * inter_);
      });
      packed_matmul(w[3].ref, act.get(), N, o.get(), threads, chunk_);
      for_rows(N, d_, threads, [&](int64_t r) {
        add_rms_norm(x.get() + r * d_, o.get() + r * d_, s_pff, d_, eps_, h.get() + r * d_);
      });
    }
    const float* s_final = norms_[6 * L_].data_ptr<float>();
    float* op = out.data_ptr<float>();
    for_rows(N, d_, threads, [&](int64_t r) { rms_norm(x.get() + r * d_, s_final, d_, eps_, op + r * d_); });
    return out;
  }

 private:
  int64_t d_, H_, kvh_, dh_, inter_, window_, chunk_, L_;
  float eps_, qscale_, embed_scale_;
  std::vector<bool> is_global_;
  std::vector<Linear> lin_;
  std::vector<torch::Tensor> norms_;
};

// ---- one step of the MTP drafter, and its clustered LM head
class DraftStack {
 public:
  // dims: target hidden, draft hidden, heads, kv heads, head dim, intermediate, window, chunk bytes,
  //       top clusters, cluster size, padded cluster size
  // reals: eps, query scale, embedding scale
  // linears: target embedding, pre_projection, (q, o, gate_up, down) per layer, post_projection,
  //          then for the clustered head: centroids, cluster-ordered embedding
  // norms: (attn, post_attn, mlp, post_mlp, q) per layer, norm, out_norm
  // cluster_ids [C, cluster size] (token id of each cluster member), or empty
  DraftStack(std::vector<int64_t> dims, std::vector<double> reals, std::vector<int64_t> target_layers,
             std::vector<bool> is_global, std::vector<PackedSpec> linears, std::vector<torch::Tensor> norms,
             torch::Tensor cluster_ids)
      : target_layers_(target_layers), is_global_(is_global), norms_(norms), cluster_ids_(cluster_ids) {
    TORCH_CHECK(dims.size() == 11 && reals.size() == 3);
    dt_ = dims[0]; dd_ = dims[1]; H_ = dims[2]; kvh_ = dims[3]; dh_ = dims[4]; inter_ = dims[5];
    window_ = dims[6]; chunk_ = dims[7]; top_ = dims[8]; csize_ = dims[9]; cpad_ = dims[10];
    eps_ = (float)reals[0]; qscale_ = (float)reals[1]; embed_scale_ = (float)reals[2];
    L_ = (int64_t)target_layers.size();
    TORCH_CHECK(dh_ % 8 == 0 && dh_ <= kMaxHeadDim && H_ % kvh_ == 0 && (int64_t)is_global.size() == L_);
    TORCH_CHECK((int64_t)norms.size() == 5 * L_ + 2);
    const int64_t nlin = 3 + 4 * L_;
    TORCH_CHECK((int64_t)linears.size() >= nlin && (int64_t)linears.size() <= nlin + 2);
    has_centroids_ = (int64_t)linears.size() > nlin;
    for (const auto& t : linears) lin_.emplace_back(t);
    clustered_ = (int64_t)linears.size() == nlin + 2;  // else use_screen must give the embedding
    const Linear* w = lin_.data();
    TORCH_CHECK(w[0].ref.K == dt_ && w[1].ref.N == dd_ && w[1].ref.K == 2 * dt_ && w[nlin - 1].ref.N == dt_ &&
                w[nlin - 1].ref.K == dd_, "projection shapes");
    for (int64_t l = 0; l < L_; ++l) {
      const Linear* lw = w + 2 + 4 * l;
      TORCH_CHECK(lw[0].ref.N == H_ * dh_ && lw[0].ref.K == dd_ && lw[1].ref.N == dd_ && lw[1].ref.K == H_ * dh_ &&
                  lw[2].ref.N == 2 * inter_ && lw[2].ref.K == dd_ && lw[3].ref.N == dd_ && lw[3].ref.K == inter_,
                  "draft layer weight shapes");
      for (int i = 0; i < 4; ++i) vec_of(norms_[5 * l + i], dd_);
      vec_of(norms_[5 * l + 4], dh_);
    }
    vec_of(norms_[5 * L_], dd_);
    vec_of(norms_[5 * L_ + 1], dt_);
    if (has_centroids_) {
      TORCH_CHECK(w[nlin].ref.K == dt_ && cpad_ % 16 == 0 && csize_ <= cpad_ && top_ >= 1 && top_ <= w[nlin].ref.N,
                  "centroid shapes");
      long_data(cluster_ids_, w[nlin].ref.N * csize_, "cluster ids: contiguous int64 [C, S]");
    }
    if (clustered_) {
      const int64_t C = w[nlin].ref.N;
      TORCH_CHECK(w[nlin].ref.K == dt_ && w[nlin + 1].ref.K == dt_ && cpad_ % 16 == 0 && csize_ <= cpad_ &&
                  w[nlin + 1].ref.N == C * cpad_ && top_ >= 1 && top_ <= C, "clustered head shapes");
      long_data(cluster_ids_, C * csize_, "cluster ids: contiguous int64 [C, S]");
    }
  }

  // tokens [B] (embedded with the target's table), hidden [B, dt], query positions [B] (rotary),
  // context_end [B] (visible slots < end, and within the window on sliding layers) -> h' [B, dt]
  torch::Tensor step(torch::Tensor tokens, torch::Tensor hidden, torch::Tensor query_pos,
                     torch::Tensor context_end, torch::Tensor cache_k, torch::Tensor cache_v,
                     std::vector<torch::Tensor> rope, int64_t threads) {
    const int64_t B = tokens.numel();
    const int64_t* tok = long_data(tokens, B, "tokens: contiguous int64 [B]");
    const int64_t* qp = long_data(query_pos, B, "query positions: contiguous int64 [B]");
    const int64_t* end = long_data(context_end, B, "context end: contiguous int64 [B]");
    TORCH_CHECK(hidden.scalar_type() == torch::kFloat && hidden.is_contiguous() && hidden.numel() == B * dt_,
                "hidden: contiguous float32 [B, d]");
    const int64_t layers = *std::max_element(target_layers_.begin(), target_layers_.end()) + 1;
    check_cache(cache_k, cache_v, layers, B, kvh_, dh_);
    const RopeTables rt = rope_tables(rope, dh_);
    const int64_t S = cache_k.size(3);
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(qp[b] >= 0 && qp[b] < rt.len && end[b] >= 0 && end[b] <= S, "position outside the cache or rope tables");
      TORCH_CHECK(tok[b] >= 0 && tok[b] < lin_[0].ref.N, "token id out of range");
    }
    auto out = torch::empty({B, dt_}, torch::kFloat);
    const float* hid = hidden.data_ptr<float>();
    pybind11::gil_scoped_release no_gil;
    std::vector<int64_t> rowb(B), lo_g(B, 0), lo_l(B), hi(B);
    for (int64_t b = 0; b < B; ++b) {
      rowb[b] = b;
      hi[b] = end[b];
      lo_l[b] = std::max<int64_t>(0, end[b] - window_ + 1);
    }
    auto xin = scratch(B * 2 * dt_), x = scratch(B * dd_), h = scratch(B * dd_), q = scratch(B * H_ * dh_),
         att = scratch(B * H_ * dh_), o = scratch(B * dd_), gu = scratch(B * 2 * inter_), act = scratch(B * inter_),
         y = scratch(B * dt_);
    for (int64_t b = 0; b < B; ++b) {
      float* xr = xin.get() + b * 2 * dt_;
      packed_row(lin_[0].ref, tok[b], xr);
      for (int64_t i = 0; i < dt_; ++i) xr[i] = xr[i] * embed_scale_;
      std::memcpy(xr + dt_, hid + b * dt_, dt_ * sizeof(float));
    }
    packed_matmul(lin_[1].ref, xin.get(), B, x.get(), threads, chunk_);
    const int64_t layer_stride = cache_k.stride(0);
    for (int64_t l = 0; l < L_; ++l) {
      const Linear* w = &lin_[2 + 4 * l];
      auto scale = [&](int i) { return norms_[5 * l + i].data_ptr<float>(); };
      const float *s_attn = scale(0), *s_pa = scale(1), *s_mlp = scale(2), *s_pm = scale(3), *s_q = scale(4);
      const bool glob = is_global_[l];
      const float* cosv = glob ? rt.cos_g : rt.cos_l;
      const float* sinv = glob ? rt.sin_g : rt.sin_l;
      for (int64_t b = 0; b < B; ++b) rms_norm(x.get() + b * dd_, s_attn, dd_, eps_, h.get() + b * dd_);
      packed_matmul(w[0].ref, h.get(), B, q.get(), threads, chunk_);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t j = 0; j < H_; ++j) {
          alignas(32) float tmp[kMaxHeadDim];
          float* qh = q.get() + (b * H_ + j) * dh_;
          rms_norm(qh, s_q, dh_, eps_, tmp);
          rotary(tmp, cosv + qp[b] * dh_, sinv + qp[b] * dh_, dh_, qh);
        }
      const int64_t tl = target_layers_[l];
      Attention a{q.get(), cache_k.data_ptr<float>() + tl * layer_stride, cache_v.data_ptr<float>() + tl * layer_stride,
                  H_, kvh_, S, dh_, qscale_, rowb.data(), glob ? lo_g.data() : lo_l.data(), hi.data(), att.get()};
      attention(a, B, threads);
      packed_matmul(w[1].ref, att.get(), B, o.get(), threads, chunk_);
      for (int64_t b = 0; b < B; ++b) {
        float* xr = x.get() + b * dd_;
        add_rms_norm(xr, o.get() + b * dd_, s_pa, dd_, eps_, h.get() + b * dd_);
        rms_norm(xr, s_mlp, dd_, eps_, h.get() + b * dd_);
      }
      packed_matmul(w[2].ref, h.get(), B, gu.get(), threads, chunk_);
      for (int64_t b = 0; b < B; ++b) {
        const float* g = gu.get() + b * 2 * inter_;
        gelu_mul(g, g + inter_, inter_, act.get() + b * inter_);
      }
      packed_matmul(w[3].ref, act.get(), B, o.get(), threads, chunk_);
      for (int64_t b = 0; b < B; ++b) add_rms_norm(x.get() + b * dd_, o.get() + b * dd_, s_pm, dd_, eps_, h.get() + b * dd_);
    }
    for (int64_t b = 0; b < B; ++b) rms_norm(x.get() + b * dd_, norms_[5 * L_].data_ptr<float>(), dd_, eps_, h.get() + b * dd_);
    packed_matmul(lin_[2 + 4 * L_].ref, h.get(), B, y.get(), threads, chunk_);
    float* op = out.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) rms_norm(y.get() + b * dt_, norms_[5 * L_ + 1].data_ptr<float>(), dt_, eps_, op + b * dt_);
    return out;
  }

  // The clustered head reads the target's argmax screen (mtpspec/screen.py) instead of a
  // cluster-ordered copy of its own: u [C * cpad / 16, 2, Kp/4, 8, 4] in this drafter's padded
  // cluster order, with its per-row scales and bounds [C * cpad]. Logits become integer estimates.
  void use_screen(torch::Tensor u, torch::Tensor scale, torch::Tensor beta) {
    const int64_t nlin = 3 + 4 * L_;
    TORCH_CHECK(has_centroids_, "this drafter has no clustered head");
    const int64_t C = lin_[nlin].ref.N;
    TORCH_CHECK(u.dim() == 5 && u.scalar_type() == torch::kUInt8 && u.is_contiguous() && u.size(0) * 16 == C * cpad_ &&
                u.size(2) * 4 >= dt_ && scale.numel() == C * cpad_ && beta.numel() == C * cpad_,
                "the screen does not hold this drafter's clusters");
    screen_u_ = u; screen_scale_ = scale; screen_beta_ = beta;
    clustered_ = true;
  }

  // h [B, dt] -> [best token [B], and when want_logits: logits [B, m*S], token ids [B, m*S]]
  // (the chosen clusters in descending centroid score, members in cluster order)
  std::vector<torch::Tensor> clustered(torch::Tensor hidden, bool want_logits, int64_t threads) {
    TORCH_CHECK(clustered_, "this drafter has no clustered head");
    TORCH_CHECK(hidden.scalar_type() == torch::kFloat && hidden.is_contiguous() && hidden.dim() == 2 &&
                hidden.size(1) == dt_, "hidden: contiguous float32 [B, d]");
    const int64_t B = hidden.size(0), nlin = 3 + 4 * L_;
    const PackedRef& cent = lin_[nlin].ref;
    const bool shared = screen_u_.defined();
    const int64_t C = cent.N, m = top_;
    auto best = torch::empty({B}, torch::kLong);
    auto logits = want_logits ? torch::empty({B, m * csize_}, torch::kFloat) : torch::empty({0}, torch::kFloat);
    auto ids = want_logits ? torch::empty({B, m * csize_}, torch::kLong) : torch::empty({0}, torch::kLong);
    const float* h = hidden.data_ptr<float>();
    const int64_t* members = cluster_ids_.data_ptr<int64_t>();
    pybind11::gil_scoped_release no_gil;
    auto scores = scratch(B * C);
    packed_matmul(cent, h, B, scores.get(), threads, chunk_);
    std::vector<int64_t> chosen(B * m), order(C);
    for (int64_t b = 0; b < B; ++b) {
      const float* sc = scores.get() + b * C;
      std::iota(order.begin(), order.end(), 0);
      std::partial_sort(order.begin(), order.begin() + m, order.end(), [&](int64_t i, int64_t j) {
        return sc[i] > sc[j] || (sc[i] == sc[j] && i < j);
      });
      std::copy(order.begin(), order.begin() + m, chosen.begin() + b * m);
    }
    auto sub = scratch(B * m * cpad_);
    const int64_t panels = cpad_ / 16;
    float* sp = sub.get();
    if (shared) {
      const int64_t Kp = screen_u_.size(2) * 4, ng = Kp / 32;
      std::vector<int8_t> a(B * Kp);
      std::vector<int32_t> corr(B * ng);
      std::vector<float> sc(B * ng), radius(B);
      screen::quantize_rows(h, B, dt_, Kp, a.data(), corr.data(), sc.data(), radius.data());
      const uint8_t* u = screen_u_.data_ptr<uint8_t>();
      const float *us = screen_scale_.data_ptr<float>(), *ub = screen_beta_.data_ptr<float>();
      parallel_for(B * m, threads, [&](int64_t t) {
        const int64_t b = t / m, c = chosen[t];
        for (int64_t q = 0; q < panels; ++q)
          screen::panel_estimates(u, us, ub, Kp, a.data() + b * Kp, corr.data() + b * ng, sc.data() + b * ng,
                                  radius.data() + b, c * panels + q, sp + t * cpad_ + q * 16);
      });
    } else {
      const PackedRef& emb = lin_[nlin + 1].ref;
      parallel_for(B * m, threads, [&](int64_t t) {
        const int64_t b = t / m, c = chosen[t];
        Job j{h + b * dt_, 1, dt_, emb.N, emb.w, emb.s, emb.G, sp + t * cpad_, emb.fmt, panels, emb.N / 16, c * cpad_};
        run_panels_any(j, c * panels, (c + 1) * panels);
      });
    }
    int64_t* bp = best.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      float top = -std::numeric_limits<float>::infinity();
      int64_t arg = -1;
      for (int64_t i = 0; i < m; ++i) {
        const int64_t c = chosen[b * m + i];
        const float* v = sp + (b * m + i) * cpad_;
        for (int64_t s = 0; s < csize_; ++s)
          if (v[s] > top || arg < 0) { top = v[s]; arg = members[c * csize_ + s]; }
        if (want_logits) {
          std::memcpy(logits.data_ptr<float>() + (b * m + i) * csize_, v, csize_ * sizeof(float));
          std::memcpy(ids.data_ptr<int64_t>() + (b * m + i) * csize_, members + c * csize_, csize_ * sizeof(int64_t));
        }
      }
      bp[b] = arg;
    }
    return {best, logits, ids};
  }

 private:
  int64_t dt_, dd_, H_, kvh_, dh_, inter_, window_, chunk_, top_, csize_, cpad_, L_;
  float eps_, qscale_, embed_scale_;
  bool clustered_ = false, has_centroids_ = false;
  torch::Tensor screen_u_, screen_scale_, screen_beta_;
  std::vector<int64_t> target_layers_;
  std::vector<bool> is_global_;
  std::vector<Linear> lin_;
  std::vector<torch::Tensor> norms_;
  torch::Tensor cluster_ids_;
};

}  // namespace fused

void register_fused(pybind11::module_& m) {
  pybind11::class_<fused::Gemma3Stack>(m, "Gemma3Stack")
      .def(pybind11::init<std::vector<int64_t>, std::vector<double>, std::vector<bool>,
                          std::vector<fused::PackedSpec>, std::vector<torch::Tensor>>())
      .def("forward", &fused::Gemma3Stack::forward);
  pybind11::class_<fused::DraftStack>(m, "DraftStack")
      .def(pybind11::init<std::vector<int64_t>, std::vector<double>, std::vector<int64_t>, std::vector<bool>,
                          std::vector<fused::PackedSpec>, std::vector<torch::Tensor>, torch::Tensor>())
      .def("step", &fused::DraftStack::step)
      .def("clustered", &fused::DraftStack::clustered)
      .def("use_screen", &fused::DraftStack::use_screen);
}
"""
