// The fused stacks over the one layer body (layer.h), and their typed parameters.
//
// TargetStack: embedding -> every decoder layer (writing K/V into the cache) -> final norm, for
// rows with their own positions and cache slots. DraftStack: one step of the MTP drafter
// (pre-projection -> query-only layers over target layers' caches -> norm -> post-projection ->
// optional out norm) and its clustered LM head. Python fills the parameter structs by field name
// (mtpspec/fused.py); the constructors check every shape and say which field is wrong.
#pragma once

#include <pybind11/pybind11.h>
#include <torch/types.h>

#include <optional>
#include <string>
#include <vector>

#include "layer.h"
#include "screen.h"

namespace mtp {

struct PackedWeight {  // an ops.PackedLinear's buffers and shape
  torch::Tensor packed, scales;
  int64_t fmt = 0, out_features = 0, in_features = 0, group_size = 0;
  PackedRef ref() const;
};

struct LayerParams {  // one decoder layer; norm scales have the offset applied
  PackedWeight qkv, o_proj, gate_up, down;
  std::optional<torch::Tensor> qkv_bias;                                   // [qkv rows]
  torch::Tensor attn_norm_scale, mlp_norm_scale;                           // [d]
  std::optional<torch::Tensor> post_attn_norm_scale, post_mlp_norm_scale;  // [d] (sandwich)
  std::optional<torch::Tensor> q_norm_scale, k_norm_scale;                 // [head_dim]
  bool is_global = true;
  int64_t sliding_window = 0;  // sliding layers see this many slots back (0: all)
  int64_t cache_layer = -1;    // cache layer it writes (target) or reads (draft)
  double output_scale = 1.0;   // x *= output_scale after the layer
};

struct StackParams {  // what every layer shares, the layers, and the final norm
  int64_t hidden_size = 0, num_heads = 0, num_kv_heads = 0, head_dim = 0, intermediate_size = 0;
  std::string activation = "gelu_tanh";  // or "silu"
  double rms_norm_eps = 1e-6, query_scale = 1.0, attn_logit_softcap = 0.0, embed_scale = 1.0;
  int64_t chunk_bytes = 64 * 1024;
  PackedWeight embed;            // token embedding [V, embedding width]
  torch::Tensor norm_scale;      // [hidden] final norm
  std::vector<LayerParams> layers;
};

struct DraftParams {  // an MTP head: body.embed is the target's embedding, body.norm_scale its norm
  StackParams body;
  int64_t target_hidden = 0;
  PackedWeight pre_projection, post_projection;  // [d_draft, 2 d_target], [d_target, d_draft]
  std::optional<torch::Tensor> out_norm_scale;   // [d_target]; none: no norm after post_projection
  // clustered LM head (optional): centroids [C, d_target], cluster members [C, size] (token ids),
  // and, unless the head reads the target's argmax screen (use_screen), a cluster-ordered copy
  // of the embedding [C * padded size, d_target]
  std::optional<PackedWeight> centroids, ordered_embed;
  torch::Tensor cluster_ids;
  int64_t top_clusters = 0, cluster_size = 0, cluster_padded = 0;
};

struct RopeTables {  // cos/sin [len, head_dim] of global and sliding layers
  torch::Tensor cos_global, sin_global, cos_local, sin_local;
};

// a stack's checked view of its parameters
struct Layers {
  LayerShape shape{};
  std::vector<LayerWeights> weights;
  std::vector<LayerParams> params;  // keeps the tensors alive
  void check(const StackParams& p, bool query_only, int64_t input_width);
};

class TargetStack {
 public:
  explicit TargetStack(const StackParams& p);
  // tokens, positions [B, T] int64 -> hidden states after the final norm [B, T, d]; writes each
  // row's K/V at its position of the cache [L, B, kv_heads, S, head_dim]
  torch::Tensor forward(torch::Tensor tokens, torch::Tensor positions, torch::Tensor cache_k,
                        torch::Tensor cache_v, const RopeTables& rope, int64_t threads);

 private:
  StackParams p_;
  Layers layers_;
};

class DraftStack {
 public:
  explicit DraftStack(const DraftParams& p);
  // tokens [B] (embedded with the target's table), hidden [B, dt], query positions [B] (rotary),
  // context_end [B] (visible slots < end, and within the window on sliding layers) -> h' [B, dt]
  torch::Tensor step(torch::Tensor tokens, torch::Tensor hidden, torch::Tensor query_pos,
                     torch::Tensor context_end, torch::Tensor cache_k, torch::Tensor cache_v,
                     const RopeTables& rope, int64_t threads);
  // the clustered head reads the target's argmax screen instead of a copy of its own
  void use_screen(torch::Tensor u, torch::Tensor scale, torch::Tensor beta);
  // h [B, dt] -> [best token [B], and when want_logits: logits [B, m*S], token ids [B, m*S]]
  std::vector<torch::Tensor> clustered(torch::Tensor hidden, bool want_logits, int64_t threads);

 private:
  DraftParams p_;
  Layers layers_;
  bool clustered_ = false;
  torch::Tensor screen_u_, screen_scale_, screen_beta_;
};

}  // namespace mtp
