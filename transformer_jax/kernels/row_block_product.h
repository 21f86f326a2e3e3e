// A matrix product out (M, N) = op(a) op(b) by a library's GEMM, with its output rows split over XLA's intra-op
// thread pool, each block one single-threaded library call. A library's own threads (OpenMP) would spin between
// calls, taking the cores from XLA's next ops. Either operand is read transposed in place where asked, so neither a
// product nor its two gradient products copies an operand. Used by mkl_matmul.cc and onednn_matmul.cc.
#ifndef TRANSFORMER_JAX_KERNELS_ROW_BLOCK_PRODUCT_H_
#define TRANSFORMER_JAX_KERNELS_ROW_BLOCK_PRODUCT_H_

#include <algorithm>
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

// The shape of op(a) op(b): a is (M, K), or (K, M) when transpose_a; b is (K, N), or (N, K) when transpose_b; out
// must be (M, N).
template <typename A, typename B, typename Out>
xla::ffi::Error product_shape(const A& a, const B& b, const Out& out, bool transpose_a, bool transpose_b,
                              ProductShape* shape) {
  const auto ad = a.dimensions(), bd = b.dimensions();
  shape->m = transpose_a ? ad[1] : ad[0];
  shape->k = transpose_a ? ad[0] : ad[1];
  shape->n = transpose_b ? bd[0] : bd[1];
  const int64_t kb = transpose_b ? bd[1] : bd[0];
  if (kb != shape->k || out.dimensions()[0] != shape->m || out.dimensions()[1] != shape->n)
    return xla::ffi::Error::InvalidArgument("operand shapes do not match");
  return xla::ffi::Error::Success();
}

// Runs gemm(first, rows) over blocks of the M output rows on the pool's threads: at most one block per thread, at
// least kMinBlockRows rows each. The gemm of rows [first, first + rows) reads row `first` of op(a) at
// a + (transpose_a ? first : first * lda) and writes out + first * N.
template <typename Gemm>
void run_row_blocks(xla::ffi::ThreadPool& pool, int64_t m, Gemm gemm) {
  const int64_t blocks = std::clamp<int64_t>(m / kMinBlockRows, 1, pool.num_threads());
  run_blocks(pool, blocks, [&](int64_t block) {
    const int64_t first = m * block / blocks;
    gemm(first, m * (block + 1) / blocks - first);
  });
}

}  // namespace transformer_jax

#endif  // TRANSFORMER_JAX_KERNELS_ROW_BLOCK_PRODUCT_H_
