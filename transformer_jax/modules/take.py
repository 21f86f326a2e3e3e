"""``jnp.take`` of 16-bit floats without XLA:CPU's float32 copy of the whole operand.

XLA:CPU runs a gather of bfloat16 or float16 through float32: it converts the entire operand, gathers, and converts
back. Looking up one row of a bf16 embedding table then writes a float32 copy of the table (154 MB for GPT-2's, on
every call that decodes), and reordering a bf16 KV cache for beam search converts the whole cache twice a step.
:func:`take` gathers the same bits as ``uint16``, which moves them unchanged, on every platform (the bitcasts are
free, but XLA hoists a loop-invariant one out of a loop and writes the operand out). On a lone CPU device the rows
along the leading axis are copied by :mod:`~transformer_jax.kernels.take_rows` instead, which reads only those rows.
Its tangent is ``jnp.take`` of the tangent, so gradients are the usual scatter-add.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from transformer_jax.kernels import cpu_build, take_rows


def is_16_bit_float(dtype) -> bool:
  """bfloat16 or float16: the dtypes XLA:CPU moves through float32 (here and in :mod:`.update_slice`)."""
  return jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize == 2


def take(x: jax.Array, indices: jax.Array, axis: int = 0) -> jax.Array:
  """``jnp.take(x, indices, axis=axis)``, the same numbers (out-of-range indices give NaN, as there); only 16-bit
  floats take the ``uint16`` path, every other dtype is ``jnp.take`` itself."""
  if is_16_bit_float(x.dtype):
    return _take_bits(x, indices, axis)
  return jnp.take(x, indices, axis=axis)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _take_bits(x, indices, axis):
  if axis == 0 and cpu_build.sole_cpu_device() and take_rows.available():
    return take_rows.take_rows(x, indices)
  # the unsigned fill for an out-of-range index is 0xFFFF, a NaN's bits
  bits = jnp.take(lax.bitcast_convert_type(x, jnp.uint16), indices, axis=axis)
  return lax.bitcast_convert_type(bits, x.dtype)


@_take_bits.defjvp
def _take_bits_jvp(axis, primals, tangents):
  x, indices = primals
  dx, _ = tangents
  return _take_bits(x, indices, axis), jnp.take(dx, indices, axis=axis)
