// Shared definitions of the native kernels: weight formats, the unroll pragma, the CPU guard.
// Every file here is compiled with -mavx2 -mfma -mf16c; mtpspec/native.py checks the CPU for
// those features before building or loading the extension, and never loads it on a CPU without.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "the mtpspec kernels need -mavx2 -mfma -mf16c (mtpspec/native.py passes them)"
#endif

namespace mtp {

// Packed weight formats (ops.FORMATS order; ops._FMT_CODE)
enum Format { F32 = 0, BF16 = 1, I8 = 2, I4 = 3 };

}  // namespace mtp

#define MTP_UNROLL _Pragma("GCC unroll 16")
