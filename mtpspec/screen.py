"""Exact greedy tokens of the int8 tied LM head without computing every logit ("argmax screen").

What: ``ArgmaxScreen(embed)`` answers ``argmax_n logits[r, n]`` for rows of final hidden states,
where ``logits = embed(hidden)`` is exactly what ``ops.PackedLinear`` (int8) computes, bit for bit,
first index on ties (torch.argmax's rule) - without computing all V logits in float32:
1. screen: every token's logit is estimated with integer arithmetic (activations rounded to 6 bits
   per group of 32 inputs, weights int8 stored offset by 128 in a VNNI-like layout, AVX2
   ``maddubs``/``madd``), together with a rigorous bound on its distance to the exact float32
   logit: ``|approx_n - exact_n| <= beta_n * R_r`` with ``beta_n = s_n * ||q_n||_2`` (the token's
   scale and the norm of its int8 row) and ``R_r = ||e_r||_2 * 1.001 + 1e-4 * ||h_r||_2`` (``e_r``
   the activation rounding error; the second term covers float32 rounding of both sums: K * 2^-24
   is 4e-5 for K = 640, Cauchy-Schwarz for the rest);
2. every token whose upper bound reaches the largest lower bound is a candidate (a handful: see
   ``last_candidates``);
3. candidates' logits are recomputed by the very micro-kernel of the full product (one accumulator
   per output in k order, the same for any row count or panel), so they are the full product's
   bits; the best of them is the argmax, since every other token is strictly below it.

Why: a verification pass over k+1 tokens is arithmetic-bound on 2 cores, and the float32 LM head
(262,144 x 640) is most of it: the integer screen does 32 multiply-adds in 3 instructions where the
float path needs ~6, so the head of a 4-8 row pass costs about one read of its weights again.
Greedy output stays bit-identical to plain decoding (tests/test_screen.py).

Costs: a second copy of the head (V x K bytes, 168 MB for Gemma 3) plus two floats per token. A
clustered MTP drafter on the same target reads this copy for its own LM head (built in its cluster
order, ``ordering``), so speculative decoding holds one extra copy, not two.
Must not: be used where probabilities are needed (sampling needs every logit), or for non-int8
heads; rows with non-finite values go to the full product.
"""
from __future__ import annotations

import torch
from torch import Tensor

from mtpspec import ops
from mtpspec.ops import PackedLinear

GROUP = 32          # inputs per activation scale
MAX_ROWS = 64       # rows per C++ call (its per-chunk bounds live on the stack)

CPP = r"""
// ---- argmax screen (mtpspec/screen.py): integer estimates of every logit, then exact candidates
namespace screen {

// One half panel (8 tokens) for MR rows: approx[r][t] = scale[t] * sum_g sc[r][g] * (sum_k u[t][k] a[r][k] - corr[r][g])
// and lo[r] = max(lo[r], approx - beta[t] * radius[r]).  u: [Kp/4][8][4] uint8 (q + 128);
// a: [MR][Kp] int8; corr, sc: [MR][ng]. The k loop is not unrolled on purpose: unrolled, GCC
// turned the accumulator chains into an addition tree and spilled it.
template <int MR>
__attribute__((noinline)) static void micro(const uint8_t* __restrict u, const int8_t* __restrict a, int64_t Kp,
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

// rows x [M, K] -> a [M, Kp] int8 in [-63, 63] (zero past K), per group of 32: corr = 128 * sum(a),
// sc = max|x| / 63; radius[r] = ||x - a * sc||_2 * 1.001 + 1e-4 * ||x||_2 (see mtpspec/screen.py)
static void quantize_rows(const float* xp, int64_t M, int64_t K, int64_t Kp, int8_t* a, int32_t* corr,
                          float* sc, float* radius) {
  const int64_t ng = Kp / 32;
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
    radius[r] = (float)std::max(1e-30, (std::sqrt(err2) * 1.001 + 1e-4 * std::sqrt(norm2)) * (1.0 + 1e-6));
  }
}

struct Job {
  const uint8_t* u; const float* scale; const float* beta;
  const int8_t* a; const int32_t* corr; const float* sc; const float* radius;
  int64_t M, Kp, ng, ntok, ppc, npanels;
  float* approx;   // [M, ntok]
  float* lo_max;   // [nchunks, M]
};

template <int MR>
static void rows_block(const Job& j, int64_t p, int64_t r0, __m256* lo) {
  for (int half = 0; half < 2; ++half) {
    const int64_t t0 = p * 16 + half * 8;
    micro<MR>(j.u + (p * 2 + half) * (j.Kp / 4) * 32, j.a + r0 * j.Kp, j.Kp, j.corr + r0 * j.ng,
              j.sc + r0 * j.ng, j.ng, j.scale + t0, j.beta + t0, j.radius + r0,
              j.approx + r0 * j.ntok + t0, j.ntok, lo + r0);
  }
}

static void run_chunk(const void* ctx, int64_t c) {
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

// estimates of the 16 tokens of panel p for one quantized row (the drafter's clustered head reads
// the screen's copy of the embedding this way: drafts need no exact logits)
static void panel_estimates(const uint8_t* u, const float* scale, const float* beta, int64_t Kp, const int8_t* a,
                            const int32_t* corr, const float* sc, const float* radius, int64_t p, float* out) {
  __m256 lo = _mm256_setzero_ps();
  for (int half = 0; half < 2; ++half)
    micro<1>(u + (p * 2 + half) * (Kp / 4) * 32, a, Kp, corr, sc, Kp / 32, scale + p * 16 + half * 8,
             beta + p * 16 + half * 8, radius, out + half * 8, 0, &lo);
}

// candidates: tokens whose upper bound reaches their row's largest lower bound, found over
// equal slices of (row, tokens) so that the pool's threads share the scan evenly
struct Scan {
  const Job* job; const float* T; const int64_t* ord; int64_t N, slices;
  std::vector<int64_t>* found;  // [M * slices] token ids
};

static void scan_slice(const void* ctx, int64_t task) {
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

// rows x [M, K] -> (argmax token [M], candidates per row [M]); see mtpspec/screen.py
std::vector<torch::Tensor> screen_argmax(torch::Tensor x, torch::Tensor w, torch::Tensor s, int64_t N,
                                         torch::Tensor u, torch::Tensor scale, torch::Tensor beta,
                                         torch::Tensor order, int64_t threads, int64_t chunk_bytes) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous());
  TORCH_CHECK(w.scalar_type() == torch::kInt8 && w.is_contiguous() && s.is_contiguous());
  TORCH_CHECK(u.dim() == 5 && u.scalar_type() == torch::kUInt8 && u.is_contiguous());
  const int64_t M = x.size(0), K = x.size(1), Kp = u.size(2) * 4, ng = Kp / 32;
  const int64_t npanels = u.size(0), ntok = npanels * 16;
  TORCH_CHECK(M <= 64, "at most 64 rows per call");
  TORCH_CHECK(Kp % 32 == 0 && Kp >= K && scale.numel() == ntok && beta.numel() == ntok);
  const bool ordered = order.numel() > 0;
  TORCH_CHECK(!ordered || (order.numel() == ntok && order.scalar_type() == torch::kLong));
  TORCH_CHECK(ordered || ntok >= N);
  const float* xp = x.data_ptr<float>();

  // 1. activations: per row and group of 32, scale = max|x| / 63, a = round(x / scale)
  std::vector<int8_t> a(M * Kp, 0);
  std::vector<int32_t> corr(M * ng, 0);
  std::vector<float> sc(M * ng, 0.f), radius(M, 0.f);
  quantize_rows(xp, M, K, Kp, a.data(), corr.data(), sc.data(), radius.data());

  // 2. every token's estimate, and the largest lower bound per row and chunk
  const int64_t ppc = std::max<int64_t>(1, chunk_bytes / (Kp * 16));
  const int64_t nchunks = (npanels + ppc - 1) / ppc;
  static std::vector<float> approx;  // reused: a fresh buffer would page-fault on every call
  if ((int64_t)approx.size() < M * ntok) approx.resize(M * ntok);
  std::vector<float> lo_max(nchunks * M);
  Job j{u.data_ptr<uint8_t>(), scale.data_ptr<float>(), beta.data_ptr<float>(), a.data(), corr.data(),
        sc.data(), radius.data(), M, Kp, ng, ntok, ppc, npanels, approx.data(), lo_max.data()};
  pool::run(run_chunk, &j, nchunks, threads);

  // 3. per row: the threshold, candidates, their exact logits
  std::vector<float> T(M, -std::numeric_limits<float>::infinity());
  for (int64_t c = 0; c < nchunks; ++c)
    for (int64_t r = 0; r < M; ++r) T[r] = std::max(T[r], lo_max[c * M + r]);
  const int64_t slices = 16;
  std::vector<std::vector<int64_t>> found(M * slices);
  Scan scan{&j, T.data(), ordered ? order.data_ptr<int64_t>() : nullptr, N, slices, found.data()};
  pool::run(scan_slice, &scan, M * slices, threads);
  // exact logits of the candidates' panels, by the full product's own micro-kernel; the best of
  // them (first token id on ties) is the argmax: every other token is strictly below it
  auto tokens = torch::empty({M}, torch::kLong);
  auto counts = torch::empty({M}, torch::kLong);
  int64_t* tp = tokens.data_ptr<int64_t>();
  int64_t* cp = counts.data_ptr<int64_t>();
  const PackedRef ref = packed_ref(w, s, I8, N, K, 0);
  alignas(32) float out[64];
  std::vector<int64_t> panels;
  for (int64_t r = 0; r < M; ++r) {
    panels.clear();
    for (int64_t slice = 0; slice < slices; ++slice)
      for (int64_t id : found[r * slices + slice]) panels.push_back(id / 16);
    cp[r] = (int64_t)panels.size();
    std::sort(panels.begin(), panels.end());
    panels.erase(std::unique(panels.begin(), panels.end()), panels.end());
    ::Job exact{xp + r * K, 1, K, N, ref.w, ref.s, 0, nullptr, I8, 1, (N + 15) / 16};
    float best = -std::numeric_limits<float>::infinity();
    int64_t arg = -1;
    for (int64_t p : panels) {  // ascending token ids
      ::micro<I8, 1, 1>(exact, p, 0, out);
      for (int64_t lane = 0; lane < 16 && p * 16 + lane < N; ++lane)
        if (out[lane] > best || arg < 0) { best = out[lane]; arg = p * 16 + lane; }
    }
    tp[r] = arg;
  }
  return {tokens, counts};
}

}  // namespace screen
"""


class ArgmaxScreen:
    """Exact argmax of an int8 ``PackedLinear`` head's logits (see the module docstring)."""

    def __init__(self, embed: PackedLinear, ordering: Tensor | None = None, chunk: int = 4096):
        """embed: the int8 tied head; ordering: optional [V'] token ids giving the screen's row
        order (-1: a padding row), e.g. a clustered drafter's cluster order; chunk: tokens packed
        at a time (bounds the temporary memory)."""
        if embed.fmt != "int8":
            raise ValueError(f"the argmax screen needs an int8 head, got {embed.fmt}")
        self.embed = embed
        vocab, k = embed.out_features, embed.in_features
        rows = torch.arange(vocab) if ordering is None else ordering.to(torch.long).cpu()
        total = -(-rows.numel() // 16) * 16
        rows = torch.cat([rows, rows.new_full((total - rows.numel(),), -1)])  # [T]
        kp = -(-k // GROUP) * GROUP
        # [P, 2, Kp/4, 8, 4]: per panel of 16 rows, two halves of 8, each k-quad-major
        self.u = torch.empty(total // 16, 2, kp // 4, 8, 4, dtype=torch.uint8)
        self.scale = torch.zeros(total)  # [T] each row's int8 scale (0: padding)
        self.beta = torch.zeros(total)   # [T] scale * ||q||_2 rounded up (inf: padding)
        for begin in range(0, total, chunk):
            ids = rows[begin:begin + chunk]  # [n], n % 16 == 0
            valid = ids >= 0
            src = ids.clamp(min=0)
            q = embed.packed[src // 16, :, src % 16].to(torch.int16) * valid[:, None]  # [n, K]
            q = torch.nn.functional.pad(q, (0, kp - k))
            u = (q + 128).to(torch.uint8).view(-1, 2, 8, kp // 4, 4).permute(0, 1, 3, 2, 4)
            self.u[begin // 16:(begin + ids.numel()) // 16] = u
            s = torch.where(valid, embed.scales[src].double(), 0.0)
            norm = q.double().pow(2).sum(1).sqrt()
            self.scale[begin:begin + ids.numel()] = s.float()
            beta = torch.where(valid, s * norm * (1 + 1e-6), float("inf"))
            self.beta[begin:begin + ids.numel()] = beta.float()
        self.order = torch.empty(0, dtype=torch.long) if ordering is None else rows  # [T]
        self.last_candidates: Tensor | None = None  # [N] candidates per row of the last call

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.u, self.scale, self.beta, self.order))

    @staticmethod
    def available() -> bool:
        return ops.fused_extension() is not None

    def __call__(self, hidden: Tensor) -> Tensor:
        """hidden [..., d] -> the argmax token of each row's logits [...] (int64)."""
        lead = hidden.shape[:-1]
        x = hidden.reshape(-1, hidden.shape[-1]).to(torch.float32).contiguous()  # [N, d]
        ext = ops.fused_extension()
        if ext is None or not bool(torch.isfinite(x).all()):
            return self.embed(x).argmax(-1).reshape(lead)
        e = self.embed
        tokens, counts = [], []
        for begin in range(0, x.shape[0], MAX_ROWS):  # the C++ call takes up to MAX_ROWS rows
            t, c = ext.screen_argmax(x[begin:begin + MAX_ROWS], e.packed, e.scales,
                                     e.out_features, self.u, self.scale, self.beta, self.order,
                                     ops.get_num_threads(), ops._CHUNK_BYTES)
            tokens.append(t)
            counts.append(c)
        self.last_candidates = torch.cat(counts)
        return torch.cat(tokens).reshape(lead)
