// The decoder-layer body of layer.h.
#include "layer.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "attention.h"
#include "vec.h"

namespace mtp {
namespace {

void rms_norm_impl(const float* x, const float* scale, int64_t n, float eps, float* out) {
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
void add_rms_norm(float* x, const float* y, const float* scale, int64_t n, float eps, float* tmp) {
  rms_norm_impl(y, scale, n, eps, tmp);
  for (int64_t i = 0; i < n; ++i) x[i] = x[i] + tmp[i];
}

// rotate-half rotary: out = x * cos + cat(-x2, x1) * sin
void rotary(const float* x, const float* c, const float* s, int64_t d, float* out) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < half; ++i) out[i] = x[i] * c[i] + (-x[i + half]) * s[i];
  for (int64_t i = half; i < d; ++i) out[i] = x[i] * c[i] + x[i - half] * s[i];
}

// out = gelu_tanh(g) * u, in ATen's order: 0.5 * x * (1 + tanh(beta * (x + kappa * x^3)))
void gelu_mul(const float* g, const float* u, int64_t n, float* out) {
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

// out = silu(g) * u = g / (1 + e^-g) * u
void silu_mul(const float* g, const float* u, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = (g[i] / (1.f + std::exp(-g[i]))) * u[i];
}

// x += y, or x += rms_norm(y) when scale is given (a sandwich norm)
void add_residual(float* x, const float* y, const float* scale, int64_t n, float eps, float* tmp) {
  if (scale != nullptr) {
    add_rms_norm(x, y, scale, n, eps, tmp);
  } else {
    for (int64_t i = 0; i < n; ++i) x[i] = x[i] + y[i];
  }
}

int64_t qkv_width(const LayerShape& s, bool writes) { return (s.H + (writes ? 2 * s.kvh : 0)) * s.dh; }

std::unique_ptr<float[]> buffer(int64_t n) { return std::unique_ptr<float[]>(new float[std::max<int64_t>(n, 8)]); }

}  // namespace

void rms_norm(const float* x, const float* scale, int64_t n, float eps, float* out) {
  rms_norm_impl(x, scale, n, eps, out);
}

LayerScratch::LayerScratch(int64_t N, const LayerShape& s)
    : h(buffer(N * s.d)), qkv(buffer(N * qkv_width(s, true))), q(buffer(N * s.H * s.dh)),
      att(buffer(N * s.H * s.dh)), o(buffer(N * s.d)), gu(buffer(N * 2 * s.inter)), act(buffer(N * s.inter)) {}

void decoder_layer(const LayerShape& s, const LayerWeights& w, const LayerRows& rows,
                   const LayerCache& cache, float* x, LayerScratch& buf, int64_t threads) {
  const int64_t N = rows.N, d = s.d, H = s.H, kvh = s.kvh, dh = s.dh, inter = s.inter;
  const bool writes = rows.write_pos != nullptr;
  const int64_t qkv_w = qkv_width(s, writes);
  float *h = buf.h.get(), *qkv = buf.qkv.get(), *q = buf.q.get(), *att = buf.att.get(), *o = buf.o.get(),
        *gu = buf.gu.get(), *act = buf.act.get();
  for_rows(N, d, threads, [&](int64_t r) { rms_norm_impl(x + r * d, w.attn_norm, d, s.eps, h + r * d); });
  packed_matmul(w.qkv, h, N, qkv, threads, s.chunk_bytes);
  for_rows(N, qkv_w, threads, [&](int64_t r) {
    alignas(32) float tmp[kMaxHeadDim];
    float* row = qkv + r * qkv_w;
    if (w.qkv_bias != nullptr)
      for (int64_t i = 0; i < qkv_w; ++i) row[i] = row[i] + w.qkv_bias[i];
    const float* c = rows.cos + rows.rope_pos[r] * dh;
    const float* sn = rows.sin + rows.rope_pos[r] * dh;
    auto norm_rotate = [&](const float* head, const float* scale, float* out) {
      if (scale != nullptr) {
        rms_norm_impl(head, scale, dh, s.eps, tmp);
        rotary(tmp, c, sn, dh, out);
      } else {
        rotary(head, c, sn, dh, out);
      }
    };
    for (int64_t j = 0; j < H; ++j) norm_rotate(row + j * dh, w.q_norm, q + (r * H + j) * dh);
    if (!writes) return;
    for (int64_t g = 0; g < kvh; ++g) {
      const int64_t slot = ((rows.rowb[r] * kvh + g) * cache.S + rows.write_pos[r]) * dh;
      norm_rotate(row + (H + g) * dh, w.k_norm, cache.k + slot);
      std::memcpy(cache.v + slot, row + (H + kvh + g) * dh, dh * sizeof(float));
    }
  });
  Attention a{q, cache.k, cache.v, H, kvh, cache.S, dh, s.query_scale, s.attn_softcap, rows.rowb, rows.lo,
              rows.hi, att};
  attention(a, N, threads);
  packed_matmul(w.o_proj, att, N, o, threads, s.chunk_bytes);
  for_rows(N, d, threads, [&](int64_t r) {
    float* xr = x + r * d;
    add_residual(xr, o + r * d, w.post_attn_norm, d, s.eps, h + r * d);
    rms_norm_impl(xr, w.mlp_norm, d, s.eps, h + r * d);
  });
  packed_matmul(w.gate_up, h, N, gu, threads, s.chunk_bytes);
  for_rows(N, inter, threads, [&](int64_t r) {
    const float* g = gu + r * 2 * inter;
    if (s.activation == SILU) silu_mul(g, g + inter, inter, act + r * inter);
    else gelu_mul(g, g + inter, inter, act + r * inter);
  });
  packed_matmul(w.down, act, N, o, threads, s.chunk_bytes);
  for_rows(N, d, threads, [&](int64_t r) {
    float* xr = x + r * d;
    add_residual(xr, o + r * d, w.post_mlp_norm, d, s.eps, h + r * d);
    if (w.output_scale != 1.f)
      for (int64_t i = 0; i < d; ++i) xr[i] = xr[i] * w.output_scale;
  });
}

}  // namespace mtp
