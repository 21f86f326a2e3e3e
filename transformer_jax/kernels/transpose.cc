// A 2-D transpose at memory speed on the CPU: out (N, M) = x (M, N)^T for 2- and 4-byte elements.
//
// XLA:CPU folds a transpose into the dot that consumes it, and for bfloat16 that makes the weight gradient x^T g a
// product its YNNPACK kernels refuse (they take a transposed left operand in float32 only), so XLA widens it to
// float32. A transpose done here is opaque to XLA: the product that follows is a plain bf16 one. Tiles of 32 x 32
// keep both the reads and the writes within a few cache lines; row strips of tiles are shared over XLA's pool.
#include <cstdint>

#include "xla/ffi/api/ffi.h"
#include "pool_blocks.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTile = 32;

// Rows r0..r1 of x, tile by tile: each output row segment is written contiguously while the tile's input rows
// (one cache line each per tile) stay in L1.
template <typename T>
void transpose_strip(const T* x, T* out, int64_t rows, int64_t cols, int64_t r0, int64_t r1) {
  for (int64_t c0 = 0; c0 < cols; c0 += kTile) {
    const int64_t c1 = std::min(cols, c0 + kTile);
    for (int64_t c = c0; c < c1; ++c) {
      T* dst = out + c * rows;
      for (int64_t r = r0; r < r1; ++r) dst[r] = x[r * cols + c];
    }
  }
}

template <typename T>
void transpose(ffi::ThreadPool& pool, const void* x, void* out, int64_t rows, int64_t cols) {
  const int64_t count = (rows + kTile - 1) / kTile;
  transformer_jax::run_blocks(pool, count, [=](int64_t block) {
    const int64_t r0 = block * kTile, r1 = std::min(rows, r0 + kTile);
    transpose_strip(static_cast<const T*>(x), static_cast<T*>(out), rows, cols, r0, r1);
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
