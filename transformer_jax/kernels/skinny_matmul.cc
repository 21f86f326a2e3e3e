// Skinny matrix products on the CPU: out (M, N) float32 = x (M, K) float32 . W, for the few rows (M <= 8) of a
// decoding step. XLA:CPU's own code for a one-row product is fast for float32 but converts bfloat16 weights one
// element at a time (2 GB/s), and its library kernels (YNNPACK) take only M >= 2 and repack the weights on every
// call. Here each weight is read once, widened to float32 in registers and accumulated in float32, so a bfloat16
// weight costs half the memory traffic of a float32 one.
//
// W is either (K, N) row-major (a Dense kernel, `transposed` false) or (N, K) row-major (a tied embedding table,
// `transposed` true). Work is split into column (or row) blocks shared out over helper threads that stay awake
// between a decoding step's products (awake_helpers.h), or over XLA's intra-op pool when those are busy.
// Compiled with -march=native by transformer_jax/kernels/cpu_build.py, so the portable loops below vectorise for the
// host's ISA; with AVX-512, float32 and bfloat16 weights take the blocks of skinny_avx512.h instead (two instructions
// widen 32 bfloat16 weights; the rows ahead are prefetched per cache line). x is float32 or bfloat16: two or more
// bfloat16 rows by bfloat16 weights (a bf16 model's batched step) run as AVX512-BF16 dot products of pairs where the
// CPU has them (skinny_bf16_pairs.h); any other bfloat16 rows are widened first.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "awake_helpers.h"
#include "skinny_limits.h"
#if defined(__AVX512F__)
#include "skinny_avx512.h"
#include "skinny_bf16_pairs.h"
#endif

namespace ffi = xla::ffi;

namespace {

// Float32 accumulators per block of a (K, N) weight (all rows): 16 KiB, so they stay in L1 while the weight rows
// stream past; one row reads segments of up to 4,096 columns.
constexpr int64_t kAccumulators = 4096;
// Rows of an (N, K) weight per block.
constexpr int64_t kTableRows = 128;
inline void prefetch_row(const void* start, int64_t bytes) {
  const char* p = static_cast<const char*>(start);
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b);
}

using transformer_jax::kMaxRows;
using transformer_jax::kTablePrefetchRows;
using transformer_jax::widen;

// acc (rows, width) += x[:, k0:k1] . W[k0:k1, n0:n0+width], four weight rows per pass over the accumulators.
template <typename Weight>
void kn_accumulate(const float* x, const Weight* w, float* acc, int64_t rows, int64_t k_dim, int64_t n_dim,
                   int64_t k0, int64_t k1, int64_t n0, int64_t width) {
  int64_t k = k0;
  for (; k + 4 <= k1; k += 4) {
    const Weight* w0 = w + k * n_dim + n0;
    const Weight* w1 = w0 + n_dim;
    const Weight* w2 = w1 + n_dim;
    const Weight* w3 = w2 + n_dim;
    for (int64_t m = 0; m < rows; ++m) {
      const float* xm = x + m * k_dim + k;
      const float a0 = xm[0], a1 = xm[1], a2 = xm[2], a3 = xm[3];
      float* o = acc + m * width;
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) {
        o[j] += a0 * widen(w0[j]) + a1 * widen(w1[j]) + a2 * widen(w2[j]) + a3 * widen(w3[j]);
      }
    }
  }
  for (; k < k1; ++k) {
    const Weight* w0 = w + k * n_dim + n0;
    for (int64_t m = 0; m < rows; ++m) {
      const float a0 = x[m * k_dim + k];
      float* o = acc + m * width;
#pragma omp simd
      for (int64_t j = 0; j < width; ++j) o[j] += a0 * widen(w0[j]);
    }
  }
}

// part[m, n0:n1] = sum over k0 <= k < k1 of x[m, k] * W[k, n0:n1] (`part` has out's (rows, N) layout).
template <typename Weight>
void kn_block(const float* x, const Weight* w, float* part, int64_t rows, int64_t k_dim, int64_t n_dim,
              int64_t k0, int64_t k1, int64_t n0, int64_t n1) {
  float acc[kAccumulators];
  const int64_t width = n1 - n0;
  std::fill(acc, acc + rows * width, 0.f);
#if defined(__AVX512F__)
  transformer_jax::kn_accumulate_avx512(x, w, acc, rows, k_dim, n_dim, k0, k1, n0, width);
  if constexpr (std::is_same_v<Weight, uint16_t>) {  // its accumulators are in even/odd order
    for (int64_t m = 0; m < rows; ++m) transformer_jax::store_in_order(acc + m * width, part + m * n_dim + n0, width);
    return;
  }
#else
  kn_accumulate(x, w, acc, rows, k_dim, n_dim, k0, k1, n0, width);
#endif
  for (int64_t m = 0; m < rows; ++m) std::memcpy(part + m * n_dim + n0, acc + m * width, width * sizeof(float));
}

// out[m, n] = sum_k x[m, k] * W[n, k] for the table rows n0..n1.
template <typename Weight>
void nk_block(const float* x, const Weight* w, float* out, int64_t rows, int64_t k_dim, int64_t n_dim,
              int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const Weight* row = w + n * k_dim;
    if (n + kTablePrefetchRows < n1) prefetch_row(row + kTablePrefetchRows * k_dim, k_dim * sizeof(Weight));
    for (int64_t m = 0; m < rows; ++m) {
      const float* xm = x + m * k_dim;
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t k = 0; k < k_dim; ++k) sum += xm[k] * widen(row[k]);
      out[m * n_dim + n] = sum;
    }
  }
}

#if defined(TRANSFORMER_JAX_BF16_PAIRS)
// kn_block for bfloat16 rows of x by bfloat16 weights, by AVX512-BF16's pairs (skinny_bf16_pairs.h).
void kn_pair_block(const uint16_t* x, const uint16_t* w, float* part, int64_t rows, int64_t k_dim, int64_t n_dim,
                   int64_t k0, int64_t k1, int64_t n0, int64_t n1) {
  float acc[kAccumulators];
  const int64_t width = n1 - n0;
  std::fill(acc, acc + rows * width, 0.f);
  transformer_jax::kn_accumulate_pairs(x, w, acc, rows, k_dim, n_dim, k0, k1, n0, width);
  for (int64_t m = 0; m < rows; ++m) {
    transformer_jax::store_pairs_in_order(acc + m * width, part + m * n_dim + n0, width);
  }
}
#endif

// A (K, N) weight is cut into column strips whose accumulators fit kAccumulators and, when that leaves fewer
// blocks than twice the pool's threads, into slices of K too: each slice sums into its own partial output, and the
// partials are added in a fixed order, so results never depend on the thread count's timing. block(part, k0, k1,
// n0, n1) is kn_block or kn_pair_block on this product's operands.
template <typename Block>
void kn_product(ffi::ThreadPool& pool, float* out, int64_t rows, int64_t k_dim, int64_t n_dim, Block block) {
  const int64_t columns = std::max<int64_t>(16, (kAccumulators / rows) / 16 * 16);
  const int64_t strips = (n_dim + columns - 1) / columns;
  const int64_t wanted = 2 * std::max<int64_t>(1, pool.num_threads());
  const int64_t slices = std::clamp<int64_t>((wanted + strips - 1) / strips, 1, std::max<int64_t>(1, k_dim / 64));
  const int64_t depth = (k_dim + slices - 1) / slices;
  std::vector<float> partials(slices > 1 ? (slices - 1) * rows * n_dim : 0);
  transformer_jax::run_blocks_awake(pool, strips * slices, [=, &partials](int64_t index) {
    const int64_t slice = index / strips, strip = index % strips;
    const int64_t n0 = strip * columns, n1 = std::min(n_dim, n0 + columns);
    const int64_t k0 = slice * depth, k1 = std::min(k_dim, k0 + depth);
    float* part = slice == 0 ? out : partials.data() + (slice - 1) * rows * n_dim;
    if (k0 < k1) {
      block(part, k0, k1, n0, n1);
    } else {
      for (int64_t m = 0; m < rows; ++m) std::fill(part + m * n_dim + n0, part + m * n_dim + n1, 0.f);
    }
  });
  for (int64_t slice = 1; slice < slices; ++slice) {
    const float* part = partials.data() + (slice - 1) * rows * n_dim;
#pragma omp simd
    for (int64_t i = 0; i < rows * n_dim; ++i) out[i] += part[i];
  }
}

// Runs block(n0, n1) over the table rows of an (N, K) weight, kTableRows at a time, on the helpers.
template <typename Block>
void table_blocks(ffi::ThreadPool& pool, int64_t n_dim, Block block) {
  transformer_jax::run_blocks_awake(pool, (n_dim + kTableRows - 1) / kTableRows, [=](int64_t i) {
    block(i * kTableRows, std::min(n_dim, (i + 1) * kTableRows));
  });
}

template <typename Weight>
void product(ffi::ThreadPool& pool, const float* x, const Weight* w, float* out, int64_t rows, int64_t k_dim,
             int64_t n_dim, bool transposed) {
  if (!transposed) {
    return kn_product(pool, out, rows, k_dim, n_dim, [=](float* part, int64_t k0, int64_t k1, int64_t n0, int64_t n1) {
      kn_block<Weight>(x, w, part, rows, k_dim, n_dim, k0, k1, n0, n1);
    });
  }
#if defined(__AVX512F__)
  const float* xp = x;
  std::vector<float> paired;
  if constexpr (std::is_same_v<Weight, uint16_t>) {  // bfloat16 blocks take x in even/odd order
    paired.resize(rows * k_dim);
    for (int64_t m = 0; m < rows; ++m) transformer_jax::load_in_pairs(x + m * k_dim, paired.data() + m * k_dim, k_dim);
    xp = paired.data();
  }
  table_blocks(pool, n_dim, [=](int64_t n0, int64_t n1) {
    transformer_jax::nk_block_avx512(xp, w, out, rows, k_dim, n_dim, n0, n1);
  });
#else
  table_blocks(pool, n_dim, [=](int64_t n0, int64_t n1) { nk_block<Weight>(x, w, out, rows, k_dim, n_dim, n0, n1); });
#endif
}

#if defined(TRANSFORMER_JAX_BF16_PAIRS)
// The fewest rows of x that take the pairs. One row is bound by memory either way, and whole decodes with one
// sequence were 1-3% slower with the pairs (bf16 GPT-2 small on Zen 4, 8.30-8.48 -> 8.52-8.59 ms a token); from two
// rows, where a weight row serves several rows of x, they are faster (its tied head at 2 rows: 2.99 -> 2.09 ms).
constexpr int64_t kPairRows = 2;

// product for bfloat16 rows of x by bfloat16 weights, by AVX512-BF16's pairs.
void pair_product(ffi::ThreadPool& pool, const uint16_t* x, const uint16_t* w, float* out, int64_t rows,
                  int64_t k_dim, int64_t n_dim, bool transposed) {
  if (!transposed) {
    return kn_product(pool, out, rows, k_dim, n_dim, [=](float* part, int64_t k0, int64_t k1, int64_t n0, int64_t n1) {
      kn_pair_block(x, w, part, rows, k_dim, n_dim, k0, k1, n0, n1);
    });
  }
  table_blocks(pool, n_dim, [=](int64_t n0, int64_t n1) {
    transformer_jax::nk_block_pairs(x, w, out, rows, k_dim, n_dim, n0, n1);
  });
}
#endif

ffi::Error skinny_matmul(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::ResultBuffer<ffi::F32> out,
                         bool transposed) {
  const auto x_dims = x.dimensions();
  const auto w_dims = w.dimensions();
  if (x_dims.size() != 2 || w_dims.size() != 2) return ffi::Error::InvalidArgument("x and W must be matrices");
  const int64_t rows = x_dims[0], k_dim = x_dims[1];
  const int64_t n_dim = transposed ? w_dims[0] : w_dims[1];
  if (rows > kMaxRows) return ffi::Error::InvalidArgument("skinny_matmul takes at most 8 rows");
  if ((transposed ? w_dims[1] : w_dims[0]) != k_dim) return ffi::Error::InvalidArgument("x and W disagree on K");
  const bool x_bf16 = x.element_type() == ffi::BF16, w_bf16 = w.element_type() == ffi::BF16;
  if ((!x_bf16 && x.element_type() != ffi::F32) || (!w_bf16 && w.element_type() != ffi::F32)) {
    return ffi::Error::InvalidArgument("x and W must be bfloat16 or float32");
  }
  const auto* x_bits = reinterpret_cast<const uint16_t*>(x.untyped_data());
  const auto* w_bits = reinterpret_cast<const uint16_t*>(w.untyped_data());
#if defined(TRANSFORMER_JAX_BF16_PAIRS)
  if (x_bf16 && w_bf16 && rows >= kPairRows) {
    pair_product(pool, x_bits, w_bits, out->typed_data(), rows, k_dim, n_dim, transposed);
    return ffi::Error::Success();
  }
#endif
  std::vector<float> widened;  // bfloat16 rows of x, as float32 (the same values) for the blocks below
  if (x_bf16) {
    widened.resize(rows * k_dim);
    std::transform(x_bits, x_bits + rows * k_dim, widened.begin(), [](uint16_t v) { return widen(v); });
  }
  const float* xf = x_bf16 ? widened.data() : reinterpret_cast<const float*>(x.untyped_data());
  if (w_bf16) {
    product(pool, xf, w_bits, out->typed_data(), rows, k_dim, n_dim, transposed);
  } else {
    product(pool, xf, reinterpret_cast<const float*>(w.untyped_data()), out->typed_data(), rows, k_dim, n_dim,
            transposed);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TransformerJaxSkinnyMatmul, skinny_matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transposed"));
