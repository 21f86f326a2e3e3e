// The blocks of skinny_matmul.cc on AVX-512, for float32 and bfloat16 weights alike. Each pass reads 32 weights of a
// row as two vectors of 16 float32 (load_group): float32 ones as they are, bfloat16 ones by one 512-bit load whose 16
// even weights are widened by a shift and 16 odd ones by a mask. That is two instructions per 32 weights where
// converting in order takes six (extract, zero-extend and shift per half): fewer instructions per cache line keep more
// lines in flight, which is what a product bound by memory reads needs. For bfloat16 the accumulators (or, for a
// table, x) are held in the same even/odd order and put back in order at the end.
//
// Float32 weights take these blocks too, rather than skinny_matmul.cc's portable loops, for the prefetches of the rows
// ahead issued per cache line: on Zen 4, GPT-2 small's 48 layer products read 22.7 -> 25.2 GB/s at one row (the
// probe: 25.5), 20.1 -> 28.9 at four, and its tied head 23.2 -> 28.6 (benchmarks/RESULTS.md, "Zen 4, ninth round").
#ifndef TRANSFORMER_JAX_KERNELS_SKINNY_AVX512_H_
#define TRANSFORMER_JAX_KERNELS_SKINNY_AVX512_H_

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "skinny_limits.h"

namespace transformer_jax {

constexpr int64_t kPairWidth = 32;  // weights per pass: one 512-bit load of bfloat16, two of float32
// While a pass reads weight rows k..k+3 it asks for the same columns of rows k+4..k+7: four interleaved row streams
// of a few KiB each are more than the hardware prefetcher runs ahead on (see benchmarks/RESULTS.md). They are asked
// into L2, not L1 (_MM_HINT_T1): four rows ahead of a 3,072-wide layer are 24 KiB, most of a 32 KiB L1 that also
// holds the accumulators. On Zen 4 a decoding step's layer products read 16.6-26.1 GB/s with the L1 hint, 23.1-31.9
// with this one.
constexpr int64_t kPrefetchRows = 4;

inline __m512 even_half(__m512i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)); }
inline __m512 odd_half(__m512i v) {
  return _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int32_t(0xFFFF0000u))));
}
inline __m512i load32(const uint16_t* p) { return _mm512_loadu_si512(static_cast<const void*>(p)); }

// Asks for the cache lines of the 32 weights at p (one line of bfloat16, two of float32) into the cache `kHint` names.
// (`auto`: an enum in GCC's headers, an int in Clang's.)
template <auto kHint, typename Weight>
inline void prefetch_group(const Weight* p) {
  const char* line = reinterpret_cast<const char*>(p);
  for (int64_t b = 0; b < kPairWidth * int64_t(sizeof(Weight)); b += 64) _mm_prefetch(line + b, kHint);
}

// The 32 weights at p as two vectors of 16 float32: bfloat16's even and odd ones, or float32's in order.
inline void load_group(const uint16_t* p, __m512& first, __m512& second) {
  const __m512i v = load32(p);
  first = even_half(v);
  second = odd_half(v);
}
inline void load_group(const float* p, __m512& first, __m512& second) {
  first = _mm512_loadu_ps(p);
  second = _mm512_loadu_ps(p + 16);
}

// acc (kRows, width) += x[:, k0:k1] . W[k0:k1, n0:n0+width]; for bfloat16, acc's first width / 32 * 32 columns are
// in even/odd order per group of 32 (16 even columns, then 16 odd), the rest in order. Four weight rows per pass.
// kRows is a template argument so that the loop over x's rows unrolls (x's broadcasts stay in the column loop:
// hoisting them by hand into registers measured no faster).
template <int64_t kRows, typename Weight>
void kn_rows(const float* x, const Weight* w, float* acc, int64_t k_dim, int64_t n_dim, int64_t k0, int64_t k1,
             int64_t n0, int64_t width) {
  const int64_t paired = width / kPairWidth * kPairWidth;
  int64_t k = k0;
  for (; k + 4 <= k1; k += 4) {
    const Weight *w0 = w + k * n_dim + n0, *w1 = w0 + n_dim, *w2 = w1 + n_dim, *w3 = w2 + n_dim;
    for (int64_t j = 0; j < paired; j += kPairWidth) {
      if (k + 4 + kPrefetchRows <= k1) {
        for (const Weight* row : {w0, w1, w2, w3}) prefetch_group<_MM_HINT_T1>(row + kPrefetchRows * n_dim + j);
      }
      __m512 e0, e1, e2, e3, o0, o1, o2, o3;
      load_group(w0 + j, e0, o0);
      load_group(w1 + j, e1, o1);
      load_group(w2 + j, e2, o2);
      load_group(w3 + j, e3, o3);
      for (int64_t m = 0; m < kRows; ++m) {
        const float* xm = x + m * k_dim + k;
        const __m512 a0 = _mm512_set1_ps(xm[0]), a1 = _mm512_set1_ps(xm[1]);
        const __m512 a2 = _mm512_set1_ps(xm[2]), a3 = _mm512_set1_ps(xm[3]);
        float* o = acc + m * width + j;
        __m512 even = _mm512_loadu_ps(o), odd = _mm512_loadu_ps(o + 16);
        even = _mm512_fmadd_ps(a0, e0, even);
        odd = _mm512_fmadd_ps(a0, o0, odd);
        even = _mm512_fmadd_ps(a1, e1, even);
        odd = _mm512_fmadd_ps(a1, o1, odd);
        even = _mm512_fmadd_ps(a2, e2, even);
        odd = _mm512_fmadd_ps(a2, o2, odd);
        even = _mm512_fmadd_ps(a3, e3, even);
        odd = _mm512_fmadd_ps(a3, o3, odd);
        _mm512_storeu_ps(o, even);
        _mm512_storeu_ps(o + 16, odd);
      }
    }
    for (int64_t m = 0; m < kRows; ++m) {
      const float* xm = x + m * k_dim + k;
      float* o = acc + m * width;
      for (int64_t j = paired; j < width; ++j) {
        o[j] += xm[0] * widen(w0[j]) + xm[1] * widen(w1[j]) + xm[2] * widen(w2[j]) +
                xm[3] * widen(w3[j]);
      }
    }
  }
  for (; k < k1; ++k) {
    const Weight* w0 = w + k * n_dim + n0;
    for (int64_t m = 0; m < kRows; ++m) {
      const float a = x[m * k_dim + k];
      const __m512 a0 = _mm512_set1_ps(a);
      float* o = acc + m * width;
      for (int64_t j = 0; j < paired; j += kPairWidth) {
        __m512 e0, o0;
        load_group(w0 + j, e0, o0);
        _mm512_storeu_ps(o + j, _mm512_fmadd_ps(a0, e0, _mm512_loadu_ps(o + j)));
        _mm512_storeu_ps(o + j + 16, _mm512_fmadd_ps(a0, o0, _mm512_loadu_ps(o + j + 16)));
      }
      for (int64_t j = paired; j < width; ++j) o[j] += a * widen(w0[j]);
    }
  }
}

// f(std::integral_constant<int64_t, count>{}) for a count known only at run time (1 to 8: kMaxRows rows of x, or
// the weight rows of a pass in skinny_bf16_pairs.h): the blocks below take it as a template argument.
template <typename F>
void with_count(int64_t count, F f) {
  static_assert(kMaxRows == 8);
  switch (count) {
    case 1: return f(std::integral_constant<int64_t, 1>{});
    case 2: return f(std::integral_constant<int64_t, 2>{});
    case 3: return f(std::integral_constant<int64_t, 3>{});
    case 4: return f(std::integral_constant<int64_t, 4>{});
    case 5: return f(std::integral_constant<int64_t, 5>{});
    case 6: return f(std::integral_constant<int64_t, 6>{});
    case 7: return f(std::integral_constant<int64_t, 7>{});
    default: return f(std::integral_constant<int64_t, kMaxRows>{});
  }
}

template <typename Weight>
void kn_accumulate_avx512(const float* x, const Weight* w, float* acc, int64_t rows, int64_t k_dim, int64_t n_dim,
                          int64_t k0, int64_t k1, int64_t n0, int64_t width) {
  with_count(rows, [&](auto r) { kn_rows<decltype(r)::value>(x, w, acc, k_dim, n_dim, k0, k1, n0, width); });
}

// dst[0:n] = src[0:n] with each whole group of 32 permuted (its first 16 outputs picked by `first`, its next 16 by
// `second`, as _mm512_permutex2var_ps indexes the group's two halves); a last partial group is copied.
inline void permute_groups(const float* src, float* dst, int64_t n, __m512i first, __m512i second) {
  const int64_t paired = n / kPairWidth * kPairWidth;
  for (int64_t j = 0; j < paired; j += kPairWidth) {
    const __m512 low = _mm512_loadu_ps(src + j), high = _mm512_loadu_ps(src + j + 16);
    _mm512_storeu_ps(dst + j, _mm512_permutex2var_ps(low, first, high));
    _mm512_storeu_ps(dst + j + 16, _mm512_permutex2var_ps(low, second, high));
  }
  std::memcpy(dst + paired, src + paired, (n - paired) * sizeof(float));
}

// out[0:width] = acc[0:width] put back in order from even/odd order.
inline void store_in_order(const float* acc, float* out, int64_t width) {
  permute_groups(acc, out, width, _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23),
                 _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31));
}

// xp[0:k_dim] = x[0:k_dim] in even/odd order (the inverse of store_in_order).
inline void load_in_pairs(const float* x, float* xp, int64_t k_dim) {
  permute_groups(x, xp, k_dim, _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30),
                 _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31));
}

// out[m, n] = sum_k x[m, k] * W[n, k] for the table rows n0..n1, for kRows rows of x; xp is x (kRows, k_dim), for
// bfloat16 weights in even/odd order. kRows is a template argument so that the accumulators live in registers:
// indexed by a runtime row count they were kept on the stack, and each multiply-add then waited on a store and a load
// (a bfloat16 table read from cache ran at a third of the portable float32 loop's speed).
template <int64_t kRows, typename Weight>
void nk_rows(const float* xp, const Weight* w, float* out, int64_t k_dim, int64_t n_dim, int64_t n0, int64_t n1) {
  // The rows ahead: float32 ones into L2, not L1, where x's rows (up to 24 KiB) must stay, read again for every
  // table row; they lost out to the float32 rows ahead (12 KiB). On Zen 4, GPT-2 small's float32 head at 1 / 4 / 8
  // rows read 25.6 / 20.2 / 16.2 -> 27.3 / 27.1 / 22.9 GB/s alone. bf16 rows stay with the L1 hint: alone its head
  // read faster into L2 too, but whole bf16 decodes were 2-4% slower (benchmarks/RESULTS.md, "Zen 4, ninth round").
  constexpr auto kHint = std::is_same_v<Weight, float> ? _MM_HINT_T1 : _MM_HINT_T0;
  const int64_t paired = k_dim / kPairWidth * kPairWidth;
  for (int64_t n = n0; n < n1; ++n) {
    const Weight* row = w + n * k_dim;
    const Weight* ahead = n + kTablePrefetchRows < n1 ? row + kTablePrefetchRows * k_dim : nullptr;
    __m512 even[kRows], odd[kRows];
    for (int64_t m = 0; m < kRows; ++m) even[m] = odd[m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < paired; k += kPairWidth) {
      if (ahead) prefetch_group<kHint>(ahead + k);
      __m512 e, o;
      load_group(row + k, e, o);
      for (int64_t m = 0; m < kRows; ++m) {
        even[m] = _mm512_fmadd_ps(_mm512_loadu_ps(xp + m * k_dim + k), e, even[m]);
        odd[m] = _mm512_fmadd_ps(_mm512_loadu_ps(xp + m * k_dim + k + 16), o, odd[m]);
      }
    }
    for (int64_t m = 0; m < kRows; ++m) {
      const float* xm = xp + m * k_dim;
      float sum = _mm512_reduce_add_ps(_mm512_add_ps(even[m], odd[m]));
      for (int64_t k = paired; k < k_dim; ++k) sum += xm[k] * widen(row[k]);
      out[m * n_dim + n] = sum;
    }
  }
}

template <typename Weight>
void nk_block_avx512(const float* xp, const Weight* w, float* out, int64_t rows, int64_t k_dim, int64_t n_dim,
                     int64_t n0, int64_t n1) {
  with_count(rows, [&](auto r) { nk_rows<decltype(r)::value>(xp, w, out, k_dim, n_dim, n0, n1); });
}

}  // namespace transformer_jax

#endif  // TRANSFORMER_JAX_KERNELS_SKINNY_AVX512_H_
