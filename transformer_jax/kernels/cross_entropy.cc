// Softmax cross-entropy of float32 rows on the CPU, forward and backward, each row read once from memory.
//
// forward:  x (R, V), t (R,) -> nll = lse - x[t], uniform = lse - mean(x) (label smoothing's term), lse, and the
//           argmax (row_max.h); lse = max + log(sum exp(x - max)). A target outside [0, V) gives a NaN nll.
// backward: x, t, lse, g_nll, g_uniform (R,) -> dx = exp(x - lse) (g_nll + g_uniform) - g_uniform / V, less g_nll
//           at the target.
//
// XLA:CPU runs the same loss as passes over the (R, V) logits: the max, exp(x - max) written out, its sum, and in
// the backward pass another read and write. For GPT-2's 50,257-way logits over 2,048 positions those passes over
// 411 MB were 250-600 ms of a training step. Here a row (200 KB) is read from memory once and its other passes hit
// the cache. Rows are shared out over XLA's intra-op pool.
//
// Without -ftrapping-math GCC if-converts the float selects of exp_nonpositive, so its loops vectorise (23 against
// 179 us a 50,257-row on Ice Lake); these kernels raise no floating-point traps.
#pragma GCC optimize("no-trapping-math")

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "pool_blocks.h"
#include "row_max.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlockElements = 1 << 15;  // rows per pool block: at least 128 KB of logits each

// exp(x) for the x <= 0 of a softmax: 2^n e^r with |r| <= ln2 / 2 (Cephes' expf polynomial, within 1.4 ulp of exp
// over [-87, 0]); 0 below -87, where exp is subnormal. In plain float operations, so that loops vectorise.
inline float exp_nonpositive(float x) {
  constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  const float clamped = x < -87.0f ? -87.0f : x;
  const float n = std::floor(clamped * kLog2e + 0.5f);
  const float r = clamped - n * kLn2Hi - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  const float scale = __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);
  return x < -87.0f ? 0.0f : e * scale;
}

struct Rows {
  int64_t count, width;
};

ffi::Error rows_of(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::S32>& t, Rows& rows) {
  const auto dims = x.dimensions();
  if (dims.size() == 0 || dims.back() == 0) return ffi::Error::InvalidArgument("cross_entropy: empty last axis");
  rows = {x.element_count() / dims.back(), dims.back()};
  if (t.element_count() != rows.count) return ffi::Error::InvalidArgument("cross_entropy: one target per row");
  return ffi::Error::Success();
}

template <typename Row>
void each_row(ffi::ThreadPool& pool, Rows rows, Row row) {
  const int64_t per_block = (kBlockElements + rows.width - 1) / rows.width;
  const int64_t blocks = (rows.count + per_block - 1) / per_block;
  auto run = [&](int64_t block) {
    const int64_t end = std::min(rows.count, (block + 1) * per_block);
    for (int64_t r = block * per_block; r < end; ++r) row(r);
  };
  if (blocks == 1) return run(0);
  transformer_jax::run_blocks(pool, blocks, run);
}

ffi::Error forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> t,
                   ffi::Result<ffi::Buffer<ffi::F32>> nll, ffi::Result<ffi::Buffer<ffi::F32>> uniform,
                   ffi::Result<ffi::Buffer<ffi::F32>> lse, ffi::Result<ffi::Buffer<ffi::S32>> predicted) {
  Rows rows;
  if (ffi::Error error = rows_of(x, t, rows); error.failure()) return error;
  const int64_t n = rows.width;
  const float* logits = x.typed_data();
  const int32_t* target = t.typed_data();
  each_row(pool, rows, [&](int64_t r) {
    const float* row = logits + r * n;
    const transformer_jax::RowMax m = transformer_jax::row_max(row, n);
    float total = 0.0f, sum_exp = 0.0f;
#pragma omp simd reduction(+ : total, sum_exp)
    for (int64_t i = 0; i < n; ++i) {
      total += row[i];
      sum_exp += exp_nonpositive(row[i] - m.value);
    }
    const float log_norm = m.nan ? std::numeric_limits<float>::quiet_NaN() : m.value + std::log(sum_exp);
    const int32_t at = target[r];
    nll->typed_data()[r] = 0 <= at && at < n ? log_norm - row[at] : std::numeric_limits<float>::quiet_NaN();
    uniform->typed_data()[r] = log_norm - total / static_cast<float>(n);
    lse->typed_data()[r] = log_norm;
    predicted->typed_data()[r] = transformer_jax::first_index_of(row, n, m);
  });
  return ffi::Error::Success();
}

ffi::Error backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> t, ffi::Buffer<ffi::F32> lse,
                    ffi::Buffer<ffi::F32> g_nll, ffi::Buffer<ffi::F32> g_uniform,
                    ffi::Result<ffi::Buffer<ffi::F32>> dx) {
  Rows rows;
  if (ffi::Error error = rows_of(x, t, rows); error.failure()) return error;
  if (lse.element_count() != rows.count || g_nll.element_count() != rows.count ||
      g_uniform.element_count() != rows.count) {
    return ffi::Error::InvalidArgument("cross_entropy backward: one value per row");
  }
  const int64_t n = rows.width;
  each_row(pool, rows, [&](int64_t r) {
    const float* row = x.typed_data() + r * n;
    float* out = dx->typed_data() + r * n;
    const float log_norm = lse.typed_data()[r], gn = g_nll.typed_data()[r], gu = g_uniform.typed_data()[r];
    const float scale = gn + gu, spread = gu / static_cast<float>(n);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = exp_nonpositive(row[i] - log_norm) * scale - spread;
    const int32_t at = t.typed_data()[r];
    if (0 <= at && at < n) out[at] -= gn;
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TransformerJaxCrossEntropyForward, forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(TransformerJaxCrossEntropyBackward, backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
