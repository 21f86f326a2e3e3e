// What skinny_matmul.cc and its AVX-512 blocks (bf16_avx512.h) share: the row limit (and bfloat16.h).
#ifndef TRANSFORMER_JAX_KERNELS_SKINNY_LIMITS_H_
#define TRANSFORMER_JAX_KERNELS_SKINNY_LIMITS_H_

#include <cstdint>

#include "bfloat16.h"

namespace transformer_jax {

constexpr int64_t kMaxRows = 8;  // rows of x the kernel takes

}  // namespace transformer_jax

#endif  // TRANSFORMER_JAX_KERNELS_SKINNY_LIMITS_H_
