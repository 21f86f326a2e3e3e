// Layer and RMS normalisation over the last axis on the CPU, forward and backward, a row at a time while it is in
// cache.
//
// forward:  x (..., D) (R rows of D), scale (D,), bias (D,) -> y = c r scale + bias (in x's dtype), and per row the
//           mean and r, where c = x - mean and r is 1 / sqrt(var + eps) (kStandard, the biased variance), 1 / (std +
//           eps) (kUnbiasedStd, the unbiased std) or, with c = x and no mean, 1 / sqrt(mean(x^2) + eps) (kRms).
// backward: x, scale, mean, r, dy -> dx, dscale = sum over rows of dy c r, dbias = sum of dy. With g = dy scale,
//           dx = r (g - mean(g)) - b c sum(g c), where b = r^3 / D (kStandard), r^2 / ((D - 1) std) (kUnbiasedStd,
//           0 for a constant row) or, with no mean(g) term and c = x, r^3 / D (kRms).
//
// XLA:CPU computes a norm as several fusions over the (R, D) array (the mean, the centred square's mean, the
// normalised output; in the backward pass three row reductions, two column reductions and the elementwise terms),
// each a pass over memory. On Ice Lake, a (2,048, 384) float32 layer norm forward and backward took 1.7-2.0 ms
// alone against 0.73-0.76 ms here, and the norms' fusions were about 50 ms of a course GPT step's op time. Statistics
// are float32 whatever x's dtype (bfloat16 is widened).
//
// Rows are shared out over XLA's intra-op pool in blocks. The column sums of the backward pass are summed per block,
// then over blocks in order: the blocks depend on R only, so the result does not depend on the number of threads.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "bfloat16.h"
#include "float_buffers.h"
#include "pool_blocks.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using transformer_jax::as;
using transformer_jax::by_dtype;
using transformer_jax::narrow;
using transformer_jax::widen;

namespace {

enum Kind : int32_t { kStandard = 0, kUnbiasedStd = 1, kRms = 2 };

constexpr int64_t kBlockElements = 1 << 15;  // elements per pool block at the least (128 KB of float32)
constexpr int64_t kMaxBlocks = 64;           // so the backward's per-block column sums stay small

// Pool blocks of whole rows: at least kBlockElements each, at most kMaxBlocks, a number that depends on the shape
// alone (none for no rows).
int64_t block_count(int64_t rows, int64_t width) {
  return rows == 0 ? 0 : std::clamp<int64_t>(rows * width / kBlockElements, 1, std::min(rows, kMaxBlocks));
}

template <typename T>
void forward_rows(const T* x, const float* scale, const float* bias, int64_t first, int64_t last, int64_t D,
                  float eps, Kind kind, T* y, float* mean_out, float* inverse_out, float* c) {
  for (int64_t i = first; i < last; ++i) {
    const T* row = x + i * D;
    float sum = 0.0f;
    if (kind != kRms) {
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < D; ++j) sum += widen(row[j]);
    }
    const float mean = sum / D;  // 0 for RMS, which does not centre
    float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
    for (int64_t j = 0; j < D; ++j) {
      c[j] = widen(row[j]) - mean;
      squares += c[j] * c[j];
    }
    const float inverse = kind == kUnbiasedStd ? 1.0f / (std::sqrt(squares / (D - 1)) + eps)
                                               : 1.0f / std::sqrt(squares / D + eps);
    T* out = y + i * D;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) out[j] = narrow<T>(c[j] * inverse * scale[j] + bias[j]);
    mean_out[i] = mean;
    inverse_out[i] = inverse;
  }
}

// dx for rows [first, last), and their column sums into dscale and dbias (D each, added to).
template <typename T>
void backward_rows(const T* x, const float* scale, const float* mean, const float* inverse, const T* dy,
                   int64_t first, int64_t last, int64_t D, Kind kind, T* dx, float* dscale, float* dbias, float* c,
                   float* g) {
  for (int64_t i = first; i < last; ++i) {
    const T *row = x + i * D, *d_row = dy + i * D;
    const float r = inverse[i];
    float sum_g = 0.0f, sum_gc = 0.0f, sum_cc = 0.0f;
#pragma omp simd reduction(+ : sum_g, sum_gc, sum_cc)
    for (int64_t j = 0; j < D; ++j) {
      const float d = widen(d_row[j]);
      c[j] = widen(row[j]) - mean[i];
      g[j] = d * scale[j];
      sum_g += g[j];
      sum_gc += g[j] * c[j];
      sum_cc += c[j] * c[j];
      dscale[j] += d * c[j] * r;
      dbias[j] += d;
    }
    float b;
    if (kind == kUnbiasedStd) {
      const float std_dev = std::sqrt(sum_cc / (D - 1));
      b = std_dev > 0.0f ? r * r / ((D - 1) * std_dev) : 0.0f;
    } else {
      b = r * r * r / D;
    }
    const float g_mean = kind == kRms ? 0.0f : sum_g / D, c_term = b * sum_gc;
    T* out = dx + i * D;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) out[j] = narrow<T>(r * (g[j] - g_mean) - c_term * c[j]);
  }
}

struct Layout {
  int64_t rows, width;
  Kind kind;

  // the first row of pool block `block` of `blocks` (block == blocks: one past the last row)
  int64_t first_row(int64_t block, int64_t blocks) const { return rows * block / blocks; }
};

ffi::Error layout_of(ffi::AnyBuffer x, ffi::Buffer<ffi::F32> scale, int32_t kind, Layout& out) {
  const auto dims = x.dimensions();
  if (dims.size() == 0 || dims.back() == 0) return ffi::Error::InvalidArgument("norm: x must be (..., D), D > 0");
  const int64_t width = dims.back();
  if (scale.element_count() != width) return ffi::Error::InvalidArgument("norm: scale must be (D,)");
  if (kind < kStandard || kind > kRms) return ffi::Error::InvalidArgument("norm: unknown kind");
  if (kind == kUnbiasedStd && width < 2) return ffi::Error::InvalidArgument("norm: the unbiased std needs D >= 2");
  out = {static_cast<int64_t>(x.element_count()) / width, width, static_cast<Kind>(kind)};
  return ffi::Error::Success();
}

ffi::Error forward(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                   float eps, int32_t kind, ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::Buffer<ffi::F32>> mean,
                   ffi::Result<ffi::Buffer<ffi::F32>> inverse) {
  Layout l;
  if (auto error = layout_of(x, scale, kind, l); error.failure()) return error;
  if (bias.element_count() != l.width) return ffi::Error::InvalidArgument("norm: bias must be (D,)");
  if (x.element_type() != y->element_type()) return ffi::Error::InvalidArgument("norm: y must be x's dtype");
  const int64_t blocks = block_count(l.rows, l.width);
  return by_dtype(x.element_type(), "norm", [&](auto type) {
    using T = decltype(type);
    transformer_jax::run_blocks(pool, blocks, [&](int64_t block) {
      std::vector<float> centred(l.width);
      forward_rows<T>(as<T>(x), scale.typed_data(), bias.typed_data(), l.first_row(block, blocks),
                      l.first_row(block + 1, blocks), l.width, eps, l.kind, as<T>(y), mean->typed_data(),
                      inverse->typed_data(), centred.data());
    });
  });
}

ffi::Error backward(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> mean,
                    ffi::Buffer<ffi::F32> inverse, ffi::AnyBuffer dy, int32_t kind, ffi::Result<ffi::AnyBuffer> dx,
                    ffi::Result<ffi::Buffer<ffi::F32>> dscale, ffi::Result<ffi::Buffer<ffi::F32>> dbias) {
  Layout l;
  if (auto error = layout_of(x, scale, kind, l); error.failure()) return error;
  if (mean.element_count() != l.rows || inverse.element_count() != l.rows || dy.element_count() != x.element_count())
    return ffi::Error::InvalidArgument("norm: backward operands disagree");
  if (x.element_type() != dy.element_type() || x.element_type() != dx->element_type())
    return ffi::Error::InvalidArgument("norm: x, dy and dx must share a dtype");
  const int64_t blocks = block_count(l.rows, l.width), D = l.width;
  std::vector<float> sums(blocks * 2 * D, 0.0f);  // per block: its dscale, then its dbias
  auto error = by_dtype(x.element_type(), "norm", [&](auto type) {
    using T = decltype(type);
    transformer_jax::run_blocks(pool, blocks, [&](int64_t block) {
      std::vector<float> centred(D), g(D);
      float* block_sums = sums.data() + block * 2 * D;
      backward_rows<T>(as<T>(x), scale.typed_data(), mean.typed_data(), inverse.typed_data(), as<T>(dy),
                       l.first_row(block, blocks), l.first_row(block + 1, blocks), D, l.kind, as<T>(dx), block_sums,
                       block_sums + D, centred.data(), g.data());
    });
  });
  if (error.failure()) return error;
  float *ds = dscale->typed_data(), *db = dbias->typed_data();
  std::fill(ds, ds + D, 0.0f);
  std::fill(db, db + D, 0.0f);
  for (int64_t block = 0; block < blocks; ++block) {
    const float* block_sums = sums.data() + block * 2 * D;
    for (int64_t j = 0; j < D; ++j) {
      ds[j] += block_sums[j];
      db[j] += block_sums[D + j];
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TransformerJaxNormForward, forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("epsilon")
                                  .Attr<int32_t>("kind")
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(TransformerJaxNormBackward, backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Attr<int32_t>("kind")
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
