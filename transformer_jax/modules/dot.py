"""The matrix product behind every ``Dense``, ``DenseGeneral``, attention product and output head: ``lax.dot_general``
with CPU paths.

XLA:CPU runs its fast library kernels (YNNPACK) only for some products and computes the others slowly or in float32
whatever their dtype. :func:`dense_product` (used by :mod:`transformer_jax.modules.dense`) and :func:`dot_general` (a
drop-in for ``lax.dot_general``) hand four cases to code that runs fast on the CPU, and on every other platform are
``lax.dot_general`` exactly:

- **Few rows** (at most :func:`~transformer_jax.kernels.skinny_matmul.max_rows`, a decoding step) with float32 or
  bfloat16 weights: the :mod:`~transformer_jax.kernels.skinny_matmul` kernel, which reads bfloat16 weights as stored.
- **Float32 on an Intel CPU** with MKL installed, at least :data:`~transformer_jax.kernels.mkl_matmul.MIN_ROWS` rows:
  :mod:`~transformer_jax.kernels.mkl_matmul`, whose products (and gradient products) run up to 30% faster than
  XLA's there.
- **bfloat16 by bfloat16** (``dtype='bfloat16'`` training and prefill): YNNPACK takes a bf16 product only with a
  float32 result, so a bf16-result product, and every gradient product, ran in float32. :func:`cpu_matmul` asks for
  the float32 result and rounds it once to the result dtype (bf16, or float32 logits), the same numbers as XLA's bf16
  product, which also accumulates in float32; its gradients are written the same way, the weight gradient's operand
  transposed by :mod:`~transformer_jax.kernels.transpose` so that XLA cannot fold it into a refused product, a dense
  layer's bias added inside in float32 and its gradient summed by the few-row kernel. Where
  :func:`~transformer_jax.kernels.onednn_matmul.applies` (the ``onednn`` extra, a CPU with AVX512-BF16, enough
  rows), these products are oneDNN's instead (the primitive's CPU lowering), each operand read transposed in place
  with no transpose kernel.
- **float32 by float32** (where MKL does not take it; the CPU the only device): the same :func:`cpu_matmul`. Left
  to itself, XLA feeds a weight gradient ``x^T g`` a transposed copy of ``g``, the larger operand (the 80 MB logits
  gradient of a 10,000-way head: 13-18 ms of a Zen 4 step), and sums a bias gradient in a tree of reductions; here
  the kernel transposes the smaller operand and the few-row kernel sums the bias gradient (benchmarks/RESULTS.md,
  "On Zen 4, third round").

All four apply to products shaped like a dense layer's (:func:`product_layout`); everything else is
``lax.dot_general``. :func:`einsum` gives attention's batched bf16 products the same treatment.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from transformer_jax.kernels import cpu_build, mkl_matmul, onednn_matmul, skinny_matmul, transpose

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


def _f32_einsum(a, b, *, spec):
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _operand_specs(spec: str) -> tuple[str, str, str]:
  inputs, out = spec.split('->')
  a, b = inputs.split(',')
  return a, b, out


# ``jnp.einsum(spec, a, b)`` of two bf16 or two float32 operands with a float32 result. A primitive, not a
# custom_vjp: it is bilinear, so JAX derives forward mode and higher orders from the two rules below, which write the
# gradients as products of the operands' dtype too (module docstring).
product_p = Primitive('transformer_jax_cpu_product')
product_p.def_impl(_f32_einsum)
product_p.def_abstract_eval(
  lambda a, b, *, spec: jax.core.ShapedArray(
    jax.eval_shape(functools.partial(_f32_einsum, spec=spec), a, b).shape, jnp.float32
  )
)
mlir.register_lowering(product_p, mlir.lower_fun(_f32_einsum, multiple_results=False))


def matrix_product_layout(spec: str) -> tuple[bool, bool, bool] | None:
  """``(swap, transpose_a, transpose_b)`` when ``spec`` multiplies two matrices into one: the result is ``op(a)
  op(b)``, or ``op(b) op(a)`` when ``swap``, with ``op`` transposing the operand (the first one after a swap being
  ``transpose_a``'s) where its contracted index comes first (left) or last (right). None for anything else."""
  sa, sb, out = _operand_specs(spec)
  shared = set(sa) & set(sb)
  if not len(sa) == len(sb) == len(out) == 2 or len(set(sa + sb)) != 3 or len(shared) != 1:
    return None
  (c,) = shared
  fa, fb = sa.replace(c, ''), sb.replace(c, '')
  if out not in (fa + fb, fb + fa):
    return None
  swap = out != fa + fb
  (left, free_left), (right, free_right) = ((sb, fb), (sa, fa)) if swap else ((sa, fa), (sb, fb))
  return swap, left == c + free_left, right == free_right + c


def _cpu_product(a, b, *, spec):
  """The CPU's lowering: a bf16 product of two matrices by oneDNN where
  :func:`~transformer_jax.kernels.onednn_matmul.applies`, else XLA's."""
  layout = matrix_product_layout(spec)
  if layout is not None:
    swap, transpose_a, transpose_b = layout
    left, right = (b, a) if swap else (a, b)
    rows = left.shape[1] if transpose_a else left.shape[0]
    if onednn_matmul.applies(left.dtype, right.dtype, rows):
      return onednn_matmul.product(left, right, transpose_a, transpose_b)
  return _f32_einsum(a, b, spec=spec)


mlir.register_lowering(
  product_p, mlir.lower_fun(_cpu_product, multiple_results=False), platform='cpu'
)


def _cotangent(spec: str, ct, other, dtype):
  """An operand's cotangent: ``ct`` rounded to the other operand's dtype (as XLA's bf16 product takes it) by the
  other operand, as ``spec`` says, rounded to ``dtype``. A product of two matrices over their rows goes to
  :func:`_rows_contracted`."""
  g = ad.instantiate_zeros(ct).astype(other.dtype)
  first, second, out = _operand_specs(spec)
  if len(first) == len(second) == 2 and first[0] == second[0] and first[0] not in out:
    pair = (g, other) if out == first[1] + second[1] else (other, g)
    return _rows_contracted(*pair).astype(dtype)
  return product_p.bind(g, other, spec=spec).astype(dtype)


def _lhs_cotangent(ct, a, b, *, spec):
  sa, sb, out = _operand_specs(spec)
  return _cotangent(f'{out},{sb}->{sa}', ct, b, a.aval.dtype)


def _rhs_cotangent(ct, a, b, *, spec):
  sa, sb, out = _operand_specs(spec)
  return _cotangent(f'{out},{sa}->{sb}', ct, a, b.aval.dtype)


ad.defbilinear(product_p, _lhs_cotangent, _rhs_cotangent)


def _product_batched(args, dims, *, spec):
  """vmap: the mapped axis becomes one more index of the product, leading each batched operand and the result."""
  letter = next(c for c in 'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ' if c not in spec)
  sa, sb, out = _operand_specs(spec)
  specs = [letter + s if d is not None else s for s, d in zip((sa, sb), dims)]
  args = [a if d is None else jnp.moveaxis(a, d, 0) for a, d in zip(args, dims)]
  return product_p.bind(*args, spec=f'{specs[0]},{specs[1]}->{letter}{out}'), 0


batching.primitive_batchers[product_p] = _product_batched


def _add_bias_call(y, bias, *, operand_dtype):
  return y + bias.astype(jnp.float32)


# ``(M, N)`` float32 plus an ``(N,)`` bias; linear, with the bias's cotangent summed by :func:`column_sums` from the
# output cotangent rounded to the product's ``operand_dtype``, as the product's own cotangents use it
add_bias_p = Primitive('transformer_jax_add_bias')
add_bias_p.def_impl(_add_bias_call)
add_bias_p.def_abstract_eval(lambda y, bias, **_: jax.core.ShapedArray(y.shape, jnp.float32))
mlir.register_lowering(add_bias_p, mlir.lower_fun(_add_bias_call, multiple_results=False))


def _add_bias_transpose(ct, y, bias, *, operand_dtype):
  ct = ad.instantiate_zeros(ct)
  return ct, column_sums(ct.astype(operand_dtype)).astype(bias.aval.dtype)


ad.deflinear2(add_bias_p, _add_bias_transpose)


def _add_bias_batched(args, dims, **_):
  (y, bias), (y_dim, bias_dim) = args, dims
  size = y.shape[y_dim] if y_dim is not None else bias.shape[bias_dim]
  y, bias = batching.bdim_at_front(y, y_dim, size), batching.bdim_at_front(bias, bias_dim, size)
  return y + bias[:, None, :].astype(jnp.float32), 0


batching.primitive_batchers[add_bias_p] = _add_bias_batched


def cpu_matmul(x: jax.Array, w: jax.Array, bias, transposed: bool, out_dtype) -> jax.Array:
  """``(M, K)`` by ``W`` (``(K, N)``, or ``(N, K)`` when ``transposed``), both bf16 or both float32, plus an
  optional ``(N,)`` ``bias``, -> ``(M, N)`` in ``out_dtype`` (bf16, or float32 for logits): accumulated in float32,
  the bias added in float32, rounded once. The gradients are products of the operands' dtype with float32 results too
  (the output gradient rounded to that dtype first), rounded to it; the bias gradient sums the rows in float32.
  Differentiable in both modes."""
  out = product_p.bind(x, w, spec='mk,nk->mn' if transposed else 'mk,kn->mn')
  if bias is not None:
    out = add_bias_p.bind(out, bias, operand_dtype=jnp.dtype(x.dtype))
  return out.astype(out_dtype)


def _rows_contracted(a, b):
  """``a^T b`` in ``a``'s dtype (float32 accumulation) for ``a`` ``(M, P)`` and ``b`` ``(M, Q)``, both bf16 or
  both float32.

  The product contracts the rows, the leading dimension of both operands; with one of them transposed by the
  kernel, XLA sees a plain product instead of widening a transposed bf16 one to float32, or transposing the larger
  operand. The kernel transposes ``a``, or ``b`` and the ``(Q, P)`` result, whichever is fewer elements (a tied
  head's ``g^T x``: ``x`` and the gradient of the table, not the logits' gradient). Where the CPU is not the only
  device (:func:`~transformer_jax.kernels.cpu_build.sole_cpu_device`) XLA's product does it all, since a
  partitioner cannot split the kernel's custom call."""
  dtype = a.dtype
  # oneDNN (where it applies) reads ``a`` transposed in place; without the transpose kernel XLA does it all
  if onednn_matmul.applies(dtype, b.dtype, a.shape[1]) or not (
    cpu_build.sole_cpu_device() and transpose.available()
  ):
    return product_p.bind(a, b, spec='mp,mq->pq').astype(dtype)
  (m, p), q = a.shape, b.shape[1]
  if m * p <= (m + p) * q:
    return product_p.bind(transpose.transpose(a), b, spec='pm,mq->pq').astype(dtype)
  return transpose.transpose(
    product_p.bind(transpose.transpose(b), a, spec='qm,mp->qp').astype(dtype)
  )


def column_sums(g: jax.Array) -> jax.Array:
  """``(M, N)`` -> ``(N,)`` float32 sums. Through the few-row kernel (a row of ones by ``g``, read once as stored):
  XLA:CPU widens a bf16 ``g`` into a float32 copy and reduces it in a tree of ``reduce-window``\\ s. XLA's sum
  where the CPU is not the only device."""
  if cpu_build.sole_cpu_device() and skinny_matmul.available():
    return skinny_matmul.matmul(jnp.ones((1, g.shape[0]), jnp.float32), g, False)[0]
  return jnp.sum(g.astype(jnp.float32), axis=0)


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
  does; every path keeps ``plain``'s result shape and dtype. :func:`cpu_matmul` adds ``bias`` inside."""
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
  if cpu_matmul_applies(lhs, rhs) and result.dtype in KERNEL_DTYPES:
    flat_bias = None if bias is None else bias.reshape(-1)
    product = lambda x, w, t: cpu_matmul(x, w, flat_bias, t, result.dtype)  # noqa: E731
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
  adds it; :func:`cpu_matmul` adds it in float32 and sums its gradient with the few-row kernel."""

  def plain(a, b):
    a, b = promote_dtype(a, b)
    return lax.dot_general(
      a, b, dimension_numbers, precision, preferred_element_type=preferred_element_type, **kwargs
    )

  if kwargs:
    return with_bias(plain(inputs, kernel), bias)
  return cpu_product(plain, inputs, kernel, dimension_numbers, bias=bias)


def on_cpu_in_bf16(a, b) -> bool:
  """The bf16 paths apply: bf16 operands, the CPU the default backend."""
  return a.dtype == b.dtype == BF16 and jax.default_backend() == 'cpu'


def cpu_matmul_applies(a, b) -> bool:
  """:func:`cpu_matmul` applies: both operands bf16 on the CPU, or both float32 where the CPU is the only device
  (:func:`~transformer_jax.kernels.cpu_build.sole_cpu_device`: the float32 gradients' transposes and bias sums are
  kernels, whose custom calls a partitioner cannot split)."""
  if a.dtype == b.dtype == jnp.float32:
    return cpu_build.sole_cpu_device()
  return on_cpu_in_bf16(a, b)


def bf16_einsum(spec: str, a: jax.Array, b: jax.Array, out_dtype) -> jax.Array:
  """``jnp.einsum(spec, a, b)`` of bf16 operands with a float32 result cast to ``out_dtype``; the gradients are bf16
  products with float32 results too. ``spec`` is ``'A,B->C'`` with every index of ``A`` and of ``B`` in another of
  the three (a batched product, as attention's). Differentiable in both modes."""
  return product_p.bind(a, b, spec=spec).astype(out_dtype)


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
