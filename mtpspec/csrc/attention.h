// Attention of query rows over cache slots [lo, hi) of their sequence (GQA, fp32 softmax).
//
// Tiles of up to 16 query rows of one sequence per kv head walk their keys 128 slots at a time
// with running-max rescaling, so a key block is read once per tile; key ranges are split at
// absolute multiples of 256 slots whatever the tiles and threads, so each row sums the same parts
// in the same order alone, in a batch or in a verification block (bit-identical outputs).
#pragma once

#include <cstdint>

namespace mtp {

constexpr int64_t kMaxHeadDim = 512;

struct Attention {
  const float* q;                    // [N, H, Dh], normed and rotated
  const float* kc; const float* vc;  // one layer of the cache: [Bc, kvh, S, Dh]
  int64_t H, kvh, S, Dh;
  float scale;                       // query scale
  float softcap;                     // scores -> softcap * tanh(scores / softcap); 0: off
  const int64_t* rowb; const int64_t* lo; const int64_t* hi;  // per row: cache sequence, slot range
  float* out;                        // [N, H * Dh]
};

// out[r] for the N rows of `a` (head_dim a multiple of 8, at most kMaxHeadDim)
void attention(const Attention& a, int64_t N, int64_t threads);

}  // namespace mtp
