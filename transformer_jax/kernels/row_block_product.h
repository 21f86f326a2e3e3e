// A matrix product out (M, N) = op(a) op(b), float32 out, by a library's GEMM, with its output rows split over XLA's
// intra-op thread pool, each block one single-threaded library call. A library's own threads (OpenMP) would spin
// between calls, taking the cores from XLA's next ops. Either operand is read transposed in place where asked, so
// neither a product nor its two gradient products copies an operand. Used by mkl_matmul.cc and onednn_matmul.cc.
#ifndef TRANSFORMER_JAX_KERNELS_ROW_BLOCK_PRODUCT_H_
#define TRANSFORMER_JAX_KERNELS_ROW_BLOCK_PRODUCT_H_

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "pool_blocks.h"
#include "xla/ffi/api/ffi.h"

namespace transformer_jax {

// Output rows per block at the least: fewer rows make the library's packing of `b`, done per call, cost more than
// the block.
constexpr int64_t kMinBlockRows = 64;

struct ProductShape {
  int64_t m, n, k;
};

// out = op(a) op(b): a is (M, K), or (K, M) when transpose_a; b is (K, N), or (N, K) when transpose_b; out (M, N).
// Checks the shapes against each other and against `max_dimension` (the largest size the library takes), writes the
// empty cases itself (nothing where M or N is 0; zeros where K is 0, an empty sum that a GEMM rejects), and
// otherwise calls gemm(first, rows, a_offset, shape) for blocks of the output rows, at most one per thread and at
// least kMinBlockRows each: rows [first, first + rows) of the output, whose first row of op(a) starts a_offset
// elements into a's data. gemm returns false where the library reports a failure.
template <typename A, typename B, typename Out, typename Gemm>
xla::ffi::Error row_block_product(xla::ffi::ThreadPool& pool, const A& a, const B& b, Out& out, bool transpose_a,
                                  bool transpose_b, int64_t max_dimension, Gemm gemm) {
  const auto ad = a.dimensions(), bd = b.dimensions();
  const ProductShape s{transpose_a ? ad[1] : ad[0], transpose_b ? bd[0] : bd[1], transpose_a ? ad[0] : ad[1]};
  if ((transpose_b ? bd[1] : bd[0]) != s.k || out.dimensions()[0] != s.m || out.dimensions()[1] != s.n)
    return xla::ffi::Error::InvalidArgument("row_block_product: operand shapes do not match");
  if (std::max({s.m, s.n, s.k}) > max_dimension)
    return xla::ffi::Error::InvalidArgument("row_block_product: a dimension is too large for the library");
  if (s.m == 0 || s.n == 0) return xla::ffi::Error::Success();
  if (s.k == 0) {
    std::fill(out.typed_data(), out.typed_data() + s.m * s.n, 0.f);
    return xla::ffi::Error::Success();
  }
  const int64_t blocks = std::clamp<int64_t>(s.m / kMinBlockRows, 1, pool.num_threads());
  std::atomic<bool> failed{false};
  run_blocks(pool, blocks, [&](int64_t block) {
    const int64_t first = s.m * block / blocks;
    if (!gemm(first, s.m * (block + 1) / blocks - first, transpose_a ? first : first * ad[1], s))
      failed.store(true, std::memory_order_relaxed);
  });
  return failed.load() ? xla::ffi::Error::Internal("row_block_product: the library's GEMM failed")
                       : xla::ffi::Error::Success();
}

}  // namespace transformer_jax

#endif  // TRANSFORMER_JAX_KERNELS_ROW_BLOCK_PRODUCT_H_
