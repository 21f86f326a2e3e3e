// Float32 vectors of the widest width the CPU has, their exponential, and a register-tiled product of small
// matrices that stay in cache (the pieces of attention.cc).
#ifndef TRANSFORMER_JAX_KERNELS_SMALL_GEMM_H_
#define TRANSFORMER_JAX_KERNELS_SMALL_GEMM_H_

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace transformer_jax {

#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
// a 6 x 64 tile: 24 accumulators of the 32 registers (measured on Zen 5, one core: 250-280 GFLOP/s against
// 180 for 4 x 64 and 230-250 for 8 x 32)
constexpr int kTileRows = 6, kTileVectors = 4;
#else
constexpr int64_t kLanes = 8;
constexpr int kTileRows = 4, kTileVectors = 2;  // 8 accumulators of the 16 registers
#endif
typedef float vec __attribute__((vector_size(kLanes * 4)));
typedef int32_t ivec __attribute__((vector_size(kLanes * 4)));

inline vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store(float* p, vec v) { std::memcpy(p, &v, sizeof(v)); }
// (vec{} + x would add 0.0 first: x may be -0.0, so the compiler keeps the add)
inline vec splat(float x) {
#if defined(__AVX512F__)
  return vec(_mm512_set1_ps(x));
#else
  return vec(_mm256_set1_ps(x));
#endif
}

// a * b + c in one rounding (C++17 compiles a * b + c as two).
inline vec fma(vec a, vec b, vec c) {
#if defined(__AVX512F__)
  return vec(_mm512_fmadd_ps(__m512(a), __m512(b), __m512(c)));
#elif defined(__FMA__)
  return vec(_mm256_fmadd_ps(__m256(a), __m256(b), __m256(c)));
#else
  return a * b + c;
#endif
}

// e^x to about 2 ulp (Cephes' expf polynomial after x = n ln 2 + r); exactly 0 below -87.3, where float32's normal
// range ends, so a masked logit of -inf gives 0.
inline vec exp(vec x) {
  const vec lo = splat(-87.33654f), hi = splat(88.37626f);
  const ivec underflow = x < lo;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  // round-to-nearest of x / ln 2 by the 1.5 * 2^23 trick
  const vec shifter = splat(12582912.0f);
  const vec n = fma(x, splat(1.44269504088896341f), shifter) - shifter;
  vec r = fma(n, splat(-0.693359375f), x);
  r = fma(n, splat(2.12194440e-4f), r);
  vec p = splat(1.9875691500e-4f);
  p = fma(p, r, splat(1.3981999507e-3f));
  p = fma(p, r, splat(8.3334519073e-3f));
  p = fma(p, r, splat(4.1665795894e-2f));
  p = fma(p, r, splat(1.6666665459e-1f));
  p = fma(p, r, splat(5.0000001201e-1f));
  p = fma(p * r, r, r) + splat(1.0f);
  const ivec exponent = (__builtin_convertvector(n, ivec) + 127) << 23;
  vec two_n;
  std::memcpy(&two_n, &exponent, sizeof(two_n));
  const ivec bits = ivec(p * two_n) & ~underflow;
  vec out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// C[i, j] (=, or += when accumulate) sum_p A(i, p) B[p, j] for rows i0 <= i < i0 + R and columns j0 <= j <
// j0 + V * kLanes, with A(i, p) = a[i * a_row + p * a_col] (a transposed A is a_row = 1) and B's rows ldb apart.
template <int R, int V>
inline void tile(const float* a, int64_t a_row, int64_t a_col, const float* b, int64_t ldb, float* c, int64_t ldc,
                 int64_t depth, bool accumulate) {
  vec acc[R][V] = {};
  for (int64_t p = 0; p < depth; ++p) {
    vec bp[V];
    for (int v = 0; v < V; ++v) bp[v] = load(b + p * ldb + v * kLanes);
    for (int r = 0; r < R; ++r) {
      const vec ar = splat(a[r * a_row + p * a_col]);
      for (int v = 0; v < V; ++v) acc[r][v] = fma(ar, bp[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < V; ++v) {
      float* out = c + r * ldc + v * kLanes;
      store(out, accumulate ? load(out) + acc[r][v] : acc[r][v]);
    }
  }
}

template <int V>
void tile_rows(const float* a, int64_t a_row, int64_t a_col, const float* b, int64_t ldb, float* c, int64_t ldc,
               int64_t m, int64_t depth, bool accumulate) {
  int64_t i = 0;
  for (; i + kTileRows <= m; i += kTileRows) {
    tile<kTileRows, V>(a + i * a_row, a_row, a_col, b, ldb, c + i * ldc, ldc, depth, accumulate);
  }
  for (; i + 2 <= m; i += 2) tile<2, V>(a + i * a_row, a_row, a_col, b, ldb, c + i * ldc, ldc, depth, accumulate);
  if (i < m) tile<1, V>(a + i * a_row, a_row, a_col, b, ldb, c + i * ldc, ldc, depth, accumulate);
}

// C (m, n) = or += A (m, depth) B (depth, n), A as in tile(), B and C row-major with row strides ldb and ldc.
inline void gemm(const float* a, int64_t a_row, int64_t a_col, const float* b, int64_t ldb, float* c, int64_t ldc,
                 int64_t m, int64_t n, int64_t depth, bool accumulate) {
  int64_t j = 0;
  for (; j + kTileVectors * kLanes <= n; j += kTileVectors * kLanes) {
    tile_rows<kTileVectors>(a, a_row, a_col, b + j, ldb, c + j, ldc, m, depth, accumulate);
  }
  for (; j + kLanes <= n; j += kLanes) tile_rows<1>(a, a_row, a_col, b + j, ldb, c + j, ldc, m, depth, accumulate);
  for (; j < n; ++j) {
    for (int64_t i = 0; i < m; ++i) {
      float sum = 0.0f;
      for (int64_t p = 0; p < depth; ++p) sum += a[i * a_row + p * a_col] * b[p * ldb + j];
      c[i * ldc + j] = accumulate ? c[i * ldc + j] + sum : sum;
    }
  }
}

}  // namespace transformer_jax

#endif  // TRANSFORMER_JAX_KERNELS_SMALL_GEMM_H_
