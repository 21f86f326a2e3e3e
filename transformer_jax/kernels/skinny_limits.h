// What skinny_matmul.cc and its AVX-512 blocks (bf16_avx512.h) share: the row limit and the widening of a bfloat16.
#ifndef TRANSFORMER_JAX_KERNELS_SKINNY_LIMITS_H_
#define TRANSFORMER_JAX_KERNELS_SKINNY_LIMITS_H_

#include <cstdint>
#include <cstring>

namespace transformer_jax {

constexpr int64_t kMaxRows = 8;  // rows of x the kernel takes

// A bfloat16 is the high half of a float32.
inline float widen(uint16_t bits) {
  const uint32_t wide = uint32_t(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof(value));
  return value;
}
inline float widen(float value) { return value; }

}  // namespace transformer_jax

#endif  // TRANSFORMER_JAX_KERNELS_SKINNY_LIMITS_H_
