// Python bindings of the native kernels (the module mtpspec/native.py builds and loads).
// Every long call runs without the GIL: the stacks release it after checking their inputs, the
// plain ops below take pybind11's call guard (they touch no Python object).
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/types.h>

#include <vector>

#include "attention.h"
#include "layer.h"
#include "packed.h"
#include "screen.h"
#include "stacks.h"
#include "thread_pool.h"

namespace py = pybind11;
using mtp::PackedWeight;

namespace {

torch::Tensor packed_linear(torch::Tensor x, const PackedWeight& w, int64_t threads, int64_t chunk_bytes) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x: contiguous float32 [M, K]");
  TORCH_CHECK(x.size(1) == w.in_features, "x has ", x.size(1), " columns, the weight ", w.in_features);
  const mtp::PackedRef p = w.ref();
  auto y = torch::empty({x.size(0), p.N}, x.options());
  mtp::packed_matmul(p, x.data_ptr<float>(), x.size(0), y.data_ptr<float>(), threads, chunk_bytes);
  return y;
}

torch::Tensor packed_rows(torch::Tensor idx, const PackedWeight& w) {
  TORCH_CHECK(idx.scalar_type() == torch::kLong && idx.is_contiguous(), "row ids: contiguous int64");
  const mtp::PackedRef p = w.ref();
  const int64_t L = idx.numel();
  const int64_t* ids = idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < L; ++i) TORCH_CHECK(ids[i] >= 0 && ids[i] < p.N, "row index out of range");
  auto out = torch::empty({L, p.K}, torch::kFloat);
  float* o = out.data_ptr<float>();
  for (int64_t i = 0; i < L; ++i) mtp::packed_row(p, ids[i], o + i * p.K);
  return out;
}

// rows x [M, K] -> (argmax token [M], candidates per row [M]); see mtpspec/screen.py
std::vector<torch::Tensor> screen_argmax(torch::Tensor x, const PackedWeight& head, torch::Tensor u,
                                         torch::Tensor scale, torch::Tensor beta, torch::Tensor order,
                                         int64_t threads, int64_t chunk_bytes) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x: contiguous float32 [M, K]");
  TORCH_CHECK(head.fmt == mtp::I8, "the argmax screen needs an int8 head");
  TORCH_CHECK(u.dim() == 5 && u.scalar_type() == torch::kUInt8 && u.is_contiguous(), "screen copy layout");
  const mtp::PackedRef ref = head.ref();
  const int64_t M = x.size(0), K = x.size(1), Kp = u.size(2) * 4, npanels = u.size(0), ntok = npanels * 16;
  TORCH_CHECK(K == ref.K, "x width != head width");
  TORCH_CHECK(M <= mtp::screen::kMaxRows, "at most ", mtp::screen::kMaxRows, " rows per call");
  TORCH_CHECK(Kp % 32 == 0 && Kp >= K && scale.numel() == ntok && beta.numel() == ntok &&
                  scale.scalar_type() == torch::kFloat && beta.scalar_type() == torch::kFloat &&
                  scale.is_contiguous() && beta.is_contiguous(), "screen copy shapes");
  const bool ordered = order.numel() > 0;
  TORCH_CHECK(!ordered || (order.numel() == ntok && order.scalar_type() == torch::kLong && order.is_contiguous()),
              "screen order: int64 [rows]");
  TORCH_CHECK(ordered || ntok >= ref.N, "the screen copy misses tokens");
  auto tokens = torch::empty({M}, torch::kLong);
  auto counts = torch::empty({M}, torch::kLong);
  const mtp::screen::Copy copy{u.data_ptr<uint8_t>(), scale.data_ptr<float>(), beta.data_ptr<float>(), npanels, Kp};
  const int64_t* ord = ordered ? order.data_ptr<int64_t>() : nullptr;
  const float* xp = x.data_ptr<float>();
  int64_t* tp = tokens.data_ptr<int64_t>();
  int64_t* cp = counts.data_ptr<int64_t>();
  {
    py::gil_scoped_release no_gil;
    mtp::screen::argmax(copy, ref, ord, xp, M, K, threads, chunk_bytes, tp, cp);
  }
  return {tokens, counts};
}

// attention of q [N, H, Dh] over one cache layer [Bc, kvh, S, Dh] (for the per-op tests)
torch::Tensor attention_op(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor rowb, torch::Tensor lo,
                           torch::Tensor hi, double scale, double softcap, int64_t threads) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && k.sizes() == v.sizes() && q.size(2) == k.size(3), "shapes");
  for (const auto& t : {q, k, v})
    TORCH_CHECK(t.scalar_type() == torch::kFloat && t.is_contiguous(), "float32 contiguous");
  const int64_t N = q.size(0), H = q.size(1), dh = q.size(2), kvh = k.size(1), S = k.size(2);
  TORCH_CHECK(dh % 8 == 0 && dh <= mtp::kMaxHeadDim && H % kvh == 0, "head layout");
  for (const auto& t : {rowb, lo, hi})
    TORCH_CHECK(t.scalar_type() == torch::kLong && t.is_contiguous() && t.numel() == N, "row ranges: int64 [N]");
  const int64_t *rb = rowb.data_ptr<int64_t>(), *l = lo.data_ptr<int64_t>(), *h = hi.data_ptr<int64_t>();
  for (int64_t r = 0; r < N; ++r)
    TORCH_CHECK(rb[r] >= 0 && rb[r] < k.size(0) && l[r] >= 0 && h[r] <= S, "row range outside the cache");
  auto out = torch::empty({N, H * dh}, torch::kFloat);
  mtp::Attention a{q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), H, kvh, S, dh, (float)scale,
                   (float)softcap, rb, l, h, out.data_ptr<float>()};
  {
    py::gil_scoped_release no_gil;
    mtp::attention(a, N, threads);
  }
  return out;
}

torch::Tensor rms_norm_op(torch::Tensor x, torch::Tensor scale, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x: float32 [M, n]");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat && scale.is_contiguous() && scale.numel() == x.size(1), "scale");
  auto out = torch::empty_like(x);
  for (int64_t r = 0; r < x.size(0); ++r)
    mtp::rms_norm(x.data_ptr<float>() + r * x.size(1), scale.data_ptr<float>(), x.size(1), (float)eps,
                  out.data_ptr<float>() + r * x.size(1));
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<PackedWeight>(m, "PackedWeight")
      .def(py::init([](torch::Tensor packed, torch::Tensor scales, int64_t fmt, int64_t out_features,
                       int64_t in_features, int64_t group_size) {
             PackedWeight w{packed, scales, fmt, out_features, in_features, group_size};
             w.ref();  // checks the buffers against the shape
             return w;
           }),
           py::arg("packed"), py::arg("scales"), py::arg("fmt"), py::arg("out_features"), py::arg("in_features"),
           py::arg("group_size"))
      .def_readonly("fmt", &PackedWeight::fmt)
      .def_readonly("out_features", &PackedWeight::out_features)
      .def_readonly("in_features", &PackedWeight::in_features);
  py::class_<mtp::LayerParams>(m, "LayerParams")
      .def(py::init<>())
      .def_readwrite("qkv", &mtp::LayerParams::qkv)
      .def_readwrite("o_proj", &mtp::LayerParams::o_proj)
      .def_readwrite("gate_up", &mtp::LayerParams::gate_up)
      .def_readwrite("down", &mtp::LayerParams::down)
      .def_readwrite("qkv_bias", &mtp::LayerParams::qkv_bias)
      .def_readwrite("attn_norm_scale", &mtp::LayerParams::attn_norm_scale)
      .def_readwrite("mlp_norm_scale", &mtp::LayerParams::mlp_norm_scale)
      .def_readwrite("post_attn_norm_scale", &mtp::LayerParams::post_attn_norm_scale)
      .def_readwrite("post_mlp_norm_scale", &mtp::LayerParams::post_mlp_norm_scale)
      .def_readwrite("q_norm_scale", &mtp::LayerParams::q_norm_scale)
      .def_readwrite("k_norm_scale", &mtp::LayerParams::k_norm_scale)
      .def_readwrite("is_global", &mtp::LayerParams::is_global)
      .def_readwrite("sliding_window", &mtp::LayerParams::sliding_window)
      .def_readwrite("cache_layer", &mtp::LayerParams::cache_layer)
      .def_readwrite("output_scale", &mtp::LayerParams::output_scale);
  py::class_<mtp::StackParams>(m, "StackParams")
      .def(py::init<>())
      .def_readwrite("hidden_size", &mtp::StackParams::hidden_size)
      .def_readwrite("num_heads", &mtp::StackParams::num_heads)
      .def_readwrite("num_kv_heads", &mtp::StackParams::num_kv_heads)
      .def_readwrite("head_dim", &mtp::StackParams::head_dim)
      .def_readwrite("intermediate_size", &mtp::StackParams::intermediate_size)
      .def_readwrite("activation", &mtp::StackParams::activation)
      .def_readwrite("rms_norm_eps", &mtp::StackParams::rms_norm_eps)
      .def_readwrite("query_scale", &mtp::StackParams::query_scale)
      .def_readwrite("attn_logit_softcap", &mtp::StackParams::attn_logit_softcap)
      .def_readwrite("embed_scale", &mtp::StackParams::embed_scale)
      .def_readwrite("chunk_bytes", &mtp::StackParams::chunk_bytes)
      .def_readwrite("embed", &mtp::StackParams::embed)
      .def_readwrite("norm_scale", &mtp::StackParams::norm_scale)
      .def_readwrite("layers", &mtp::StackParams::layers);
  py::class_<mtp::DraftParams>(m, "DraftParams")
      .def(py::init<>())
      .def_readwrite("body", &mtp::DraftParams::body)
      .def_readwrite("target_hidden", &mtp::DraftParams::target_hidden)
      .def_readwrite("pre_projection", &mtp::DraftParams::pre_projection)
      .def_readwrite("post_projection", &mtp::DraftParams::post_projection)
      .def_readwrite("out_norm_scale", &mtp::DraftParams::out_norm_scale)
      .def_readwrite("centroids", &mtp::DraftParams::centroids)
      .def_readwrite("ordered_embed", &mtp::DraftParams::ordered_embed)
      .def_readwrite("cluster_ids", &mtp::DraftParams::cluster_ids)
      .def_readwrite("top_clusters", &mtp::DraftParams::top_clusters)
      .def_readwrite("cluster_size", &mtp::DraftParams::cluster_size)
      .def_readwrite("cluster_padded", &mtp::DraftParams::cluster_padded);
  py::class_<mtp::RopeTables>(m, "RopeTables")
      .def(py::init([](torch::Tensor cg, torch::Tensor sg, torch::Tensor cl, torch::Tensor sl) {
             return mtp::RopeTables{cg, sg, cl, sl};
           }),
           py::arg("cos_global"), py::arg("sin_global"), py::arg("cos_local"), py::arg("sin_local"));
  py::class_<mtp::TargetStack>(m, "TargetStack")
      .def(py::init<const mtp::StackParams&>())
      .def("forward", &mtp::TargetStack::forward);
  py::class_<mtp::DraftStack>(m, "DraftStack")
      .def(py::init<const mtp::DraftParams&>())
      .def("step", &mtp::DraftStack::step)
      .def("clustered", &mtp::DraftStack::clustered)
      .def("use_screen", &mtp::DraftStack::use_screen);
  m.def("packed_linear", &packed_linear, py::call_guard<py::gil_scoped_release>());
  m.def("packed_rows", &packed_rows, py::call_guard<py::gil_scoped_release>());
  m.def("screen_argmax", &screen_argmax);
  m.def("attention", &attention_op);
  m.def("rms_norm", &rms_norm_op, py::call_guard<py::gil_scoped_release>());
  m.def("set_spin_us", &mtp::pool::set_spin_us);
  m.def("set_backoff_ms", &mtp::pool::set_backoff_ms);
}
