"""A 2-D transpose that XLA cannot fold into the product consuming it (``transpose.cc``, CPU only).

XLA:CPU folds ``jnp.transpose`` into a following ``dot``, which for the bf16 weight gradient ``x^T g`` yields a
product with a transposed left operand: its YNNPACK kernels take that in float32 only, so XLA widens both operands.
:func:`transpose` materialises ``x^T`` instead, so the product is a plain bf16 one. Built like every kernel here
(:mod:`transformer_jax.kernels.cpu_build`); :func:`available` is False where it cannot be."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from transformer_jax.kernels import cpu_build

TARGET = 'transformer_jax_transpose_2d'


def available() -> bool:
  """True when the kernel is built and registered for the CPU (built on the first call)."""
  return cpu_build.ffi_target('transpose.cc', 'TransformerJaxTranspose2d', TARGET)


@jax.custom_jvp
def transpose(x: jax.Array) -> jax.Array:
  """``(M, N) -> (N, M)`` for 2- and 4-byte dtypes, on the CPU."""
  if not available():
    raise RuntimeError('the transpose CPU kernel could not be built; see the logged warning')
  out = jax.ShapeDtypeStruct(x.shape[::-1], x.dtype)
  return jax.ffi.ffi_call(TARGET, out, vmap_method='sequential')(x)


@transpose.defjvp
def _transpose_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  return transpose(x), jnp.transpose(dx)
