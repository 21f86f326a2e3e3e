// The blocks of skinny_matmul.cc for bfloat16 rows of x by bfloat16 weights (a dtype='bfloat16' model's batched
// decoding steps and beam searches, from skinny_matmul.cc's kPairRows rows) on CPUs with AVX512-BF16. vdpbf16ps
// (bf16_gemm.h) multiplies 16 pairs of bfloat16 and adds both products of each pair to a float32 sum, where
// skinny_avx512.h's blocks widen every weight to float32 first and spend one FMA on it: half the multiply
// instructions, none to widen, and x half the bytes. Each product of two bfloat16 values is exact in float32, so the
// results differ from the widening blocks' only in the order of the sums (and in that the instruction flushes
// subnormal inputs to zero).
//
// An (N, K) table row holds its pairs over K in order, so a 512-bit load of weights meets a 512-bit load of x. A
// (K, N) weight pairs rows k and k + 1 by interleaving their 16-bit words (vpunpcklwd / vpunpckhwd), which works
// within each 128-bit lane: the first vector of a group of 32 columns sums columns 0-3, 8-11, 16-19, 24-27, the
// second 4-7, 12-15, 20-23, 28-31, and store_pairs_in_order puts them back.
#ifndef TRANSFORMER_JAX_KERNELS_SKINNY_BF16_PAIRS_H_
#define TRANSFORMER_JAX_KERNELS_SKINNY_BF16_PAIRS_H_

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "bf16_gemm.h"
#include "skinny_avx512.h"

#if defined(TRANSFORMER_JAX_BF16_PAIRS)

namespace transformer_jax {

// (x[k], x[k + 1]) as one 32-bit word in every lane; x[k + 1] taken as 0 when `single`
inline __m512bh pair_at(const uint16_t* x, bool single) {
  uint32_t pair = x[0];
  if (!single) std::memcpy(&pair, x, sizeof(pair));
  return as_pairs(_mm512_set1_epi32(int32_t(pair)));
}

// Weight rows per pass of kn_pair_rows, kPassRows / 2 pairs; also how far ahead their rows are prefetched. Eight
// rather than skinny_avx512.h's four: each row of x loads and stores its sums once per pass, and at 8 rows of x
// those loads and stores, not the weights' reads, bound a pass of four (on Zen 4, GPT-2 small's layer products at 8
// rows took 10.9 ms in passes of four and 8.6 in passes of eight; at 1 and 2 rows they were level).
constexpr int64_t kPassRows = 8;  // with_count takes 1 to 8

// One pass of kn_pair_rows over weight rows k..k+kDepth-1 (kDepth 1 to kPassRows; a last odd row is paired with
// zeros), all columns.
template <int64_t kRows, int64_t kDepth>
void kn_pair_pass(const uint16_t* x, const uint16_t* w, float* acc, int64_t k_dim, int64_t n_dim, int64_t k,
                  int64_t n0, int64_t width, bool prefetch) {
  constexpr int64_t kPairs = (kDepth + 1) / 2;
  const int64_t grouped = width / kPairWidth * kPairWidth;
  const uint16_t* rows = w + k * n_dim + n0;
  for (int64_t j = 0; j < grouped; j += kPairWidth) {
    if (prefetch) {
      for (int64_t r = 0; r < kDepth; ++r) prefetch_group<_MM_HINT_T1>(rows + (r + kPassRows) * n_dim + j);
    }
    __m512bh low[kPairs], high[kPairs];
    for (int64_t p = 0; p < kPairs; ++p) {
      const __m512i first = load32(rows + 2 * p * n_dim + j);
      const __m512i second = 2 * p + 1 < kDepth ? load32(rows + (2 * p + 1) * n_dim + j) : _mm512_setzero_si512();
      low[p] = as_pairs(_mm512_unpacklo_epi16(first, second));
      high[p] = as_pairs(_mm512_unpackhi_epi16(first, second));
    }
    for (int64_t m = 0; m < kRows; ++m) {
      const uint16_t* xm = x + m * k_dim + k;
      float* o = acc + m * width + j;
      __m512 sum_low = _mm512_loadu_ps(o), sum_high = _mm512_loadu_ps(o + 16);
      for (int64_t p = 0; p < kPairs; ++p) {
        const __m512bh a = pair_at(xm + 2 * p, 2 * p + 1 == kDepth);
        sum_low = _mm512_dpbf16_ps(sum_low, a, low[p]);
        sum_high = _mm512_dpbf16_ps(sum_high, a, high[p]);
      }
      _mm512_storeu_ps(o, sum_low);
      _mm512_storeu_ps(o + 16, sum_high);
    }
  }
  for (int64_t m = 0; m < kRows; ++m) {
    const uint16_t* xm = x + m * k_dim + k;
    float* o = acc + m * width;
    for (int64_t j = grouped; j < width; ++j) {
      for (int64_t r = 0; r < kDepth; ++r) o[j] += widen(xm[r]) * widen(rows[r * n_dim + j]);
    }
  }
}

// acc (kRows, width) += x[:, k0:k1] . W[k0:k1, n0:n0+width], x bfloat16; acc's first width / 32 * 32 columns in the
// pair order above, the rest in order. kPassRows weight rows per pass; the last few in a pass of their own.
template <int64_t kRows>
void kn_pair_rows(const uint16_t* x, const uint16_t* w, float* acc, int64_t k_dim, int64_t n_dim, int64_t k0,
                  int64_t k1, int64_t n0, int64_t width) {
  int64_t k = k0;
  for (; k + kPassRows <= k1; k += kPassRows) {
    kn_pair_pass<kRows, kPassRows>(x, w, acc, k_dim, n_dim, k, n0, width, k + 2 * kPassRows <= k1);
  }
  if (k < k1) {
    with_count(k1 - k, [&](auto d) {
      kn_pair_pass<kRows, decltype(d)::value>(x, w, acc, k_dim, n_dim, k, n0, width, false);
    });
  }
}

inline void kn_accumulate_pairs(const uint16_t* x, const uint16_t* w, float* acc, int64_t rows, int64_t k_dim,
                                int64_t n_dim, int64_t k0, int64_t k1, int64_t n0, int64_t width) {
  with_count(rows, [&](auto r) { kn_pair_rows<decltype(r)::value>(x, w, acc, k_dim, n_dim, k0, k1, n0, width); });
}

// out[0:width] = acc[0:width] put back in order from the pair order of kn_pair_rows.
inline void store_pairs_in_order(const float* acc, float* out, int64_t width) {
  permute_groups(acc, out, width, _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23),
                 _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31));
}

// out[m, n] = sum_k x[m, k] * W[n, k] for the table rows n0..n1, for kRows bfloat16 rows of x (kRows, k_dim). Groups
// of 32 alternate between two sums per row, two chains of dependent vdpbf16ps where one would wait on the last.
template <int64_t kRows>
void nk_pair_rows(const uint16_t* x, const uint16_t* w, float* out, int64_t k_dim, int64_t n_dim, int64_t n0,
                  int64_t n1) {
  const int64_t grouped = k_dim / kPairWidth * kPairWidth;
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* row = w + n * k_dim;
    const uint16_t* ahead = n + kTablePrefetchRows < n1 ? row + kTablePrefetchRows * k_dim : nullptr;
    __m512 first[kRows], second[kRows];
    for (int64_t m = 0; m < kRows; ++m) first[m] = second[m] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 2 * kPairWidth <= grouped; k += 2 * kPairWidth) {
      if (ahead) {
        prefetch_group<_MM_HINT_T0>(ahead + k);
        prefetch_group<_MM_HINT_T0>(ahead + k + kPairWidth);
      }
      const __m512bh w0 = as_pairs(load32(row + k)), w1 = as_pairs(load32(row + k + kPairWidth));
      for (int64_t m = 0; m < kRows; ++m) {
        const uint16_t* xm = x + m * k_dim + k;
        first[m] = _mm512_dpbf16_ps(first[m], as_pairs(load32(xm)), w0);
        second[m] = _mm512_dpbf16_ps(second[m], as_pairs(load32(xm + kPairWidth)), w1);
      }
    }
    if (k < grouped) {
      if (ahead) prefetch_group<_MM_HINT_T0>(ahead + k);
      const __m512bh w0 = as_pairs(load32(row + k));
      for (int64_t m = 0; m < kRows; ++m) {
        first[m] = _mm512_dpbf16_ps(first[m], as_pairs(load32(x + m * k_dim + k)), w0);
      }
    }
    for (int64_t m = 0; m < kRows; ++m) {
      const uint16_t* xm = x + m * k_dim;
      float sum = _mm512_reduce_add_ps(_mm512_add_ps(first[m], second[m]));
      for (int64_t kk = grouped; kk < k_dim; ++kk) sum += widen(xm[kk]) * widen(row[kk]);
      out[m * n_dim + n] = sum;
    }
  }
}

inline void nk_block_pairs(const uint16_t* x, const uint16_t* w, float* out, int64_t rows, int64_t k_dim,
                           int64_t n_dim, int64_t n0, int64_t n1) {
  with_count(rows, [&](auto r) { nk_pair_rows<decltype(r)::value>(x, w, out, k_dim, n_dim, n0, n1); });
}

}  // namespace transformer_jax

#endif  // TRANSFORMER_JAX_BF16_PAIRS
#endif  // TRANSFORMER_JAX_KERNELS_SKINNY_BF16_PAIRS_H_
