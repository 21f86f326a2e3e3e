// Transposes of 32-bit words (float32 values, or pairs of bfloat16 ones) in AVX-512 registers, 16 x 16 at a time.
// attention_pairs.h lays out a head's keys and values as pairs over features this way, and stores the key and value
// gradients, kept transposed while they are summed, in the (S, K) rows of the caller. Written word by word, each
// such transpose was 5-10% of the bf16 backward kernel: a scalar load and store per word, the stores 4 bytes apart in
// rows S words apart.
#ifndef TRANSFORMER_JAX_KERNELS_WORD_TRANSPOSE_H_
#define TRANSFORMER_JAX_KERNELS_WORD_TRANSPOSE_H_

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace transformer_jax {

#if defined(__AVX512F__)

constexpr int64_t kWordTile = 16;

// dst[c * ldd + r] = src[r * lds + c] for r, c < 16, T a 32-bit type. Three rounds of shuffles: 32-bit interleaves of row pairs, then
// 64-bit ones of row quads (register 4G + j then holds column 4L + j of rows 4G..4G+3 in its 128-bit lane L), then
// two of 128-bit lanes, which gather lane L of the four quads into output row 4L + j.
template <typename T>
inline void transpose_tile(const T* src, int64_t lds, T* dst, int64_t ldd) {
  static_assert(sizeof(T) == 4, "a word is 32 bits");
  __m512i rows[kWordTile], pairs[kWordTile], quads[kWordTile];
  for (int r = 0; r < kWordTile; ++r) rows[r] = _mm512_loadu_si512(src + r * lds);
  for (int r = 0; r < kWordTile; r += 2) {
    pairs[r] = _mm512_unpacklo_epi32(rows[r], rows[r + 1]);      // columns 4L, 4L + 1 of rows r, r + 1
    pairs[r + 1] = _mm512_unpackhi_epi32(rows[r], rows[r + 1]);  // columns 4L + 2, 4L + 3
  }
  for (int g = 0; g < kWordTile; g += 4) {
    quads[g] = _mm512_unpacklo_epi64(pairs[g], pairs[g + 2]);
    quads[g + 1] = _mm512_unpackhi_epi64(pairs[g], pairs[g + 2]);
    quads[g + 2] = _mm512_unpacklo_epi64(pairs[g + 1], pairs[g + 3]);
    quads[g + 3] = _mm512_unpackhi_epi64(pairs[g + 1], pairs[g + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    // lanes 0, 1 (low) or 2, 3 (high) of quads 0 and 1, and of quads 2 and 3
    const __m512i low01 = _mm512_shuffle_i32x4(quads[j], quads[4 + j], 0x44);
    const __m512i high01 = _mm512_shuffle_i32x4(quads[j], quads[4 + j], 0xEE);
    const __m512i low23 = _mm512_shuffle_i32x4(quads[8 + j], quads[12 + j], 0x44);
    const __m512i high23 = _mm512_shuffle_i32x4(quads[8 + j], quads[12 + j], 0xEE);
    _mm512_storeu_si512(dst + j * ldd, _mm512_shuffle_i32x4(low01, low23, 0x88));
    _mm512_storeu_si512(dst + (j + 4) * ldd, _mm512_shuffle_i32x4(low01, low23, 0xDD));
    _mm512_storeu_si512(dst + (j + 8) * ldd, _mm512_shuffle_i32x4(high01, high23, 0x88));
    _mm512_storeu_si512(dst + (j + 12) * ldd, _mm512_shuffle_i32x4(high01, high23, 0xDD));
  }
}

// dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols: whole tiles in registers, the edges word by word.
template <typename T>
inline void transpose_words(const T* src, int64_t lds, T* dst, int64_t ldd, int64_t rows, int64_t cols) {
  const int64_t whole_rows = rows / kWordTile * kWordTile, whole_cols = cols / kWordTile * kWordTile;
  for (int64_t r = 0; r < whole_rows; r += kWordTile) {
    for (int64_t c = 0; c < whole_cols; c += kWordTile) transpose_tile(src + r * lds + c, lds, dst + c * ldd + r, ldd);
  }
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = r < whole_rows ? whole_cols : 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
  }
}

#endif  // __AVX512F__

}  // namespace transformer_jax

#endif  // TRANSFORMER_JAX_KERNELS_WORD_TRANSPOSE_H_
