// Products of small bfloat16 matrices that stay in cache, by AVX512-BF16's dot product of pairs (vdpbf16ps): one
// instruction multiplies 32 bfloat16 pairs and adds them to 16 float32 sums, twice the multiply-adds of a float32 FMA.
// Each product of two bfloat16 values is exact in float32, so the sums differ from the float32 kernels' only in
// their order (and in that the instruction flushes subnormal inputs to zero). Used by attention.cc where the CPU has
// the instruction.
#ifndef TRANSFORMER_JAX_KERNELS_BF16_GEMM_H_
#define TRANSFORMER_JAX_KERNELS_BF16_GEMM_H_

#include <immintrin.h>

#include <cstdint>
#include <cstring>


namespace transformer_jax {

#if defined(__AVX512BF16__)
#define TRANSFORMER_JAX_BF16_PAIRS 1

// The pair layout of a product's right operand B (depth, n): (ceil(depth / 2), n) 32-bit pairs, pair (p, j) holding
// B[2p, j] in its low half and B[2p + 1, j] (0 past the end) in its high half. The left operand A (m, depth) is
// row-major bfloat16 with an even row length, so that its pair (i, p) is the 32 bits at A + i * lda + 2p.
constexpr int64_t kPairLanes = 16;

inline __m512bh as_pairs(__m512i v) { return reinterpret_cast<__m512bh>(v); }

// C[i, j] (=, or += when accumulate) sum_p A[i, p] B[p, j] for R rows and V vectors of columns; when kMasked, the
// last vector's lanes limited by `last` (a 16-bit lane mask) so that any width is read and written without going past
// it. (A template argument: whole tiles with a mask in a register ran at 40% of the speed.) Always inlined: compiled
// on its own into attention.cc's shared library, GCC kept the accumulators on the stack, storing all 24 at every step
// of the depth (the bf16 forward 8.6 ms against 4.1).
template <int R, int V, bool kMasked>
__attribute__((always_inline)) inline void pair_tile(const uint16_t* a, int64_t lda, const uint32_t* b, int64_t ldb,
                                                     float* c, int64_t ldc, int64_t pairs, bool accumulate,
                                                     __mmask16 last) {
  __m512 acc[R][V];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh bp[V];
    for (int v = 0; v < V; ++v) {
      const __mmask16 lanes = kMasked && v == V - 1 ? last : __mmask16(0xFFFF);
      bp[v] = as_pairs(_mm512_maskz_loadu_epi32(lanes, b + p * ldb + v * kPairLanes));
    }
    for (int r = 0; r < R; ++r) {
      uint32_t pair;
      std::memcpy(&pair, a + r * lda + 2 * p, sizeof(pair));
      const __m512bh ar = as_pairs(_mm512_set1_epi32(int32_t(pair)));
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], ar, bp[v]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < V; ++v) {
      const __mmask16 lanes = kMasked && v == V - 1 ? last : __mmask16(0xFFFF);
      float* out = c + r * ldc + v * kPairLanes;
      const __m512 sum = accumulate ? _mm512_add_ps(_mm512_maskz_loadu_ps(lanes, out), acc[r][v]) : acc[r][v];
      _mm512_mask_storeu_ps(out, lanes, sum);
    }
  }
}

template <int V, bool kMasked>
void pair_tile_rows(const uint16_t* a, int64_t lda, const uint32_t* b, int64_t ldb, float* c, int64_t ldc, int64_t m,
                    int64_t pairs, bool accumulate, __mmask16 last) {
  int64_t i = 0;
  for (; i + 6 <= m; i += 6) {
    pair_tile<6, V, kMasked>(a + i * lda, lda, b, ldb, c + i * ldc, ldc, pairs, accumulate, last);
  }
  for (; i + 2 <= m; i += 2) {
    pair_tile<2, V, kMasked>(a + i * lda, lda, b, ldb, c + i * ldc, ldc, pairs, accumulate, last);
  }
  if (i < m) pair_tile<1, V, kMasked>(a + i * lda, lda, b, ldb, c + i * ldc, ldc, pairs, accumulate, last);
}

// C (m, n) = or += A (m, depth) B (depth, n): A row-major bfloat16 (rows lda apart, lda even, a zero after an odd
// depth), B in the pair layout (pair rows ldb apart), C row-major float32.
inline void pair_gemm(const uint16_t* a, int64_t lda, const uint32_t* b, int64_t ldb, float* c, int64_t ldc,
                      int64_t m, int64_t n, int64_t depth, bool accumulate) {
  const int64_t pairs = (depth + 1) / 2;
  constexpr int64_t kWide = 4 * kPairLanes;
  int64_t j = 0;
  for (; j + kWide <= n; j += kWide) {
    pair_tile_rows<4, false>(a, lda, b + j, ldb, c + j, ldc, m, pairs, accumulate, 0xFFFF);
  }
  const int64_t left = n - j;
  if (left == 0) return;
  const __mmask16 last = __mmask16((1u << ((left - 1) % kPairLanes + 1)) - 1);
  switch ((left + kPairLanes - 1) / kPairLanes) {
    case 1: pair_tile_rows<1, true>(a, lda, b + j, ldb, c + j, ldc, m, pairs, accumulate, last); break;
    case 2: pair_tile_rows<2, true>(a, lda, b + j, ldb, c + j, ldc, m, pairs, accumulate, last); break;
    case 3: pair_tile_rows<3, true>(a, lda, b + j, ldb, c + j, ldc, m, pairs, accumulate, last); break;
    default: pair_tile_rows<4, true>(a, lda, b + j, ldb, c + j, ldc, m, pairs, accumulate, last); break;
  }
}

inline uint32_t pair_of(uint16_t low, uint16_t high) { return uint32_t(low) | uint32_t(high) << 16; }

// x[0:n] rounded to bfloat16 (to the nearest, ties to even) into out[0:n], and out[n] = 0 when n is odd: a row of a
// left operand.
inline void round_row(const float* x, int64_t n, uint16_t* out) {
  int64_t j = 0;
  for (; j + kPairLanes <= n; j += kPairLanes) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j),
                        reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_loadu_ps(x + j))));
  }
  if (j < n) {
    const __mmask16 lanes = __mmask16((1u << (n - j)) - 1);
    const __m256bh rounded = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(lanes, x + j));
    _mm256_mask_storeu_epi16(out + j, lanes, reinterpret_cast<__m256i>(rounded));
  }
  if (n % 2) out[n] = 0;
}

// Rows r0 and r1 (r1 null: zeros) of a float32 matrix, n columns, rounded to bfloat16 and interleaved into n pairs:
// one pair row of a right operand.
inline void round_row_pair(const float* r0, const float* r1, int64_t n, uint32_t* out) {
  for (int64_t j = 0; j < n; j += kPairLanes) {
    const __mmask16 lanes = n - j >= kPairLanes ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
    const __m256bh low = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(lanes, r0 + j));
    const __m512i wide_low = _mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(low));
    __m512i pairs = wide_low;
    if (r1 != nullptr) {
      const __m256bh high = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(lanes, r1 + j));
      const __m512i wide_high = _mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(high));
      pairs = _mm512_or_si512(wide_low, _mm512_slli_epi32(wide_high, 16));
    }
    _mm512_mask_storeu_epi32(out + j, lanes, pairs);
  }
}

#endif  // __AVX512BF16__

}  // namespace transformer_jax

#endif  // TRANSFORMER_JAX_KERNELS_BF16_GEMM_H_
