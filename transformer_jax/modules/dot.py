"""The matrix product behind every ``Dense``, ``DenseGeneral``, attention product and output head: ``lax.dot_general``
with three CPU paths.

XLA:CPU runs its fast library kernels (YNNPACK) only for some products and computes the others slowly or in float32
whatever their dtype. :func:`dense_product` (used by :mod:`transformer_jax.modules.dense`) and :func:`dot_general` (a
drop-in for ``lax.dot_general``) hand three cases to code that runs fast on the CPU, and on every other platform are
``lax.dot_general`` exactly:

- **Few rows** (at most :func:`~transformer_jax.kernels.skinny_matmul.max_rows`, a decoding step) with float32 or
  bfloat16 weights: the :mod:`~transformer_jax.kernels.skinny_matmul` kernel, which reads bfloat16 weights as stored.
- **Float32 on an Intel CPU** with MKL installed, at least :data:`~transformer_jax.kernels.mkl_matmul.MIN_ROWS` rows:
  :mod:`~transformer_jax.kernels.mkl_matmul`, whose products (and gradient products) run up to 30% faster than
  XLA's there.
- **bfloat16 by bfloat16** (``dtype='bfloat16'`` training and prefill): YNNPACK takes a bf16 product only with a
  float32 result, so a bf16-result product, and every gradient product, ran in float32. :func:`bf16_matmul` asks for
  the float32 result and rounds it once to the result dtype (bf16, or float32 logits), the same numbers as XLA's bf16
  product, which also accumulates in float32; its gradients are written the same way, the weight gradient's operand
  transposed by :mod:`~transformer_jax.kernels.transpose` so that XLA cannot fold it into a refused product, a dense
  layer's bias added inside in float32 and its gradient summed by the few-row kernel.

Both apply to products shaped like a dense layer's (:func:`product_layout`); everything else is ``lax.dot_general``.
:func:`einsum` gives attention's batched bf16 products the same treatment.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from jax import lax

from transformer_jax.kernels import mkl_matmul, skinny_matmul, transpose

BF16 = jnp.dtype(jnp.bfloat16)
KERNEL_DTYPES = (jnp.dtype(jnp.float32), BF16)


def product_layout(lhs_shape, rhs_shape, dimension_numbers) -> tuple[int, int, bool] | None:
  """``(M, K, transposed)`` when a ``dot_general`` is an ``(M, K)`` by ``(K, N)`` (or ``(N, K)``) product.

  That is: no batch dimensions, the left operand contracting its trailing dimensions in order, the right one its
  leading (a Dense kernel) or its trailing (an embedding table, ``transposed``) dimensions in order, nothing empty."""
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
  if not rows or not k or not math.prod(rhs_shape):
    return None
  return rows, k, transposed


def _f32_result(a, b, contract):
  return lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def bf16_matmul(x: jax.Array, w: jax.Array, bias, transposed: bool, out_dtype) -> jax.Array:
  """``(M, K)`` bf16 by ``W`` bf16 (``(K, N)``, or ``(N, K)`` when ``transposed``), plus an optional ``(N,)``
  ``bias``, -> ``(M, N)`` in ``out_dtype`` (bf16, or float32 for logits): accumulated in float32, the bias added in
  float32, rounded once. The gradients are bf16 products with float32 results too (the output gradient rounded to
  bf16 first), rounded to bf16; the bias gradient sums the rows in float32."""
  out = _f32_result(x, w, ((1,), (1 if transposed else 0,)))
  return (out if bias is None else out + bias.astype(jnp.float32)).astype(out_dtype)


def _bf16_matmul_fwd(x, w, bias, transposed, out_dtype):
  return bf16_matmul(x, w, bias, transposed, out_dtype), (x, w, bias)


def _bf16_matmul_bwd(transposed, out_dtype, saved, g):
  x, w, bias = saved
  g = g.astype(BF16)
  if transposed:  # out = x w^T with w (N, K): dw = g^T x
    dx = _f32_result(g, w, ((1,), (0,)))
    dw = _rows_contracted(g, x)
  else:  # out = x w with w (K, N): dw = x^T g
    dx = _f32_result(g, w, ((1,), (1,)))
    dw = _rows_contracted(x, g)
  dbias = None if bias is None else column_sums(g).astype(bias.dtype)
  return dx.astype(BF16), dw, dbias


def _rows_contracted(a, b):
  """``a^T b`` in bf16 (float32 accumulation) for bf16 ``a`` ``(M, P)`` and ``b`` ``(M, Q)``.

  The product contracts the rows, the leading dimension of both operands; with one of them transposed by the
  kernel, XLA sees a plain bf16 product instead of widening a transposed one to float32. The kernel transposes
  ``a``, or ``b`` and the ``(Q, P)`` result, whichever is fewer elements (a tied head's ``g^T x``: ``x`` and the
  gradient of the table, not the logits' gradient)."""
  if not transpose.available():
    return _f32_result(a, b, ((0,), (0,))).astype(BF16)
  (m, p), q = a.shape, b.shape[1]
  if m * p <= (m + p) * q:
    return _f32_result(transpose.transpose(a), b, ((1,), (0,))).astype(BF16)
  return transpose.transpose(_f32_result(transpose.transpose(b), a, ((1,), (0,))).astype(BF16))


def column_sums(g: jax.Array) -> jax.Array:
  """``(M, N)`` -> ``(N,)`` float32 sums. Through the few-row kernel (a row of ones by ``g``, read once as stored):
  XLA:CPU widens a bf16 ``g`` into a float32 copy and reduces it in a tree of ``reduce-window``\\ s."""
  if skinny_matmul.available():
    return skinny_matmul.matmul(jnp.ones((1, g.shape[0]), jnp.float32), g, False)[0]
  return jnp.sum(g.astype(jnp.float32), axis=0)


bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)


def on_cpu_as_matrices(product, plain, lhs, rhs, layout, result):
  """``product(x (M, K), w)`` on the CPU, reshaped to ``result`` (``plain``'s shape and dtype); ``plain(lhs, rhs)``
  elsewhere."""
  rows, k, transposed = layout

  def on_cpu(a, b):
    w = b.reshape((-1, k) if transposed else (k, -1))
    return product(a.reshape(rows, k), w, transposed).reshape(result.shape).astype(result.dtype)

  return lax.platform_dependent(lhs, rhs, cpu=on_cpu, default=plain)


def with_bias(out, bias):
  """``out`` plus ``bias`` over its trailing dimensions (as a dense layer adds it); ``out`` when ``bias`` is None."""
  return out if bias is None else out + bias.reshape((1,) * (out.ndim - bias.ndim) + bias.shape)


def cpu_product(plain, lhs, rhs, dimension_numbers, bias=None):
  """``plain(lhs, rhs)`` plus ``bias`` (:func:`with_bias`), by the CPU path that applies (module docstring) where one
  does; every path keeps ``plain``'s result shape and dtype. The bf16 path adds ``bias`` inside its product."""
  lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
  layout = product_layout(lhs.shape, rhs.shape, dimension_numbers)
  if layout is None:
    return with_bias(plain(lhs, rhs), bias)
  unbiased = jax.eval_shape(plain, lhs, rhs)
  matrices = None  # a kernel of (M, K) by (K, N) or (N, K) matrices, the bias added after it
  if (
    lhs.dtype in KERNEL_DTYPES
    and rhs.dtype in KERNEL_DTYPES
    and layout[0] <= skinny_matmul.max_rows(rhs.dtype)
    and skinny_matmul.available()
  ):
    matrices = skinny_matmul.matmul
  elif mkl_matmul.applies(lhs.dtype, rhs.dtype, unbiased.dtype, layout[0]):
    matrices = mkl_matmul.matmul
  if matrices is not None:
    return with_bias(on_cpu_as_matrices(matrices, plain, lhs, rhs, layout, unbiased), bias)
  biased = lambda a, b: with_bias(plain(a, b), bias)  # noqa: E731
  result = jax.eval_shape(biased, lhs, rhs)
  if on_cpu_in_bf16(lhs, rhs) and result.dtype in KERNEL_DTYPES:
    flat_bias = None if bias is None else bias.reshape(-1)
    product = lambda x, w, t: bf16_matmul(x, w, flat_bias, t, result.dtype)  # noqa: E731
    return on_cpu_as_matrices(product, biased, lhs, rhs, layout, result)
  return biased(lhs, rhs)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
  """``lax.dot_general``, with the CPU paths of the module docstring.

  Operands of different dtypes are promoted as ``jnp`` would (so a float32 input may meet a bfloat16 kernel: the
  few-row kernel then reads the weights as they are). The result has ``lax.dot_general``'s shape and dtype."""
  return dense_product(
    lhs, rhs, None, dimension_numbers, precision, preferred_element_type, **kwargs
  )


def dense_product(
  inputs, kernel, bias, dimension_numbers, precision=None, preferred_element_type=None, **kwargs
):
  """:func:`dot_general` plus ``bias`` (``None``, or the output's trailing feature dimensions), as a dense layer
  adds it; the bf16 path adds it in float32 and sums its gradient with the few-row kernel."""

  def plain(a, b):
    a, b = promote_dtype(a, b)
    return lax.dot_general(
      a, b, dimension_numbers, precision, preferred_element_type=preferred_element_type, **kwargs
    )

  if kwargs:
    return with_bias(plain(inputs, kernel), bias)
  return cpu_product(plain, inputs, kernel, dimension_numbers, bias=bias)


def on_cpu_in_bf16(a, b) -> bool:
  """The bf16 paths apply: bf16 operands, the CPU the default backend (where a ``custom_vjp``'s lack of a
  forward-mode derivative is confined to CPU programs)."""
  return a.dtype == b.dtype == BF16 and jax.default_backend() == 'cpu'


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def bf16_einsum(spec: str, a: jax.Array, b: jax.Array, out_dtype) -> jax.Array:
  """``jnp.einsum(spec, a, b)`` of bf16 operands with a float32 result cast to ``out_dtype``; the gradients are bf16
  products with float32 results too. ``spec`` is ``'A,B->C'`` with every index of ``A`` and of ``B`` in another of
  the three (a batched product, as attention's)."""
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(out_dtype)


def _bf16_einsum_fwd(spec, a, b, out_dtype):
  return bf16_einsum(spec, a, b, out_dtype), (a, b)


def _bf16_einsum_bwd(spec, out_dtype, saved, g):
  a, b = saved
  inputs, out = spec.split('->')
  sa, sb = inputs.split(',')
  g = g.astype(BF16)
  da = jnp.einsum(f'{out},{sb}->{sa}', g, b, preferred_element_type=jnp.float32)
  db = jnp.einsum(f'{out},{sa}->{sb}', g, a, preferred_element_type=jnp.float32)
  return da.astype(a.dtype), db.astype(b.dtype)


bf16_einsum.defvjp(_bf16_einsum_fwd, _bf16_einsum_bwd)


def einsum(spec: str, a, b, out_dtype=None):
  """``jnp.einsum(spec, a, b)`` with the result in ``out_dtype`` (default: the operands' promoted dtype); on the
  CPU, bf16 operands go through :func:`bf16_einsum`, which XLA's YNNPACK kernels run in bf16."""
  a, b = jnp.asarray(a), jnp.asarray(b)
  out_dtype = jnp.dtype(out_dtype or jnp.promote_types(a.dtype, b.dtype))
  if on_cpu_in_bf16(a, b):
    plain = lambda x, y: jnp.einsum(spec, x, y, preferred_element_type=out_dtype)  # noqa: E731
    return lax.platform_dependent(
      a, b, cpu=lambda x, y: bf16_einsum(spec, x, y, out_dtype), default=plain
    )
  return jnp.einsum(spec, a, b, preferred_element_type=out_dtype)


def keep_narrow_kernel(inputs, kernel, bias=None, *, dtype=None, inexact=True):
  """Flax's ``promote_dtype`` for a dense layer, except that a kernel narrower than ``dtype`` (bf16 weights of a
  float32 model) stays as stored: the product widens it where it must (the same numbers), while a decoding step's
  few rows read it as bf16 (:mod:`~transformer_jax.kernels.skinny_matmul`) instead of a float32 copy."""
  if dtype is None or jnp.dtype(kernel.dtype).itemsize >= jnp.dtype(dtype).itemsize:
    return promote_dtype(inputs, kernel, bias, dtype=dtype, inexact=inexact)
  inputs, bias = promote_dtype(inputs, bias, dtype=dtype, inexact=inexact)
  return inputs, kernel, bias
