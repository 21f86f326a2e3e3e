// attention.cc's softmax over a block of query rows: the mask applied and its visible span found, 8 bytes of mask at
// a time, and the exponentials in float32 vectors.
#ifndef TRANSFORMER_JAX_KERNELS_ATTENTION_SOFTMAX_H_
#define TRANSFORMER_JAX_KERNELS_ATTENTION_SOFTMAX_H_

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "attention_products.h"
#include "float_buffers.h"

namespace transformer_jax {

constexpr float kInf = std::numeric_limits<float>::infinity();

// kLanes mask bytes as 32-bit lanes, widened by one instruction (vpmovzxbd): a vector conversion of the bytes
// compiles to a byte-at-a-time unpacking, which cost more than the softmax's exponentials.
inline ivec widen_bytes(const uint8_t* bytes) {
#if defined(__AVX512F__)
  return ivec(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes))));
#else
  return ivec(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes))));
#endif
}

// x[0:n] = scale x where visible (visible[j] != 0), -inf where masked; returns the largest visible one (-inf if none).
// `scale` is the factor a product kind left for this pass to apply (ProductsFor's logit_scale).
inline float mask_row(float* x, const uint8_t* visible, int64_t n, float scale) {
  const vec hidden = splat(-kInf), factor = splat(scale);
  vec top = hidden;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const vec masked = widen_bytes(visible + j) != 0 ? load(x + j) * factor : hidden;
    store(x + j, masked);
    top = top > masked ? top : masked;
  }
  float largest = -kInf;
  for (int64_t l = 0; l < kLanes; ++l) largest = std::max(largest, top[l]);
  for (; j < n; ++j) {
    x[j] = visible[j] ? x[j] * scale : -kInf;
    largest = std::max(largest, x[j]);
  }
  return largest;
}

// x[0:n] = exp(x[0:n] - shift) (0 where x is -inf); returns their sum.
inline float exp_row(float* x, int64_t n, float shift) {
  vec total{};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const vec e = exp(load(x + j) - shift);
    store(x + j, e);
    total += e;
  }
  float sum = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) sum += total[l];
  for (; j < n; ++j) {
    x[j] = std::exp(x[j] - shift);
    sum += x[j];
  }
  return sum;
}

// x[0:n] = exp(scale x - lse) where visible, 0 where masked: a row's probabilities again from its saved log-sum-exp,
// in one pass (the backward's; the forward's mask_row and exp_row are two because the maximum comes between).
inline void probabilities_row(float* x, const uint8_t* visible, int64_t n, float scale, float lse) {
  const vec factor = splat(scale), shift = splat(lse), zero = splat(0.0f);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const vec e = exp(load(x + j) * factor - shift);
    store(x + j, widen_bytes(visible + j) != 0 ? e : zero);
  }
  for (; j < n; ++j) x[j] = visible[j] ? std::exp(x[j] * scale - lse) : 0.0f;
}

// The first nonzero of row[0:n] (n if none), and one past the last (given one), 8 bytes at a time: a causal row is
// mostly masked bytes to skip, and there is one such scan per query row.
inline int64_t first_visible(const uint8_t* row, int64_t n) {
  int64_t j = 0;
  for (uint64_t word; j + 8 <= n; j += 8) {
    std::memcpy(&word, row + j, 8);
    if (word) return j + __builtin_ctzll(word) / 8;  // little-endian: the lowest set byte comes first
  }
  while (j < n && !row[j]) ++j;
  return j;
}
inline int64_t end_of_visible(const uint8_t* row, int64_t n) {
  int64_t j = n;
  for (uint64_t word; j >= 8; j -= 8) {
    std::memcpy(&word, row + j - 8, 8);
    if (word) return j - __builtin_clzll(word) / 8;
  }
  while (!row[j - 1]) --j;
  return j;
}

// The columns [lo, hi) outside which every row t0 <= t < t0 + rows of head h is masked (a causal mask's future, a
// padding mask's padding), widened to whole vectors; lo == hi when nothing in the block is visible.
struct Span {
  int64_t lo, hi;
};
inline Span visible_span(const Shape& d, const uint8_t* mask, int64_t b, int64_t h, int64_t t0, int64_t rows) {
  int64_t lo = d.kv_len, hi = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* visible = d.visible_row(mask, b, h, t0 + r);
    const int64_t first = first_visible(visible, d.kv_len);
    if (first == d.kv_len) continue;  // a row with no visible key
    const int64_t last = end_of_visible(visible, d.kv_len);
    lo = std::min(lo, first);
    hi = std::max(hi, last);
  }
  if (lo >= hi) return {0, 0};
  return {lo / kLanes * kLanes, std::min(d.kv_len, (hi + kLanes - 1) / kLanes * kLanes)};
}

}  // namespace transformer_jax

#endif  // TRANSFORMER_JAX_KERNELS_ATTENTION_SOFTMAX_H_
