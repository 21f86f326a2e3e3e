// A float32 matrix product by MKL's cblas_sgemm, either operand read transposed in place (so neither the forward
// product nor its two gradient products copies an operand). The output's rows are split over XLA's intra-op thread
// pool, each block one single-threaded MKL call (a thread-local setting, which leaves other users of MKL in the
// process as they were): MKL's own OpenMP threads would spin between calls, taking the cores from XLA's next ops.
// mkl_matmul.py loads libmkl_rt privately and hands its functions over with TransformerJaxSetMkl, so no symbol of
// MKL's enters the process's global scope (another library's BLAS calls keep their own).
#include <algorithm>
#include <cstdint>
#include <limits>

#include "pool_blocks.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using Sgemm = void (*)(int layout, int transa, int transb, int m, int n, int k, float alpha, const float* a, int lda,
                       const float* b, int ldb, float beta, float* c, int ldc);
using SetThreadsLocal = int (*)(int threads);
using Matrix = ffi::Buffer<ffi::F32, 2>;  // an alias: a template comma would split the macro below

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
// Output rows per block at the least: fewer rows make MKL's packing of `b`, done per call, cost more than the block.
constexpr int64_t kMinBlockRows = 64;

Sgemm sgemm_fn = nullptr;
SetThreadsLocal set_threads_local_fn = nullptr;

// out (M, N) = op(a) op(b): a is (M, K), or (K, M) when transpose_a; b is (K, N), or (N, K) when transpose_b.
ffi::Error product(ffi::ThreadPool pool, Matrix a, Matrix b, ffi::Result<Matrix> out, bool transpose_a,
                   bool transpose_b) {
  if (sgemm_fn == nullptr || set_threads_local_fn == nullptr)
    return ffi::Error::Internal("mkl_matmul: MKL's functions were not handed over");
  const auto ad = a.dimensions(), bd = b.dimensions();
  const int64_t m = transpose_a ? ad[1] : ad[0], k = transpose_a ? ad[0] : ad[1];
  const int64_t n = transpose_b ? bd[0] : bd[1], kb = transpose_b ? bd[1] : bd[0];
  if (kb != k || out->dimensions()[0] != m || out->dimensions()[1] != n)
    return ffi::Error::InvalidArgument("mkl_matmul: operand shapes do not match");
  constexpr int64_t kMax = std::numeric_limits<int>::max();  // LP64 MKL takes 32-bit sizes
  if (m > kMax || n > kMax || k > kMax)
    return ffi::Error::InvalidArgument("mkl_matmul: a dimension is too large for 32-bit MKL");
  float* c = out->typed_data();
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {  // an empty sum; cblas_sgemm would reject the leading dimension 0 and leave `out` unwritten
    std::fill(c, c + m * n, 0.f);
    return ffi::Error::Success();
  }
  const float* a_data = a.typed_data();
  const float* b_data = b.typed_data();
  const int64_t blocks = std::clamp<int64_t>(m / kMinBlockRows, 1, pool.num_threads());
  transformer_jax::run_blocks(pool, blocks, [&](int64_t block) {
    const int64_t first = m * block / blocks, rows = m * (block + 1) / blocks - first;
    // row `first` of op(a): a row of `a`, or a column of a transposed `a`
    const float* a_rows = a_data + (transpose_a ? first : first * k);
    const int before = set_threads_local_fn(1);
    sgemm_fn(kRowMajor, transpose_a ? kTrans : kNoTrans, transpose_b ? kTrans : kNoTrans, rows, n, k, 1.f, a_rows,
             ad[1], b_data, bd[1], 0.f, c + first * n, n);
    set_threads_local_fn(before);
  });
  return ffi::Error::Success();
}

}  // namespace

extern "C" void TransformerJaxSetMkl(void* sgemm, void* set_threads_local) {
  sgemm_fn = reinterpret_cast<Sgemm>(sgemm);
  set_threads_local_fn = reinterpret_cast<SetThreadsLocal>(set_threads_local);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(TransformerJaxMklMatmul, product,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Matrix>()
                                  .Arg<Matrix>()
                                  .Ret<Matrix>()
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b"));
