"""Matrix products of a few rows (decoding steps) through a CPU kernel that reads bfloat16 weights as they are.

A decoding step multiplies one row per sequence by every weight, so it is bound by the bytes it reads. XLA:CPU
computes a one-row product with bfloat16 weights one element at a time (about 2 GB/s against 50-70 for float32), so
bfloat16 weights, half the bytes, decode slower than float32 ones. :func:`dot_general`, a drop-in for
``lax.dot_general`` (Flax's ``Dense(dot_general=...)``), sends products of at most :data:`MAX_ROWS` rows with
float32 or bfloat16 weights to ``skinny_matmul.cc`` on the CPU: each weight read once, widened to float32 in
registers, accumulated in float32. Everything else, and every other platform, is ``lax.dot_general`` as asked.

The kernel is differentiable (its tangent is two XLA products) and vmappable (one call per example). It is built
on first use for this CPU (:mod:`transformer_jax.kernels.cpu_build`); without a compiler, or with
``TRANSFORMER_JAX_CPU_KERNELS=0``, every product stays XLA's.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from jax import lax

from transformer_jax.kernels import cpu_build

MAX_ROWS = 4  # measured: at 8 rows XLA's library kernels (YNNPACK) are as fast or faster
TARGET = 'transformer_jax_skinny_matmul'
WEIGHT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


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


def skinny_layout(lhs_shape, rhs_shape, dimension_numbers) -> tuple[int, int, bool] | None:
  """``(M, K, transposed)`` when a ``dot_general`` is an ``(M, K)`` by ``(K, N)`` (or ``(N, K)``) product.

  That is: no batch dimensions, the left operand contracting its trailing dimensions in order, the right one its
  leading (a Dense kernel) or its trailing (an embedding table) dimensions in order, and ``1 <= M <= MAX_ROWS``."""
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  lhs_contract, rhs_contract = tuple(lhs_contract), tuple(rhs_contract)
  depth = len(lhs_contract)
  if lhs_batch or rhs_batch or not depth or len(rhs_contract) != depth:
    return None
  if lhs_contract != tuple(range(len(lhs_shape) - depth, len(lhs_shape))):
    return None
  if rhs_contract == tuple(range(depth)):
    transposed = False
  elif rhs_contract == tuple(range(len(rhs_shape) - depth, len(rhs_shape))):
    transposed = True
  else:
    return None
  rows = math.prod(lhs_shape[: len(lhs_shape) - depth])
  k = math.prod(lhs_shape[len(lhs_shape) - depth :])
  if not 1 <= rows <= MAX_ROWS or not k or not math.prod(rhs_shape):
    return None
  return rows, k, transposed


def skinny_or(plain, lhs, rhs, dimension_numbers):
  """The kernel's product of ``lhs`` and ``rhs`` on the CPU when :func:`skinny_layout` finds one, else (and on other
  platforms) ``plain(lhs, rhs)``, whose result shape and dtype the kernel's takes."""
  lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
  layout = skinny_layout(lhs.shape, rhs.shape, dimension_numbers)
  if (
    layout is None
    or lhs.dtype not in WEIGHT_DTYPES
    or rhs.dtype not in WEIGHT_DTYPES
    or not available()
  ):
    return plain(lhs, rhs)
  rows, k, transposed = layout
  result = jax.eval_shape(plain, lhs, rhs)

  def on_cpu(a, b):
    w = b.reshape((-1, k) if transposed else (k, -1))
    return matmul(a.reshape(rows, k), w, transposed).reshape(result.shape).astype(result.dtype)

  return lax.platform_dependent(lhs, rhs, cpu=on_cpu, default=plain)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
  """``lax.dot_general``, with few-row products on the CPU computed by the kernel.

  Operands of different dtypes are promoted as ``jnp`` would (so a float32 input may meet a bfloat16 kernel: the
  kernel then reads the weights as they are). The result has ``lax.dot_general``'s shape and dtype."""

  def plain(a, b):
    a, b = promote_dtype(a, b)
    return lax.dot_general(
      a, b, dimension_numbers, precision, preferred_element_type=preferred_element_type, **kwargs
    )

  if kwargs:
    return plain(lhs, rhs)
  return skinny_or(plain, lhs, rhs, dimension_numbers)


def keep_kernel_dtype(inputs, kernel, bias=None, *, dtype=None, inexact=True):
  """A Flax ``promote_dtype`` that casts the inputs and bias but hands :func:`dot_general` the kernel as stored, so
  a float32 head over bfloat16 weights reads them as bfloat16 (the product is the same: see :func:`dot_general`)."""
  inputs, bias = promote_dtype(inputs, bias, dtype=dtype, inexact=inexact)
  return inputs, kernel, bias
