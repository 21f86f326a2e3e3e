"""Matrix products of a few rows (decoding steps) through a CPU kernel that reads bfloat16 weights as they are.

A decoding step multiplies one row per sequence by every weight, so it is bound by the bytes it reads. XLA:CPU
computes a one-row product with bfloat16 weights one element at a time (about 2 GB/s against 50-70 for float32), so
bfloat16 weights, half the bytes, decode slower than float32 ones. :func:`matmul` runs ``skinny_matmul.cc``: each
weight read once, widened to float32 in registers, accumulated in float32. :mod:`transformer_jax.modules.dot` sends
it the products of at most :data:`MAX_ROWS` rows on the CPU.

The kernel is differentiable (its tangent is two XLA products) and vmappable (one call per example). It is built
on first use for this CPU (:mod:`transformer_jax.kernels.cpu_build`); without a compiler, or with
``TRANSFORMER_JAX_CPU_KERNELS=0``, :func:`available` is False and every product stays XLA's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from transformer_jax.kernels import cpu_build

MAX_ROWS = 4  # measured: at 8 rows XLA's library kernels (YNNPACK) are as fast or faster
TARGET = 'transformer_jax_skinny_matmul'


def available() -> bool:
  """True when the kernel is built and registered for the CPU (built on the first call)."""
  return cpu_build.ffi_target('skinny_matmul.cc', 'TransformerJaxSkinnyMatmul', TARGET)


def reference(x: jax.Array, w: jax.Array, transposed: bool) -> jax.Array:
  """``(M, K) x W -> (M, N)`` float32 with XLA: ``W`` is ``(K, N)``, or ``(N, K)`` when ``transposed``."""
  dims = (((1,), (1 if transposed else 0,)), ((), ()))
  return lax.dot_general(
    x.astype(jnp.float32), w.astype(jnp.float32), dims, precision=lax.Precision.HIGHEST
  )


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def matmul(x: jax.Array, w: jax.Array, transposed: bool) -> jax.Array:
  """``(M, K) x W -> (M, N)`` float32 by the kernel (CPU only; ``M <= MAX_ROWS``); see :func:`reference`."""
  if not available():
    raise RuntimeError('the skinny_matmul CPU kernel could not be built; see the logged warning')
  n = w.shape[0] if transposed else w.shape[1]
  call = jax.ffi.ffi_call(
    TARGET, jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32), vmap_method='sequential'
  )
  return call(x.astype(jnp.float32), w, transposed=transposed)


@matmul.defjvp
def _matmul_jvp(transposed, primals, tangents):
  x, w = primals
  dx, dw = tangents
  return matmul(x, w, transposed), reference(dx, w, transposed) + reference(x, dw, transposed)
