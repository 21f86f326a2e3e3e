// Transposes of 32-bit words (float32 values, or pairs of bfloat16 ones), 8 x 8 at a time in AVX2 registers: the
// transpose kernel's tiles (transpose.cc), and in the attention kernel the layouts of a head's keys and values over
// features and the store of its key and value gradients, kept transposed while they are summed. Written word by word,
// each of those was 5-10% of the bf16 backward kernel: a load and a store per word, the stores rows apart.
#ifndef TRANSFORMER_JAX_KERNELS_WORD_TRANSPOSE_H_
#define TRANSFORMER_JAX_KERNELS_WORD_TRANSPOSE_H_

#include <cstdint>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace transformer_jax {

#if defined(__AVX2__)
constexpr int64_t kWordTile = 8;

// The 8 x 8 transpose of 32-bit units in eight registers (unpack, shuffle, then swap 128-bit halves).
inline void transpose8x8(__m256 v[8]) {
  __m256 t[8], s[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    s[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    s[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    s[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    s[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x20);
    v[i + 4] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x31);
  }
}

// dst[c * ldd + r] = src[r * lds + c] for r, c < 8, T a 32-bit type.
template <typename T>
inline void transpose_word_tile(const T* src, int64_t lds, T* dst, int64_t ldd) {
  static_assert(sizeof(T) == 4, "a word is 32 bits");
  __m256 v[8];
  for (int i = 0; i < 8; ++i) v[i] = _mm256_loadu_ps(reinterpret_cast<const float*>(src + i * lds));
  transpose8x8(v);
  for (int j = 0; j < 8; ++j) _mm256_storeu_ps(reinterpret_cast<float*>(dst + j * ldd), v[j]);
}
#endif

// dst[c * ldd + r] = src[r * lds + c] for r < rows, c < cols: whole tiles in registers (down a column of tiles first,
// so that consecutive tiles fill the same output lines), the edges (everything, without AVX2) word by word.
template <typename T>
inline void transpose_words(const T* src, int64_t lds, T* dst, int64_t ldd, int64_t rows, int64_t cols) {
#if defined(__AVX2__)
  const int64_t whole_rows = rows / kWordTile * kWordTile, whole_cols = cols / kWordTile * kWordTile;
  for (int64_t c = 0; c < whole_cols; c += kWordTile) {
    for (int64_t r = 0; r < whole_rows; r += kWordTile) {
      transpose_word_tile(src + r * lds + c, lds, dst + c * ldd + r, ldd);
    }
  }
#else
  const int64_t whole_rows = 0, whole_cols = 0;
#endif
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = r < whole_rows ? whole_cols : 0; c < cols; ++c) dst[c * ldd + r] = src[r * lds + c];
  }
}

}  // namespace transformer_jax

#endif  // TRANSFORMER_JAX_KERNELS_WORD_TRANSPOSE_H_
