// The index of each row's largest float32 on the CPU, as jnp.argmax gives it: the first of equal maxima, the first
// NaN where a row holds one, 0 for a row of -inf (the passes: row_max.h).
#include <cstdint>

#include "row_max.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error argmax(ffi::Buffer<ffi::F32> x, ffi::Result<ffi::Buffer<ffi::S32>> out) {
  const auto dims = x.dimensions();
  if (dims.size() == 0 || dims.back() == 0) return ffi::Error::InvalidArgument("argmax needs a non-empty last axis");
  const int64_t n = dims.back();
  const int64_t rows = x.element_count() / n;
  if (out->element_count() != rows) return ffi::Error::InvalidArgument("argmax: output size");
  const float* data = x.typed_data();
  int32_t* at = out->typed_data();
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = data + r * n;
    at[r] = transformer_jax::first_index_of(row, n, transformer_jax::row_max(row, n));
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TransformerJaxArgmax, argmax,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::S32>>());
