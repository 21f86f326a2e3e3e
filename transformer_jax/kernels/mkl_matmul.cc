// A float32 matrix product by MKL's cblas_sgemm, split over XLA's thread pool in single-threaded MKL calls (a
// thread-local setting, which leaves other users of MKL in the process as they were): row_block_product.h.
// mkl_matmul.py loads libmkl_rt privately and hands its functions over with TransformerJaxSetMkl, so no symbol of
// MKL's enters the process's global scope (another library's BLAS calls keep their own).
#include <cstdint>
#include <limits>

#include "row_block_product.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using Sgemm = void (*)(int layout, int transa, int transb, int m, int n, int k, float alpha, const float* a, int lda,
                       const float* b, int ldb, float beta, float* c, int ldc);
using SetThreadsLocal = int (*)(int threads);
using Matrix = ffi::Buffer<ffi::F32, 2>;  // an alias: a template comma would split the macro below

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

Sgemm sgemm_fn = nullptr;
SetThreadsLocal set_threads_local_fn = nullptr;

ffi::Error product(ffi::ThreadPool pool, Matrix a, Matrix b, ffi::Result<Matrix> out, bool transpose_a,
                   bool transpose_b) {
  if (sgemm_fn == nullptr || set_threads_local_fn == nullptr)
    return ffi::Error::Internal("mkl_matmul: MKL's functions were not handed over");
  constexpr int64_t kMax = std::numeric_limits<int>::max();  // LP64 MKL takes 32-bit sizes
  const int lda = a.dimensions()[1], ldb = b.dimensions()[1];
  float* c = out->typed_data();
  return transformer_jax::row_block_product(
      pool, a, b, *out, transpose_a, transpose_b, kMax,
      [&](int64_t first, int64_t rows, int64_t a_offset, const transformer_jax::ProductShape& s) {
        const int before = set_threads_local_fn(1);
        sgemm_fn(kRowMajor, transpose_a ? kTrans : kNoTrans, transpose_b ? kTrans : kNoTrans, rows, s.n, s.k, 1.f,
                 a.typed_data() + a_offset, lda, b.typed_data(), ldb, 0.f, c + first * s.n, s.n);
        set_threads_local_fn(before);
        return true;  // cblas_sgemm reports nothing
      });
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
