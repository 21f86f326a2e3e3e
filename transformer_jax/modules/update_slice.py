"""``lax.dynamic_update_slice`` of 16-bit floats without XLA:CPU's float32 copy of the whole operand.

XLA:CPU updates a slice of a bfloat16 or float16 array through float32, as it gathers (:mod:`.take`): it converts the
entire operand, writes the slice and converts back. A decoding step writes one position of each layer's key and
value cache, so a bf16 cache was read and written in full twice a step (with a 1,024-token GPT-2 small cache, 19
million values a token, against 85 million weights read). :func:`update_slice` writes the same bits as ``uint16``,
in place, on every platform (the bitcasts are free). Its tangent is ``lax.dynamic_update_slice`` of the tangents.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from transformer_jax.modules.take import is_16_bit_float


def update_slice(operand: jax.Array, update: jax.Array, start_indices) -> jax.Array:
  """``lax.dynamic_update_slice(operand, update, start_indices)``, the same numbers; 16-bit floats of one dtype take
  the ``uint16`` path, anything else is ``lax.dynamic_update_slice`` itself."""
  start_indices = tuple(start_indices)
  if is_16_bit_float(operand.dtype) and update.dtype == operand.dtype:
    return _update_bits(operand, update, *start_indices)
  return lax.dynamic_update_slice(operand, update, start_indices)


@jax.custom_jvp
def _update_bits(operand, update, *start_indices):
  bits = lax.dynamic_update_slice(
    lax.bitcast_convert_type(operand, jnp.uint16),
    lax.bitcast_convert_type(update, jnp.uint16),
    start_indices,
  )
  return lax.bitcast_convert_type(bits, operand.dtype)


@_update_bits.defjvp
def _update_bits_jvp(primals, tangents):
  operand, update, *start_indices = primals
  d_operand, d_update, *_ = tangents
  return (
    _update_bits(operand, update, *start_indices),
    lax.dynamic_update_slice(d_operand, d_update, start_indices),
  )
