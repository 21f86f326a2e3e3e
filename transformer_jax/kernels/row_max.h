// A float32 row's maximum and the first position of it, as jnp.argmax finds it: the first of equal maxima, the first
// NaN where the row holds one. Shared by argmax.cc and cross_entropy.cc.
//
// XLA:CPU reduces a (value, index) pair one element at a time, about 1 GB/s. Here one vectorised pass finds the
// maximum and whether a NaN is there, and a second finds its first position, testing a block at a time and scanning
// only the block that holds it: a vectorised min over the indices of a 50,257-row took 15 us (int32) to 29 us
// (int64) on its own, both passes here 10 us (Ice Lake).
#ifndef TRANSFORMER_JAX_KERNELS_ROW_MAX_H_
#define TRANSFORMER_JAX_KERNELS_ROW_MAX_H_

#include <cstdint>

namespace transformer_jax {

constexpr int64_t kScanBlock = 512;  // 2 KiB: the scan after a hit stays short

struct RowMax {
  float value;  // the largest non-NaN value (x[0] when there is none)
  bool nan;     // the row holds a NaN
};

inline RowMax row_max(const float* x, int64_t n) {
  float best = x[0];
  int32_t nan = 0;
#pragma omp simd reduction(max : best) reduction(| : nan)
  for (int64_t i = 0; i < n; ++i) {
    best = x[i] > best ? x[i] : best;
    nan |= x[i] != x[i];
  }
  return {best, nan != 0};
}

// The first i where match(x[i]): a vectorised test of a block at a time, then a scan of the block that holds it.
template <typename Match>
int64_t first_match(const float* x, int64_t n, Match match) {
  for (int64_t start = 0; start < n; start += kScanBlock) {
    const int64_t end = start + kScanBlock < n ? start + kScanBlock : n;
    int32_t hit = 0;
#pragma omp simd reduction(| : hit)
    for (int64_t i = start; i < end; ++i) hit |= match(x[i]);
    if (hit) {
      int64_t i = start;
      while (!match(x[i])) ++i;
      return i;
    }
  }
  return n;
}

// jnp.argmax of the row, given its row_max.
inline int32_t first_index_of(const float* x, int64_t n, RowMax m) {
  if (m.nan) return static_cast<int32_t>(first_match(x, n, [](float v) { return v != v; }));
  const float best = m.value;
  return static_cast<int32_t>(first_match(x, n, [best](float v) { return v == best; }));
}

}  // namespace transformer_jax

#endif  // TRANSFORMER_JAX_KERNELS_ROW_MAX_H_
