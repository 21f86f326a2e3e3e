// A kernel's float32-or-bfloat16 operands (ffi::AnyBuffer): their data as a typed pointer, and one instantiation of
// the kernel per element type (bfloat16 as uint16_t, widened and narrowed by bfloat16.h).
#ifndef TRANSFORMER_JAX_KERNELS_FLOAT_BUFFERS_H_
#define TRANSFORMER_JAX_KERNELS_FLOAT_BUFFERS_H_

#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace transformer_jax {

template <typename T>
const T* as(xla::ffi::AnyBuffer x) {
  return reinterpret_cast<const T*>(x.untyped_data());
}
template <typename T>
T* as(xla::ffi::Result<xla::ffi::AnyBuffer>& x) {
  return reinterpret_cast<T*>(x->untyped_data());
}

// run(float{}) or run(uint16_t{}) (bfloat16) as the element type says; `kernel` names the refusal of any other.
template <typename Run>
xla::ffi::Error by_dtype(xla::ffi::DataType type, const char* kernel, Run run) {
  switch (type) {
    case xla::ffi::DataType::F32: run(float{}); break;
    case xla::ffi::DataType::BF16: run(uint16_t{}); break;
    default: return xla::ffi::Error::InvalidArgument(std::string(kernel) + " takes float32 or bfloat16");
  }
  return xla::ffi::Error::Success();
}

}  // namespace transformer_jax

#endif  // TRANSFORMER_JAX_KERNELS_FLOAT_BUFFERS_H_
