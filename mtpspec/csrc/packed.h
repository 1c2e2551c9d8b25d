// Products with packed weights for small row counts (see packed.cpp and mtpspec/ops.py).
//
// Packed weight: panels of 16 output channels, k-major inside a panel.
//   fp32 [P, K, 16] float | bf16 [P, K, 16] uint16 | int8 [P, K, 16] int8 (+ scale [P*16] float)
//   int4 [P, K, 8] bytes, byte j = q(ch j) | q(ch j+8) << 4 (+ [P, ceil(K/G), 2, 16] fp16: scale, offset)
#pragma once

#include <cstdint>

#include "common.h"

namespace mtp {

struct PackedRef {  // raw view of a packed weight [N, K]
  const uint8_t* w;
  const void* s;    // int8: per-channel scales; int4: group scales/offsets; else unused
  int fmt;          // Format
  int64_t N, K, G;  // out features, in features, int4 group size
};

// y [M, N] = x [M, K] @ W.T. Each output element is one float32 FMA chain over k in order (then
// the int8 scale), whatever M, the thread count and the chunking: a row's numbers never depend on
// the other rows of the call (the batch invariance greedy speculative decoding relies on).
void packed_matmul(const PackedRef& p, const float* x, int64_t M, float* y, int64_t threads,
                   int64_t chunk_bytes);

// y[n - n_base] for the output channels n of panels [p0, p1) of one row x [K], on this thread;
// the same numbers as packed_matmul
void packed_panels(const PackedRef& p, const float* x, int64_t p0, int64_t p1, float* y, int64_t n_base);

// row n of W, dequantized exactly as ops.PackedLinear.rows does (no FMA contraction)
void packed_row(const PackedRef& p, int64_t n, float* out /*[K]*/);

}  // namespace mtp
