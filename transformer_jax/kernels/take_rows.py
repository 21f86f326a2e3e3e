"""Rows of a 16-bit array by index along its leading axis (``take_rows.cc``, CPU only).

:mod:`transformer_jax.modules.take` gathers a bf16 table's rows as ``uint16`` bits, since XLA:CPU's own bf16 gather
converts the whole operand to float32. Inside a decoding loop XLA hoists that bitcast of the (invariant) embedding
table out of the loop and writes all of the table out on every call; the kernel reads only the rows asked for.
Built like every kernel here (:mod:`transformer_jax.kernels.cpu_build`); :func:`available` is False where it cannot
be."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from transformer_jax.kernels import cpu_build

TARGET = 'transformer_jax_take_rows'


def available() -> bool:
  """True when the kernel is built and registered for the CPU (built on the first call)."""
  return cpu_build.ffi_target('take_rows.cc', 'TransformerJaxTakeRows', TARGET)


def take_rows(x: jax.Array, indices: jax.Array) -> jax.Array:
  """``jnp.take(x, indices, axis=0)`` for 16-bit ``x``: negative indices count from the end, out-of-range ones give
  rows of NaN (bits ``0xFFFF``). Not differentiable by itself (:func:`transformer_jax.modules.take.take` is)."""
  if not available():
    raise RuntimeError('the take_rows CPU kernel could not be built; see the logged warning')
  out = jax.ShapeDtypeStruct(indices.shape + x.shape[1:], x.dtype)
  return jax.ffi.ffi_call(TARGET, out, vmap_method='sequential')(x, indices.astype(jnp.int32))
