// The fused stacks of stacks.h. Inputs are checked with the GIL held; the work runs without it.
#include "stacks.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>

#include "attention.h"
#include "thread_pool.h"

namespace mtp {
namespace {

std::string name_of(const char* what, int64_t layer) {
  return layer < 0 ? std::string(what) : "layer " + std::to_string(layer) + " " + what;
}

const float* vec_of(const torch::Tensor& t, int64_t n, const std::string& what) {
  TORCH_CHECK(t.defined() && t.scalar_type() == torch::kFloat && t.is_contiguous() && t.device().is_cpu() &&
                  t.dim() == 1 && t.numel() == n,
              what, ": expected a contiguous float32 CPU vector of ", n, " values");
  return t.data_ptr<float>();
}

const float* opt_vec(const std::optional<torch::Tensor>& t, int64_t n, const std::string& what) {
  return t.has_value() && t->defined() ? vec_of(*t, n, what) : nullptr;
}

PackedRef checked(const PackedWeight& w, int64_t N, int64_t K, const std::string& what) {
  TORCH_CHECK(w.out_features == N && w.in_features == K, what, ": expected [", N, ", ", K, "], got [",
              w.out_features, ", ", w.in_features, "]");
  return w.ref();
}

const int64_t* long_data(const torch::Tensor& t, int64_t n, const char* what) {
  TORCH_CHECK(t.scalar_type() == torch::kLong && t.is_contiguous() && t.numel() == n, what);
  return t.data_ptr<int64_t>();
}

void check_cache(const torch::Tensor& k, const torch::Tensor& v, int64_t layers, int64_t batch, int64_t kvh,
                 int64_t dh) {
  for (const auto& c : {k, v})
    TORCH_CHECK(c.scalar_type() == torch::kFloat && c.is_contiguous() && c.device().is_cpu() && c.dim() == 5 &&
                    c.size(0) >= layers && c.size(1) >= batch && c.size(2) == kvh && c.size(4) == dh,
                "cache must be contiguous float32 [L, B, kv_heads, S, head_dim] on the CPU");
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v caches differ in shape");
}

struct Tables { const float *cos_g, *sin_g, *cos_l, *sin_l; int64_t len; };

Tables tables_of(const RopeTables& t, int64_t dh) {
  for (const auto* x : {&t.cos_global, &t.sin_global, &t.cos_local, &t.sin_local})
    TORCH_CHECK(x->defined() && x->scalar_type() == torch::kFloat && x->is_contiguous() && x->dim() == 2 &&
                    x->size(1) == dh,
                "rope tables must be contiguous float32 [len, head_dim]");
  TORCH_CHECK(t.cos_global.sizes() == t.sin_global.sizes() && t.cos_local.sizes() == t.sin_local.sizes(),
              "cos and sin tables differ");
  return {t.cos_global.data_ptr<float>(), t.sin_global.data_ptr<float>(), t.cos_local.data_ptr<float>(),
          t.sin_local.data_ptr<float>(), std::min(t.cos_global.size(0), t.cos_local.size(0))};
}

std::unique_ptr<float[]> scratch(int64_t n) { return std::unique_ptr<float[]>(new float[std::max<int64_t>(n, 8)]); }

// visible slots of sliding layer rows: [max(0, hi - window + extra), hi)
void sliding_lo(const std::vector<int64_t>& hi, int64_t window, int64_t extra, std::vector<int64_t>& lo) {
  for (size_t r = 0; r < hi.size(); ++r) lo[r] = std::max<int64_t>(0, hi[r] - window + extra);
}

}  // namespace

PackedRef PackedWeight::ref() const {
  TORCH_CHECK(packed.defined() && packed.is_contiguous() && packed.device().is_cpu(),
              "packed weight must be a contiguous CPU tensor");
  TORCH_CHECK(fmt >= F32 && fmt <= I4, "unknown packed format ", fmt);
  const int64_t panels = (out_features + 15) / 16;
  const int64_t esize = fmt == F32 ? 4 : fmt == BF16 ? 2 : 1;
  const int64_t lanes = fmt == I4 ? 8 : 16;
  TORCH_CHECK(packed.numel() * packed.element_size() == panels * in_features * lanes * esize,
              "packed weight holds ", packed.numel() * packed.element_size(), " bytes, not the ",
              panels * in_features * lanes * esize, " of [", out_features, ", ", in_features, "]");
  if (fmt == I8) TORCH_CHECK(scales.numel() >= out_features && scales.scalar_type() == torch::kFloat, "int8 scales");
  if (fmt == I4) {
    TORCH_CHECK(group_size > 0, "int4 group size");
    TORCH_CHECK(scales.numel() == panels * ((in_features + group_size - 1) / group_size) * 32 &&
                    scales.scalar_type() == torch::kHalf, "int4 scales");
  }
  return PackedRef{(const uint8_t*)packed.data_ptr(), scales.defined() && scales.numel() ? scales.data_ptr() : nullptr,
                   (int)fmt, out_features, in_features, group_size};
}

void Layers::check(const StackParams& p, bool query_only, int64_t input_width) {
  const int64_t d = p.hidden_size, H = p.num_heads, kvh = p.num_kv_heads, dh = p.head_dim, inter = p.intermediate_size;
  TORCH_CHECK(d > 0 && H > 0 && kvh > 0 && inter > 0, "hidden, heads, kv heads and MLP width must be positive");
  TORCH_CHECK(dh % 8 == 0 && dh <= kMaxHeadDim && dh > 0, "head_dim must be a multiple of 8 up to ", kMaxHeadDim);
  TORCH_CHECK(H % kvh == 0, "num_heads must be a multiple of num_kv_heads");
  TORCH_CHECK(p.activation == "gelu_tanh" || p.activation == "silu", "activation must be gelu_tanh or silu, got ",
              p.activation);
  TORCH_CHECK(p.attn_logit_softcap >= 0.0, "attn_logit_softcap must be >= 0");
  TORCH_CHECK(p.embed.in_features == input_width, "embedding width ", p.embed.in_features, " != ", input_width);
  p.embed.ref();
  vec_of(p.norm_scale, d, "norm_scale");
  TORCH_CHECK(!p.layers.empty(), "a stack needs layers");
  shape = LayerShape{d, H, kvh, dh, inter, p.activation == "silu" ? SILU : GELU_TANH, (float)p.rms_norm_eps,
                     (float)p.query_scale, (float)p.attn_logit_softcap, p.chunk_bytes};
  params = p.layers;
  const int64_t qkv = (H + (query_only ? 0 : 2 * kvh)) * dh;
  for (size_t i = 0; i < params.size(); ++i) {
    const LayerParams& l = params[i];
    const int64_t li = (int64_t)i;
    TORCH_CHECK(l.cache_layer >= 0, name_of("cache_layer", li), " must be set");
    TORCH_CHECK(l.is_global || l.sliding_window > 0, name_of("sliding_window", li), " must be > 0 on a sliding layer");
    TORCH_CHECK(query_only || !l.k_norm_scale.has_value() || l.q_norm_scale.has_value(),
                name_of("k_norm_scale", li), " without q_norm_scale");
    TORCH_CHECK(l.post_attn_norm_scale.has_value() == l.post_mlp_norm_scale.has_value(),
                name_of("sandwich norms", li), ": give both post-attention and post-MLP scales or neither");
    LayerWeights w{};
    w.qkv = checked(l.qkv, qkv, d, name_of(query_only ? "qkv (query-only: q)" : "qkv", li));
    w.o_proj = checked(l.o_proj, d, H * dh, name_of("o_proj", li));
    w.gate_up = checked(l.gate_up, 2 * inter, d, name_of("gate_up", li));
    w.down = checked(l.down, d, inter, name_of("down", li));
    w.qkv_bias = opt_vec(l.qkv_bias, qkv, name_of("qkv_bias", li));
    w.attn_norm = vec_of(l.attn_norm_scale, d, name_of("attn_norm_scale", li));
    w.mlp_norm = vec_of(l.mlp_norm_scale, d, name_of("mlp_norm_scale", li));
    w.post_attn_norm = opt_vec(l.post_attn_norm_scale, d, name_of("post_attn_norm_scale", li));
    w.post_mlp_norm = opt_vec(l.post_mlp_norm_scale, d, name_of("post_mlp_norm_scale", li));
    w.q_norm = opt_vec(l.q_norm_scale, dh, name_of("q_norm_scale", li));
    w.k_norm = query_only ? nullptr : opt_vec(l.k_norm_scale, dh, name_of("k_norm_scale", li));
    w.output_scale = (float)l.output_scale;
    weights.push_back(w);
  }
}

// ---- the target's decoder stack

TargetStack::TargetStack(const StackParams& p) : p_(p) {
  layers_.check(p_, false, p_.hidden_size);
  for (size_t i = 0; i < p_.layers.size(); ++i)
    TORCH_CHECK(p_.layers[i].cache_layer == (int64_t)i, "target layer ", i, " must own cache layer ", i);
}

torch::Tensor TargetStack::forward(torch::Tensor tokens, torch::Tensor positions, torch::Tensor cache_k,
                                   torch::Tensor cache_v, const RopeTables& rope, int64_t threads) {
  TORCH_CHECK(tokens.dim() == 2 && positions.sizes() == tokens.sizes(), "tokens and positions: [B, T]");
  const LayerShape& s = layers_.shape;
  const int64_t B = tokens.size(0), T = tokens.size(1), N = B * T, d = s.d, L = (int64_t)layers_.weights.size();
  const int64_t* tok = long_data(tokens, N, "tokens: contiguous int64");
  const int64_t* pos = long_data(positions, N, "positions: contiguous int64");
  check_cache(cache_k, cache_v, L, B, s.kvh, s.dh);
  const Tables rt = tables_of(rope, s.dh);
  const int64_t S = cache_k.size(3);
  const PackedRef emb = p_.embed.ref();
  for (int64_t r = 0; r < N; ++r) {
    TORCH_CHECK(pos[r] >= 0 && pos[r] < S && pos[r] < rt.len, "position outside the cache or rope tables");
    TORCH_CHECK(tok[r] >= 0 && tok[r] < emb.N, "token id out of range");
  }
  auto out = torch::empty({B, T, d}, torch::kFloat);
  float* op = out.data_ptr<float>();
  float* kc = cache_k.data_ptr<float>();
  float* vc = cache_v.data_ptr<float>();
  const int64_t layer_stride = cache_k.stride(0);
  const float* final_norm = p_.norm_scale.data_ptr<float>();
  pybind11::gil_scoped_release no_gil;
  std::vector<int64_t> rowb(N), lo_g(N, 0), lo_l(N), hi(N);
  for (int64_t r = 0; r < N; ++r) {
    rowb[r] = r / T;
    hi[r] = pos[r] + 1;
  }
  auto x = scratch(N * d);
  LayerScratch buf(N, s);
  const float scale = (float)p_.embed_scale;
  for_rows(N, d, threads, [&](int64_t r) {
    float* xr = x.get() + r * d;
    packed_row(emb, tok[r], xr);
    if (scale != 1.f)
      for (int64_t i = 0; i < d; ++i) xr[i] = xr[i] * scale;
  });
  for (int64_t l = 0; l < L; ++l) {
    const LayerParams& lp = layers_.params[l];
    const bool glob = lp.is_global;
    if (!glob) sliding_lo(hi, lp.sliding_window, 0, lo_l);  // slots > pos - window
    LayerRows rows{N, pos, rowb.data(), pos, glob ? lo_g.data() : lo_l.data(), hi.data(),
                   glob ? rt.cos_g : rt.cos_l, glob ? rt.sin_g : rt.sin_l};
    LayerCache cache{kc + l * layer_stride, vc + l * layer_stride, S};
    decoder_layer(s, layers_.weights[l], rows, cache, x.get(), buf, threads);
  }
  for_rows(N, d, threads, [&](int64_t r) { rms_norm(x.get() + r * d, final_norm, d, s.eps, op + r * d); });
  return out;
}

// ---- one step of the MTP drafter, and its clustered LM head

DraftStack::DraftStack(const DraftParams& p) : p_(p) {
  const int64_t dt = p_.target_hidden, dd = p_.body.hidden_size;
  layers_.check(p_.body, true, dt);
  checked(p_.pre_projection, dd, 2 * dt, "pre_projection");
  checked(p_.post_projection, dt, dd, "post_projection");
  opt_vec(p_.out_norm_scale, dt, "out_norm_scale");
  if (p_.centroids.has_value()) {
    const int64_t C = p_.centroids->out_features;
    checked(*p_.centroids, C, dt, "centroids");
    TORCH_CHECK(p_.cluster_padded % 16 == 0 && p_.cluster_size >= 1 && p_.cluster_size <= p_.cluster_padded &&
                    p_.top_clusters >= 1 && p_.top_clusters <= C, "clustered head: cluster sizes or top clusters");
    long_data(p_.cluster_ids, C * p_.cluster_size, "cluster_ids: contiguous int64 [C, cluster_size]");
    if (p_.ordered_embed.has_value()) {
      checked(*p_.ordered_embed, C * p_.cluster_padded, dt, "ordered_embed");
      clustered_ = true;
    }
  }
}

torch::Tensor DraftStack::step(torch::Tensor tokens, torch::Tensor hidden, torch::Tensor query_pos,
                               torch::Tensor context_end, torch::Tensor cache_k, torch::Tensor cache_v,
                               const RopeTables& rope, int64_t threads) {
  const LayerShape& s = layers_.shape;
  const int64_t B = tokens.numel(), dt = p_.target_hidden, dd = s.d;
  const int64_t* tok = long_data(tokens, B, "tokens: contiguous int64 [B]");
  const int64_t* qp = long_data(query_pos, B, "query positions: contiguous int64 [B]");
  const int64_t* end = long_data(context_end, B, "context end: contiguous int64 [B]");
  TORCH_CHECK(hidden.scalar_type() == torch::kFloat && hidden.is_contiguous() && hidden.numel() == B * dt,
              "hidden: contiguous float32 [B, d]");
  int64_t layers = 0;
  for (const auto& l : layers_.params) layers = std::max(layers, l.cache_layer + 1);
  check_cache(cache_k, cache_v, layers, B, s.kvh, s.dh);
  const Tables rt = tables_of(rope, s.dh);
  const int64_t S = cache_k.size(3);
  const PackedRef emb = p_.body.embed.ref();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(qp[b] >= 0 && qp[b] < rt.len && end[b] >= 0 && end[b] <= S, "position outside the cache or rope tables");
    TORCH_CHECK(tok[b] >= 0 && tok[b] < emb.N, "token id out of range");
  }
  auto out = torch::empty({B, dt}, torch::kFloat);
  const float* hid = hidden.data_ptr<float>();
  float* op = out.data_ptr<float>();
  float* kc = cache_k.data_ptr<float>();
  float* vc = cache_v.data_ptr<float>();
  const int64_t layer_stride = cache_k.stride(0);
  const PackedRef pre = p_.pre_projection.ref(), post = p_.post_projection.ref();
  const float* norm = p_.body.norm_scale.data_ptr<float>();
  const float* out_norm = p_.out_norm_scale.has_value() ? p_.out_norm_scale->data_ptr<float>() : nullptr;
  pybind11::gil_scoped_release no_gil;
  std::vector<int64_t> rowb(B), lo_g(B, 0), lo_l(B), hi(B);
  for (int64_t b = 0; b < B; ++b) {
    rowb[b] = b;
    hi[b] = end[b];
  }
  auto xin = scratch(B * 2 * dt), x = scratch(B * dd), h = scratch(B * dd), y = scratch(B * dt);
  LayerScratch buf(B, s);
  const float scale = (float)p_.body.embed_scale;
  for (int64_t b = 0; b < B; ++b) {
    float* xr = xin.get() + b * 2 * dt;
    packed_row(emb, tok[b], xr);
    if (scale != 1.f)
      for (int64_t i = 0; i < dt; ++i) xr[i] = xr[i] * scale;
    std::memcpy(xr + dt, hid + b * dt, dt * sizeof(float));
  }
  packed_matmul(pre, xin.get(), B, x.get(), threads, s.chunk_bytes);
  for (size_t l = 0; l < layers_.weights.size(); ++l) {
    const LayerParams& lp = layers_.params[l];
    const bool glob = lp.is_global;
    if (!glob) sliding_lo(hi, lp.sliding_window, 1, lo_l);  // slots > end - window: the target's window at end
    LayerRows rows{B, qp, rowb.data(), nullptr, glob ? lo_g.data() : lo_l.data(), hi.data(),
                   glob ? rt.cos_g : rt.cos_l, glob ? rt.sin_g : rt.sin_l};
    LayerCache cache{kc + lp.cache_layer * layer_stride, vc + lp.cache_layer * layer_stride, S};
    decoder_layer(s, layers_.weights[l], rows, cache, x.get(), buf, threads);
  }
  for (int64_t b = 0; b < B; ++b) rms_norm(x.get() + b * dd, norm, dd, s.eps, h.get() + b * dd);
  if (out_norm == nullptr) {
    packed_matmul(post, h.get(), B, op, threads, s.chunk_bytes);
  } else {
    packed_matmul(post, h.get(), B, y.get(), threads, s.chunk_bytes);
    for (int64_t b = 0; b < B; ++b) rms_norm(y.get() + b * dt, out_norm, dt, s.eps, op + b * dt);
  }
  return out;
}

void DraftStack::use_screen(torch::Tensor u, torch::Tensor scale, torch::Tensor beta) {
  TORCH_CHECK(p_.centroids.has_value(), "this drafter has no clustered head");
  const int64_t C = p_.centroids->out_features, rows = C * p_.cluster_padded;
  TORCH_CHECK(u.dim() == 5 && u.scalar_type() == torch::kUInt8 && u.is_contiguous() && u.size(0) * 16 == rows &&
                  u.size(2) * 4 >= p_.target_hidden && scale.numel() == rows && beta.numel() == rows &&
                  scale.scalar_type() == torch::kFloat && beta.scalar_type() == torch::kFloat,
              "the screen does not hold this drafter's clusters");
  screen_u_ = u; screen_scale_ = scale; screen_beta_ = beta;
  clustered_ = true;
}

std::vector<torch::Tensor> DraftStack::clustered(torch::Tensor hidden, bool want_logits, int64_t threads) {
  TORCH_CHECK(clustered_, "this drafter has no clustered head");
  const int64_t dt = p_.target_hidden;
  TORCH_CHECK(hidden.scalar_type() == torch::kFloat && hidden.is_contiguous() && hidden.dim() == 2 &&
                  hidden.size(1) == dt, "hidden: contiguous float32 [B, d]");
  const int64_t B = hidden.size(0), csize = p_.cluster_size, cpad = p_.cluster_padded;
  const PackedRef cent = p_.centroids->ref();
  const bool shared = screen_u_.defined();
  const int64_t C = cent.N, m = p_.top_clusters;
  auto best = torch::empty({B}, torch::kLong);
  auto logits = want_logits ? torch::empty({B, m * csize}, torch::kFloat) : torch::empty({0}, torch::kFloat);
  auto ids = want_logits ? torch::empty({B, m * csize}, torch::kLong) : torch::empty({0}, torch::kLong);
  const float* h = hidden.data_ptr<float>();
  const int64_t* members = p_.cluster_ids.data_ptr<int64_t>();
  float* lp = want_logits ? logits.data_ptr<float>() : nullptr;
  int64_t* ip = want_logits ? ids.data_ptr<int64_t>() : nullptr;
  int64_t* bp = best.data_ptr<int64_t>();
  screen::Copy copy{};
  if (shared)
    copy = screen::Copy{screen_u_.data_ptr<uint8_t>(), screen_scale_.data_ptr<float>(), screen_beta_.data_ptr<float>(),
                        screen_u_.size(0), screen_u_.size(2) * 4};
  const PackedRef emb = shared ? PackedRef{} : p_.ordered_embed->ref();
  const int64_t chunk = p_.body.chunk_bytes;
  pybind11::gil_scoped_release no_gil;
  auto scores = scratch(B * C);
  packed_matmul(cent, h, B, scores.get(), threads, chunk);
  std::vector<int64_t> chosen(B * m), order(C);
  for (int64_t b = 0; b < B; ++b) {
    const float* sc = scores.get() + b * C;
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + m, order.end(), [&](int64_t i, int64_t j) {
      return sc[i] > sc[j] || (sc[i] == sc[j] && i < j);
    });
    std::copy(order.begin(), order.begin() + m, chosen.begin() + b * m);
  }
  auto sub = scratch(B * m * cpad);
  const int64_t panels = cpad / 16;
  float* sp = sub.get();
  if (shared) {
    const int64_t Kp = copy.Kp, ng = Kp / 32;
    std::vector<int8_t> a(B * Kp);
    std::vector<int32_t> corr(B * ng);
    std::vector<float> sc(B * ng), radius(B);
    screen::quantize_rows(h, B, dt, Kp, a.data(), corr.data(), sc.data(), radius.data());
    parallel_for(B * m, threads, [&](int64_t t) {
      const int64_t b = t / m, c = chosen[t];
      for (int64_t q = 0; q < panels; ++q)
        screen::panel_estimates(copy, a.data() + b * Kp, corr.data() + b * ng, sc.data() + b * ng, radius.data() + b,
                                c * panels + q, sp + t * cpad + q * 16);
    });
  } else {
    parallel_for(B * m, threads, [&](int64_t t) {
      const int64_t b = t / m, c = chosen[t];
      packed_panels(emb, h + b * dt, c * panels, (c + 1) * panels, sp + t * cpad, c * cpad);
    });
  }
  for (int64_t b = 0; b < B; ++b) {
    float top = -std::numeric_limits<float>::infinity();
    int64_t arg = -1;
    for (int64_t i = 0; i < m; ++i) {
      const int64_t c = chosen[b * m + i];
      const float* v = sp + (b * m + i) * cpad;
      for (int64_t j = 0; j < csize; ++j)
        if (v[j] > top || arg < 0) { top = v[j]; arg = members[c * csize + j]; }
      if (want_logits) {
        std::memcpy(lp + (b * m + i) * csize, v, csize * sizeof(float));
        std::memcpy(ip + (b * m + i) * csize, members + c * csize, csize * sizeof(int64_t));
      }
    }
    bp[b] = arg;
  }
  return {best, logits, ids};
}

}  // namespace mtp
