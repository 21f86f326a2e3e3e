// A bfloat16 matrix product with a float32 result by oneDNN's dnnl_gemm_bf16bf16f32 (AVX512-BF16 where the CPU has
// it), split over XLA's thread pool in single-threaded oneDNN calls: row_block_product.h. oneDNN's OpenMP build
// takes its thread count from the calling thread's OpenMP setting, which each block sets to one and restores (a
// thread-local setting: other OpenMP users in the process keep theirs). onednn_matmul.py loads libdnnl privately and
// hands its functions over with TransformerJaxSetOnednn.
#include <cstdint>
#include <limits>

#include "row_block_product.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using GemmBf16 = int (*)(char transa, char transb, int64_t m, int64_t n, int64_t k, float alpha, const uint16_t* a,
                         int64_t lda, const uint16_t* b, int64_t ldb, float beta, float* c, int64_t ldc);
using SetThreads = void (*)(int threads);
using GetThreads = int (*)();
using Bf16Matrix = ffi::Buffer<ffi::BF16, 2>;  // aliases: a template comma would split the macro below
using F32Matrix = ffi::Buffer<ffi::F32, 2>;

GemmBf16 gemm_fn = nullptr;
SetThreads set_threads_fn = nullptr;
GetThreads get_threads_fn = nullptr;

ffi::Error product(ffi::ThreadPool pool, Bf16Matrix a, Bf16Matrix b, ffi::Result<F32Matrix> out, bool transpose_a,
                   bool transpose_b) {
  if (gemm_fn == nullptr || set_threads_fn == nullptr || get_threads_fn == nullptr)
    return ffi::Error::Internal("onednn_matmul: oneDNN's functions were not handed over");
  const int64_t lda = a.dimensions()[1], ldb = b.dimensions()[1];
  const auto* a_data = reinterpret_cast<const uint16_t*>(a.untyped_data());
  const auto* b_data = reinterpret_cast<const uint16_t*>(b.untyped_data());
  float* c = out->typed_data();
  return transformer_jax::row_block_product(
      pool, a, b, *out, transpose_a, transpose_b, std::numeric_limits<int64_t>::max(),
      [&](int64_t first, int64_t rows, int64_t a_offset, const transformer_jax::ProductShape& s) {
        const int before = get_threads_fn();
        set_threads_fn(1);
        const int status = gemm_fn(transpose_a ? 'T' : 'N', transpose_b ? 'T' : 'N', rows, s.n, s.k, 1.f,
                                   a_data + a_offset, lda, b_data, ldb, 0.f, c + first * s.n, s.n);
        set_threads_fn(before);
        return status == 0;  // dnnl_success
      });
}

}  // namespace

extern "C" void TransformerJaxSetOnednn(void* gemm, void* set_threads, void* get_threads) {
  gemm_fn = reinterpret_cast<GemmBf16>(gemm);
  set_threads_fn = reinterpret_cast<SetThreads>(set_threads);
  get_threads_fn = reinterpret_cast<GetThreads>(get_threads);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(TransformerJaxOnednnMatmul, product,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Bf16Matrix>()
                                  .Arg<Bf16Matrix>()
                                  .Ret<F32Matrix>()
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b"));
