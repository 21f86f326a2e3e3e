// A feed-forward activation over bfloat16 hidden units on the CPU: act(a), or act(a) * b for a gated one, each in
// float32 and rounded once to bfloat16, as FeedForward computes it. kind 0 is GPT-2's tanh GELU, 1 is SiLU.
#include <algorithm>
#include <cstdint>

#include "bfloat16.h"
#include "small_gemm.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace transformer_jax {
namespace {

constexpr int64_t kGeluTanh = 0, kSilu = 1;
constexpr int64_t kChunk = 512;  // float32 values in L1 at a time

// 0.5 x (1 + tanh(z)) with z = sqrt(2 / pi) (x + 0.044715 x^3), written as x / (1 + e^-2z): 1 + tanh(z) loses
// its digits to cancellation where z is very negative (XLA's tanh saturates to -1 below z = -7.9 and gives 0),
// the quotient keeps them.
inline vec gelu_tanh(vec x) {
  const vec z = x * fma(x * x, splat(0.044715f * 0.7978845608028654f), splat(0.7978845608028654f));
  return x / (splat(1.0f) + exp(splat(-2.0f) * z));
}

// x / (1 + e^-x): e^-x saturates near 2^127 for x below -88, where the quotient is 0 in bfloat16 anyway.
inline vec silu(vec x) { return x / (splat(1.0f) + exp(-x)); }

template <int64_t kKind>
inline vec activate(vec x) {
  if constexpr (kKind == kGeluTanh) return gelu_tanh(x);
  return silu(x);
}

template <int64_t kKind>
void run(const uint16_t* a, const uint16_t* b, uint16_t* out, int64_t n) {
  alignas(64) float x[kChunk + kLanes];
  for (int64_t start = 0; start < n; start += kChunk) {
    const int64_t m = std::min(kChunk, n - start);
    for (int64_t i = 0; i < m; ++i) x[i] = widen(a[start + i]);
    for (int64_t i = m; i < m + kLanes; ++i) x[i] = 0.0f;  // the last vector's unused lanes
    for (int64_t i = 0; i < m; i += kLanes) store(x + i, activate<kKind>(load(x + i)));
    if (b != nullptr) {
      for (int64_t i = 0; i < m; ++i) x[i] *= widen(b[start + i]);
    }
    for (int64_t i = 0; i < m; ++i) out[start + i] = narrow<uint16_t>(x[i]);
  }
}

ffi::Error activation(ffi::Buffer<ffi::BF16> a, ffi::Buffer<ffi::BF16> b, ffi::Result<ffi::Buffer<ffi::BF16>> out,
                      int64_t kind, bool gated) {
  const int64_t n = a.element_count();
  if (out->element_count() != n || (gated && b.element_count() != n)) {
    return ffi::Error::InvalidArgument("activation: operands and result differ in size");
  }
  const auto* in = reinterpret_cast<const uint16_t*>(a.untyped_data());
  const auto* times = gated ? reinterpret_cast<const uint16_t*>(b.untyped_data()) : nullptr;
  auto* result = reinterpret_cast<uint16_t*>(out->untyped_data());
  if (kind == kGeluTanh) {
    run<kGeluTanh>(in, times, result, n);
  } else if (kind == kSilu) {
    run<kSilu>(in, times, result, n);
  } else {
    return ffi::Error::InvalidArgument("activation: unknown kind");
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace transformer_jax

XLA_FFI_DEFINE_HANDLER_SYMBOL(TransformerJaxActivation, transformer_jax::activation,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Attr<int64_t>("kind")
                                  .Attr<bool>("gated"));
