"""The index of the largest float32 along the last axis (``argmax.cc``, CPU only).

XLA:CPU reduces a (value, index) pair one element at a time, at about 1 GB/s; the kernel takes two vectorised passes
over each row. :func:`transformer_jax.modules.argmax.argmax` sends it float32 on a lone CPU device (greedy decoding's
choice). Built like every kernel here (:mod:`transformer_jax.kernels.cpu_build`);
:func:`available` is False where it cannot be."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from transformer_jax.kernels import cpu_build

TARGET = 'transformer_jax_argmax'


def available() -> bool:
  """True when the kernel is built and registered for the CPU (built on the first call)."""
  return cpu_build.ffi_target('argmax.cc', 'TransformerJaxArgmax', TARGET)


def takes(x) -> bool:
  """The kernel takes float32 with a non-empty last axis."""
  return x.dtype == jnp.float32 and x.ndim > 0 and x.shape[-1] > 0


def argmax(x: jax.Array) -> jax.Array:
  """``jnp.argmax(x, axis=-1)`` as int32 for float32 ``x`` with a non-empty last axis: the first of equal maxima, the
  first NaN of a row that holds one."""
  if not available():
    raise RuntimeError('the argmax CPU kernel could not be built; see the logged warning')
  if not takes(x):
    raise ValueError(
      f'argmax takes float32 with a non-empty last axis, got {x.dtype}{list(x.shape)}'
    )
  out = jax.ShapeDtypeStruct(x.shape[:-1], jnp.int32)
  # the kernel treats every leading axis as rows, so a vmapped call is one call over the stacked rows
  return jax.ffi.ffi_call(TARGET, out, vmap_method='broadcast_all')(x)
