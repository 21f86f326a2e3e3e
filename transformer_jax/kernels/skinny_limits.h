// What skinny_matmul.cc and its AVX-512 blocks (skinny_avx512.h) share: the row limit, the table prefetch distance
// (and bfloat16.h).
#ifndef TRANSFORMER_JAX_KERNELS_SKINNY_LIMITS_H_
#define TRANSFORMER_JAX_KERNELS_SKINNY_LIMITS_H_

#include <cstdint>

#include "bfloat16.h"

namespace transformer_jax {

constexpr int64_t kMaxRows = 8;  // rows of x the kernel takes
// An (N, K) table's block is read as one stream of rows, which the hardware prefetcher follows only to each 4 KiB
// page's end (a GPT-2 row is 1.5 KiB in bf16, 3 KiB in float32): the row this many ahead is asked for while one is
// summed.
constexpr int64_t kTablePrefetchRows = 4;

}  // namespace transformer_jax

#endif  // TRANSFORMER_JAX_KERNELS_SKINNY_LIMITS_H_
