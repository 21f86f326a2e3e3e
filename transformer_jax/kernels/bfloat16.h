// bfloat16 <-> float32 for the kernels: a bfloat16 is the high half of a float32.
#ifndef TRANSFORMER_JAX_KERNELS_BFLOAT16_H_
#define TRANSFORMER_JAX_KERNELS_BFLOAT16_H_

#include <cstdint>
#include <cstring>

namespace transformer_jax {

inline float widen(uint16_t bits) {
  const uint32_t wide = uint32_t(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof(value));
  return value;
}
inline float widen(float value) { return value; }

// float32 -> T: for bfloat16 (uint16_t) rounded to the nearest, ties to even (as XLA's convert), a NaN staying a
// (quiet) NaN; for float32 the value itself.
template <typename T>
T narrow(float value);
template <>
inline uint16_t narrow<uint16_t>(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  const uint16_t rounded = uint16_t((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
  const uint16_t quiet_nan = uint16_t((bits >> 16) | 0x40u);
  return (bits & 0x7FFFFFFFu) > 0x7F800000u ? quiet_nan : rounded;  // a select, so loops of it vectorise
}
template <>
inline float narrow<float>(float value) {
  return value;
}

}  // namespace transformer_jax

#endif  // TRANSFORMER_JAX_KERNELS_BFLOAT16_H_
