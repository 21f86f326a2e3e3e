// Rows of a 16-bit array by index on the CPU: out[i] = x[index[i]] along the leading axis, a row of 0xFFFF (a NaN)
// for an index outside [-N, N) (a negative one counts from the end), as jnp.take's default mode gives.
//
// XLA:CPU gathers 16-bit floats through float32 or, given the bits as uint16, through a bitcast of the whole
// operand; inside a decoding loop it hoists that bitcast of the (invariant) embedding table out of the loop and
// writes all of it out once per call. Here only the rows asked for are read.
#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error take_rows(ffi::AnyBuffer x, ffi::Buffer<ffi::S32> index, ffi::Result<ffi::AnyBuffer> out) {
  const auto dims = x.dimensions();
  if (dims.size() == 0) return ffi::Error::InvalidArgument("take_rows needs an array with a leading axis");
  if (ffi::ByteWidth(x.element_type()) != 2) return ffi::Error::InvalidArgument("take_rows takes 16-bit elements");
  const int64_t rows = dims[0];
  const int64_t row_bytes = rows ? x.size_bytes() / rows : 0;
  const int64_t count = index.element_count();
  if (out->size_bytes() != count * row_bytes) return ffi::Error::InvalidArgument("take_rows: output size");
  const char* src = static_cast<const char*>(x.untyped_data());
  char* dst = static_cast<char*>(out->untyped_data());
  const int32_t* at = index.typed_data();
  for (int64_t i = 0; i < count; ++i) {
    const int64_t j = at[i] < 0 ? at[i] + rows : at[i];
    if (0 <= j && j < rows) {
      std::memcpy(dst + i * row_bytes, src + j * row_bytes, row_bytes);
    } else {
      std::memset(dst + i * row_bytes, 0xFF, row_bytes);
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TransformerJaxTakeRows, take_rows,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::Buffer<ffi::S32>>().Ret<ffi::AnyBuffer>());
