// The decoder-layer body, written once: the target stack and the MTP draft stack both run it.
//
// x -> attn_norm -> packed qkv (+ bias) -> per head: q/k RMSNorm (optional) -> rotary ->
// [target: k, v into the cache] -> attention over the layer's cache (causal / sliding window,
// GQA, optional logit soft-cap) -> packed o_proj -> (post-attention norm) -> + residual ->
// mlp_norm -> packed gate_up -> gelu_tanh(gate) * up or silu(gate) * up -> packed down ->
// (post-MLP norm) -> + residual -> (* output scale). Optional pieces are null pointers.
// Numerics: float32, the Python reference layers' order of operations; no FMA contraction
// outside the packed products and the attention's dot products.
#pragma once

#include <cstdint>
#include <memory>

#include "packed.h"
#include "thread_pool.h"

namespace mtp {

enum Activation { GELU_TANH = 0, SILU = 1 };

struct LayerShape {  // what every layer of a stack shares
  int64_t d, H, kvh, dh, inter;  // hidden, heads, kv heads, head dim, MLP width
  int activation;                // Activation
  float eps, query_scale, attn_softcap;  // attn_softcap 0: none
  int64_t chunk_bytes;           // weight bytes per work item of the packed products
};

struct LayerWeights {  // scales have the norm offset applied; null: the piece is absent
  PackedRef qkv, o_proj, gate_up, down;    // qkv [q + 2kv, d] (target) or [q, d] (query-only)
  const float* qkv_bias;                    // [qkv rows]
  const float* attn_norm; const float* mlp_norm;            // [d]
  const float* post_attn_norm; const float* post_mlp_norm;  // [d] (sandwich norms)
  const float* q_norm; const float* k_norm;                 // [dh]
  float output_scale;                       // x *= output_scale after the layer (1: none)
};

struct LayerRows {  // the rows of one call, for one layer
  int64_t N;
  const int64_t* rope_pos;   // [N] row of the cos/sin tables
  const int64_t* rowb;       // [N] cache sequence of the row
  const int64_t* write_pos;  // [N] cache slot its K/V is written to; null: query-only
  const int64_t* lo; const int64_t* hi;  // [N] visible cache slots [lo, hi)
  const float* cos; const float* sin;    // [len, dh] this layer's rotary tables
};

struct LayerCache { float* k; float* v; int64_t S; };  // one layer: [Bc, kvh, S, dh]

struct LayerScratch {  // buffers for up to N rows
  std::unique_ptr<float[]> h, qkv, q, att, o, gu, act;
  LayerScratch(int64_t N, const LayerShape& s);
};

// x [N, d] <- the layer applied to x
void decoder_layer(const LayerShape& s, const LayerWeights& w, const LayerRows& rows,
                   const LayerCache& cache, float* x, LayerScratch& buf, int64_t threads);

// out = x / rms(x) * scale, as models.gemma3.rms_norm
void rms_norm(const float* x, const float* scale, int64_t n, float eps, float* out);

// f(r) for each of n rows; over the pool when there is enough work to pay for it
template <class F>
void for_rows(int64_t n, int64_t width, int64_t threads, const F& f);

}  // namespace mtp

template <class F>
void mtp::for_rows(int64_t n, int64_t width, int64_t threads, const F& f) {
  const int64_t min_work = 1 << 14;
  if (threads <= 1 || n < 2 || n * width < 2 * min_work) {
    for (int64_t r = 0; r < n; ++r) f(r);
    return;
  }
  const int64_t per = width >= min_work ? 1 : min_work / (width > 0 ? width : 1);
  parallel_for((n + per - 1) / per, threads, [&](int64_t c) {
    for (int64_t r = c * per, end = (c + 1) * per < n ? (c + 1) * per : n; r < end; ++r) f(r);
  });
}
