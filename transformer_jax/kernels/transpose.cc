// A 2-D transpose at memory speed on the CPU: out (N, M) = x (M, N)^T for 2- and 4-byte elements.
//
// XLA:CPU folds a transpose into the dot that consumes it, and for bfloat16 that makes the weight gradient x^T g a
// product its YNNPACK kernels refuse (they take a transposed left operand in float32 only), so XLA widens it to
// float32. A transpose done here is opaque to XLA: the product that follows is a plain bf16 one. Tiles of 8 x 8
// 32-bit units (16 x 8 for 2-byte elements) are transposed in AVX2 registers; square blocks of tiles are shared over
// XLA's pool.
#include <algorithm>
#include <cstdint>

#include "xla/ffi/api/ffi.h"
#include "pool_blocks.h"
#include "word_transpose.h"

namespace ffi = xla::ffi;

namespace {

// Blocks of kBlock x kBlock: their 2 x kBlock rows' pages stay in the TLB (BERT's (2048, 30522) logit gradient done
// in strips of whole rows touched every output page once per strip: 3.5 GB/s, against 26 in blocks).
constexpr int64_t kBlock = 512;

template <typename T>
void scalar_tile(const T* x, T* out, int64_t rows, int64_t cols, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
  for (int64_t c = c0; c < c1; ++c) {
    for (int64_t r = r0; r < r1; ++r) out[c * rows + r] = x[r * cols + c];
  }
}

#if defined(__AVX2__)
using transformer_jax::transpose8x8;

// Rows r..r+7 by columns c..c+7 of 4-byte elements.
inline void tile(const uint32_t* x, uint32_t* out, int64_t rows, int64_t cols, int64_t r, int64_t c) {
  transformer_jax::transpose_word_tile(x + r * cols + c, cols, out + c * rows + r, rows);
}

// Rows r..r+15 by columns c..c+7 of 2-byte elements: interleaving rows 2i and 2i+1 makes 32-bit units (x[2i, c],
// x[2i+1, c]), and the 8 x 8 transpose of those units puts each output row's 16 elements in order.
inline void tile(const uint16_t* x, uint16_t* out, int64_t rows, int64_t cols, int64_t r, int64_t c) {
  __m256 v[8];
  for (int i = 0; i < 8; ++i) {
    const __m128i even = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x + (r + 2 * i) * cols + c));
    const __m128i odd = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x + (r + 2 * i + 1) * cols + c));
    const __m256i units = _mm256_set_m128i(_mm_unpackhi_epi16(even, odd), _mm_unpacklo_epi16(even, odd));
    v[i] = _mm256_castsi256_ps(units);
  }
  transpose8x8(v);
  for (int j = 0; j < 8; ++j) _mm256_storeu_ps(reinterpret_cast<float*>(out + (c + j) * rows + r), v[j]);
}
#endif

// The block x[r0:r1, c0:c1] into out[c0:c1, r0:r1]: whole tiles in registers, the edges element by element.
template <typename T>
void transpose_block(const T* x, T* out, int64_t rows, int64_t cols, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
#if defined(__AVX2__)
  constexpr int64_t tile_rows = 32 / sizeof(T), tile_cols = 8;
  const int64_t r_end = r0 + (r1 - r0) / tile_rows * tile_rows, c_end = c0 + (c1 - c0) / tile_cols * tile_cols;
  // down a column of tiles first: consecutive tiles fill the same output lines (rows 4 KiB apart share an L1 set)
  for (int64_t c = c0; c < c_end; c += tile_cols) {
    for (int64_t r = r0; r < r_end; r += tile_rows) tile(x, out, rows, cols, r, c);
  }
  scalar_tile(x, out, rows, cols, r0, r_end, c_end, c1);
  scalar_tile(x, out, rows, cols, r_end, r1, c0, c1);
#else
  scalar_tile(x, out, rows, cols, r0, r1, c0, c1);
#endif
}

template <typename T>
void transpose(ffi::ThreadPool& pool, const void* x, void* out, int64_t rows, int64_t cols) {
  const int64_t row_blocks = (rows + kBlock - 1) / kBlock, col_blocks = (cols + kBlock - 1) / kBlock;
  transformer_jax::run_blocks(pool, row_blocks * col_blocks, [=](int64_t block) {
    const int64_t r0 = block / col_blocks * kBlock, c0 = block % col_blocks * kBlock;
    transpose_block(static_cast<const T*>(x), static_cast<T*>(out), rows, cols, r0, std::min(rows, r0 + kBlock), c0,
                    std::min(cols, c0 + kBlock));
  });
}

ffi::Error transpose_2d(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> out) {
  const auto dims = x.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("transpose_2d takes a matrix");
  if (x.element_type() != out->element_type()) return ffi::Error::InvalidArgument("dtype changed");
  switch (ffi::ByteWidth(x.element_type())) {
    case 2:
      transpose<uint16_t>(pool, x.untyped_data(), out->untyped_data(), dims[0], dims[1]);
      break;
    case 4:
      transpose<uint32_t>(pool, x.untyped_data(), out->untyped_data(), dims[0], dims[1]);
      break;
    default:
      return ffi::Error::InvalidArgument("transpose_2d takes 2- or 4-byte elements");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TransformerJaxTranspose2d, transpose_2d,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());
