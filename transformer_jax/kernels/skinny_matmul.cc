// Skinny matrix products on the CPU: out (M, N) float32 = x (M, K) float32 . W, for the few rows (M <= 8) of a
// decoding step. XLA:CPU's own code for a one-row product is fast for float32 but converts bfloat16 weights one
// element at a time (2 GB/s), and its library kernels (YNNPACK) take only M >= 2 and repack the weights on every
// call. Here each weight is read once, widened to float32 in registers and accumulated in float32, so a bfloat16
// weight costs half the memory traffic of a float32 one.
//
// W is either (K, N) row-major (a Dense kernel, `transposed` false) or (N, K) row-major (a tied embedding table,
// `transposed` true). Work is split into column (or row) blocks shared out over XLA's intra-op thread pool.
// Compiled with -march=native by transformer_jax/kernels/cpu_build.py, so the loops vectorise for the host's ISA.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"
#include "pool_blocks.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMaxRows = 8;
// Columns of a (K, N) weight per block: the float32 accumulators of kMaxRows rows stay in L1 (16 KiB).
constexpr int64_t kColumns = 512;
// Rows of an (N, K) weight per block.
constexpr int64_t kTableRows = 128;

inline float widen(uint16_t bits) {
  const uint32_t wide = uint32_t(bits) << 16;  // bfloat16 is the high half of a float32
  float value;
  std::memcpy(&value, &wide, sizeof(value));
  return value;
}
inline float widen(float value) { return value; }

// out[m, n0:n1] = sum_k x[m, k] * W[k, n0:n1], four weight rows per pass over the accumulators.
template <typename Weight>
void kn_block(const float* x, const Weight* w, float* out, int64_t rows, int64_t k_dim, int64_t n_dim,
              int64_t n0, int64_t n1) {
  float acc[kMaxRows][kColumns];
  const int64_t width = n1 - n0;
  for (int64_t m = 0; m < rows; ++m) std::fill(acc[m], acc[m] + width, 0.f);
  int64_t k = 0;
  for (; k + 4 <= k_dim; k += 4) {
    const Weight* w0 = w + k * n_dim + n0;
    const Weight* w1 = w0 + n_dim;
    const Weight* w2 = w1 + n_dim;
    const Weight* w3 = w2 + n_dim;
    for (int64_t m = 0; m < rows; ++m) {
      const float* xm = x + m * k_dim + k;
      const float a0 = xm[0], a1 = xm[1], a2 = xm[2], a3 = xm[3];
      float* o = acc[m];
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) {
        o[j] += a0 * widen(w0[j]) + a1 * widen(w1[j]) + a2 * widen(w2[j]) + a3 * widen(w3[j]);
      }
    }
  }
  for (; k < k_dim; ++k) {
    const Weight* w0 = w + k * n_dim + n0;
    for (int64_t m = 0; m < rows; ++m) {
      const float a0 = x[m * k_dim + k];
      float* o = acc[m];
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) o[j] += a0 * widen(w0[j]);
    }
  }
  for (int64_t m = 0; m < rows; ++m) std::memcpy(out + m * n_dim + n0, acc[m], width * sizeof(float));
}

// out[m, n] = sum_k x[m, k] * W[n, k] for the table rows n0..n1.
template <typename Weight>
void nk_block(const float* x, const Weight* w, float* out, int64_t rows, int64_t k_dim, int64_t n_dim,
              int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const Weight* row = w + n * k_dim;
    for (int64_t m = 0; m < rows; ++m) {
      const float* xm = x + m * k_dim;
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t k = 0; k < k_dim; ++k) sum += xm[k] * widen(row[k]);
      out[m * n_dim + n] = sum;
    }
  }
}

template <typename Weight>
void product(ffi::ThreadPool& pool, const float* x, const Weight* w, float* out, int64_t rows, int64_t k_dim,
             int64_t n_dim, bool transposed) {
  const int64_t per_block = transposed ? kTableRows : kColumns;
  const int64_t count = (n_dim + per_block - 1) / per_block;
  transformer_jax::run_blocks(pool, count, [=](int64_t block) {
    const int64_t n0 = block * per_block, n1 = std::min(n_dim, n0 + per_block);
    if (transposed) {
      nk_block<Weight>(x, w, out, rows, k_dim, n_dim, n0, n1);
    } else {
      kn_block<Weight>(x, w, out, rows, k_dim, n_dim, n0, n1);
    }
  });
}

ffi::Error skinny_matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                         ffi::ResultBuffer<ffi::F32> out, bool transposed) {
  const auto x_dims = x.dimensions();
  const auto w_dims = w.dimensions();
  if (x_dims.size() != 2 || w_dims.size() != 2) return ffi::Error::InvalidArgument("x and W must be matrices");
  const int64_t rows = x_dims[0], k_dim = x_dims[1];
  const int64_t n_dim = transposed ? w_dims[0] : w_dims[1];
  if (rows > kMaxRows) return ffi::Error::InvalidArgument("skinny_matmul takes at most 8 rows");
  if ((transposed ? w_dims[1] : w_dims[0]) != k_dim) return ffi::Error::InvalidArgument("x and W disagree on K");
  if (w.element_type() == ffi::BF16) {
    product(pool, x.typed_data(), reinterpret_cast<const uint16_t*>(w.untyped_data()), out->typed_data(), rows,
            k_dim, n_dim, transposed);
  } else if (w.element_type() == ffi::F32) {
    product(pool, x.typed_data(), reinterpret_cast<const float*>(w.untyped_data()), out->typed_data(), rows, k_dim,
            n_dim, transposed);
  } else {
    return ffi::Error::InvalidArgument("W must be bfloat16 or float32");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TransformerJaxSkinnyMatmul, skinny_matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transposed"));
