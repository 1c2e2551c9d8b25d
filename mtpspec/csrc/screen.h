// The argmax screen: exact greedy tokens of an int8 head from integer estimates of every logit
// plus a rigorous error bound, and exact recomputation of the few candidates. The bound and its
// proof are in mtpspec/screen.py's docstring; this code must match them line for line.
#pragma once

#include <cstdint>

#include "packed.h"

namespace mtp {
namespace screen {

constexpr int64_t kMaxRows = 64;  // rows per call (per-chunk bounds live on the stack)

struct Copy {  // the screen's copy of the head: see ArgmaxScreen in mtpspec/screen.py
  const uint8_t* u;     // [P, 2, Kp/4, 8, 4] int8 weights + 128, k-quad-major per half panel
  const float* scale;   // [P*16] each row's int8 scale (0: padding)
  const float* beta;    // [P*16] scale * ||q||_2 rounded up (inf: padding)
  int64_t npanels, Kp;  // panels of 16 rows; K padded to whole groups of 32
};

// rows x [M, K] -> a [M, Kp] int8 in [-63, 63] (zero past K), per group of 32: corr = 128 * sum(a),
// sc = max|x| / 63; radius[r]: the bound R_r of mtpspec/screen.py
void quantize_rows(const float* x, int64_t M, int64_t K, int64_t Kp, int8_t* a, int32_t* corr,
                   float* sc, float* radius);

// estimates of the 16 rows of panel p for one quantized row (a drafter's clustered head reads the
// screen's copy this way: drafts need no exact logits)
void panel_estimates(const Copy& c, const int8_t* a, const int32_t* corr, const float* sc,
                     const float* radius, int64_t p, float* out /*[16]*/);

// argmax token and candidate count of each row of x [M <= kMaxRows, K] over the exact logits of
// `head` (int8 [N, K]); order [P*16]: the screen's row -> token id (-1: padding), or null (identity)
void argmax(const Copy& c, const PackedRef& head, const int64_t* order, const float* x, int64_t M,
            int64_t K, int64_t threads, int64_t chunk_bytes, int64_t* tokens, int64_t* counts);

}  // namespace screen
}  // namespace mtp
