"""Layer and RMS normalisation through a CPU kernel (``norm.cc``): each row normalised, and its gradient taken, while
it is in cache.

XLA:CPU runs a norm as several fusions over the whole array: the mean, the centred square's mean and the output
forward; three row reductions, two column reductions and the elementwise terms backward. Each is a pass over memory:
on Ice Lake about 50 ms of a course GPT step's op time. The kernel makes one pass forward and one backward (the
column sums of the scale's and bias's gradients included). Statistics are float32 whatever the input's dtype
(float32 or bfloat16); the output has the input's dtype.

In JAX these are three primitives, as for the cross-entropy kernel: the forward kernel; its tangent map, linear in
the tangents of ``x``, the scale and the bias, evaluated by XLA (:func:`reference_tangent`); and that map's
transpose, the backward kernel. So reverse mode runs both kernels and forward mode works too; derivatives of higher
order follow the same formulas in XLA's ops. Built on first use for this CPU (:mod:`transformer_jax.kernels.cpu_build`);
:func:`available` is False where it cannot be. :mod:`transformer_jax.modules.normalization` takes it where
:func:`applies`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.interpreters import ad

from transformer_jax.kernels import cpu_build, primitives

FORWARD = 'transformer_jax_norm_forward'
BACKWARD = 'transformer_jax_norm_backward'
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
F32 = jnp.float32
# the kernel's kinds: LayerNorm with the biased variance, LayerNorm as (x - mean) / (std + eps) with the unbiased std,
# and RMSNorm (no centring, no bias)
KINDS = {'standard': 0, 'unbiased_std': 1, 'rms': 2}


def available() -> bool:
  """True when both kernels are built and registered for the CPU (built on the first call)."""
  return cpu_build.ffi_target(
    'norm.cc', 'TransformerJaxNormForward', FORWARD
  ) and cpu_build.ffi_target('norm.cc', 'TransformerJaxNormBackward', BACKWARD)


# Fewer rows than this stay XLA's: a decoding step's few rows are in cache, where XLA's fused ops cost no more. Greedy
# decoding of the small GPT shape at batch 1, bf16, both programs in one process (interleaved, three runs): 4.08 /
# 4.30 / 3.77 ms a token with XLA's norms, 4.28 / 4.42 / 3.88 with the kernel (two identical programs timed the
# same way differed by 3%).
MIN_ROWS = 64


def applies(x: jax.Array, out_dtype) -> bool:
  """The kernel is the default path for ``x``: float32 or bfloat16 with at least one feature and :data:`MIN_ROWS`
  rows, the output wanted in the same dtype, and the CPU the only device
  (:func:`~transformer_jax.kernels.cpu_build.sole_cpu_device`); and the kernel builds here."""
  return (
    x.dtype in DTYPES
    and jnp.dtype(out_dtype) == x.dtype
    and x.ndim > 0
    and x.shape[-1] > 0
    and math.prod(x.shape[:-1]) >= MIN_ROWS
    and cpu_build.sole_cpu_device()
    and available()
  )


def _forward_avals(x, scale, bias, *, epsilon, kind):
  """``y`` (``x``'s shape and dtype), and per row the mean and ``r`` (float32): the primitive's abstract values and
  the FFI call's result shapes both."""
  rows = jax.core.ShapedArray(x.shape[:-1], F32)
  return jax.core.ShapedArray(x.shape, x.dtype), rows, rows


def _backward_avals(x, scale, mean, inverse, dy, *, kind):
  features = jax.core.ShapedArray(scale.shape, F32)
  return jax.core.ShapedArray(x.shape, x.dtype), features, features


def _forward_call(x, scale, bias, *, epsilon, kind):
  avals = _forward_avals(x, scale, bias, epsilon=epsilon, kind=kind)
  return jax.ffi.ffi_call(FORWARD, avals)(
    x, scale, bias, epsilon=np.float32(epsilon), kind=np.int32(kind)
  )


def _backward_call(x, scale, mean, inverse, dy, *, kind):
  avals = _backward_avals(x, scale, mean, inverse, dy, kind=kind)
  return jax.ffi.ffi_call(BACKWARD, avals)(x, scale, mean, inverse, dy, kind=np.int32(kind))


def _row_terms(x, mean, inverse, kind):
  """``c`` (``x`` centred, or ``x`` itself for RMS), ``r`` and ``b`` per row (``norm.cc``'s header), float32."""
  width = x.shape[-1]
  c = x.astype(F32) - mean[..., None]
  r = inverse[..., None]
  if kind == KINDS['unbiased_std']:
    std = jnp.sqrt(jnp.sum(c * c, -1, keepdims=True) / (width - 1))
    b = jnp.where(std > 0, r * r / ((width - 1) * jnp.where(std > 0, std, 1.0)), 0.0)
  else:
    b = r**3 / width
  return c, r, b


def _normalised_tangent(dx, c, r, b, kind):
  """The tangent of ``c r`` for a tangent ``dx`` of ``x``: ``r (dx - mean(dx)) - b c (c . dx)`` (no mean for RMS).
  Symmetric in ``dx``, so it is also the gradient's map."""
  centred = dx if kind == KINDS['rms'] else dx - jnp.mean(dx, -1, keepdims=True)
  return r * centred - b * c * jnp.sum(c * dx, -1, keepdims=True)


def reference_tangent(dx, dscale, dbias, x, scale, mean, inverse, *, kind):
  """The tangent of ``y`` for tangents of ``x``, the scale and the bias (linear in them), in ``x``'s dtype."""
  c, r, b = _row_terms(x, mean, inverse, kind)
  dx = dx.astype(F32)
  dy = scale * _normalised_tangent(dx, c, r, b, kind) + dscale * (c * r) + dbias
  return dy.astype(x.dtype)


def reference_backward(x, scale, mean, inverse, dy, *, kind):
  """The cotangents of ``x``, the scale and the bias for a cotangent ``dy`` (the transpose of
  :func:`reference_tangent`)."""
  c, r, b = _row_terms(x, mean, inverse, kind)
  dy = dy.astype(F32)
  rows = tuple(range(x.ndim - 1))
  dx = _normalised_tangent(dy * scale, c, r, b, kind)
  return dx.astype(x.dtype), jnp.sum(dy * c * r, rows), jnp.sum(dy, rows)


forward_p = primitives.define(
  FORWARD, _forward_call, _forward_avals, multiple_results=True, cpu_only=True
)
# (dx, dscale, dbias, x, scale, mean, inverse) -> dy: linear in the first three, evaluated by XLA (forward mode is
# rare); its transpose is the backward kernel
tangent_p = primitives.define(
  'transformer_jax_norm_tangent',
  reference_tangent,
  lambda dx, dscale, dbias, x, *_, kind: jax.core.ShapedArray(x.shape, x.dtype),
  multiple_results=False,
  cpu_only=False,
)
# (x, scale, mean, inverse, dy) -> (dx, dscale, dbias): linear in dy; its transpose is the tangent
backward_p = primitives.define(
  BACKWARD, _backward_call, _backward_avals, multiple_results=True, cpu_only=True
)


def _forward_jvp(primals, tangents, *, epsilon, kind):
  x, scale, bias = primals
  y, mean, inverse = forward_p.bind(x, scale, bias, epsilon=epsilon, kind=kind)
  dx, dscale, dbias = (ad.instantiate_zeros(t) for t in tangents)
  dy = tangent_p.bind(dx, dscale, dbias, x, scale, mean, inverse, kind=kind)
  # the statistics' own tangents: d mean = mean(dx) (none for RMS); d r = -b (c . dx)
  c, _, b = _row_terms(x, mean, inverse, kind)
  wide = dx.astype(F32)
  d_mean = jnp.zeros_like(mean) if kind == KINDS['rms'] else jnp.mean(wide, -1)
  d_inverse = -b[..., 0] * jnp.sum(c * wide, -1)
  return (y, mean, inverse), (dy, d_mean, d_inverse)


def _tangent_transpose(ct, dx, dscale, dbias, x, scale, mean, inverse, *, kind):
  d_x, d_scale, d_bias = backward_p.bind(
    x, scale, mean, inverse, ad.instantiate_zeros(ct), kind=kind
  )
  return d_x, d_scale, d_bias, None, None, None, None


def _backward_transpose(cts, x, scale, mean, inverse, dy, *, kind):
  ct_x, ct_scale, ct_bias = (ad.instantiate_zeros(ct) for ct in cts)
  return (
    None,
    None,
    None,
    None,
    tangent_p.bind(ct_x, ct_scale, ct_bias, x, scale, mean, inverse, kind=kind),
  )


ad.primitive_jvps[forward_p] = _forward_jvp
ad.primitive_transposes[tangent_p] = _tangent_transpose
ad.primitive_transposes[backward_p] = _backward_transpose
# second derivatives: XLA's ops on the same formulas
primitives.jvp_of_reference(tangent_p, reference_tangent)
primitives.jvp_of_reference(backward_p, reference_backward)


# vmap: the scale and bias (and their tangents) are per feature; the backward kernel's scale and bias gradients
# are sums over an example's rows
primitives.batch_as_rows(forward_p, shared=(1, 2))
primitives.batch_as_rows(tangent_p, shared=(1, 2, 4))
primitives.batch_as_rows(backward_p, shared=None)


def normalize(
  x: jax.Array, scale: jax.Array, bias: jax.Array | None, *, epsilon: float, kind: str
) -> jax.Array:
  """``(..., D)`` ``x`` normalised over its last axis, times ``scale`` plus ``bias`` (``(D,)``, taken as float32;
  None for no bias), in ``x``'s dtype. ``kind``: ``'standard'`` (``(x - mean) / sqrt(var + eps)``),
  ``'unbiased_std'`` (``(x - mean) / (std + eps)``, the unbiased std; needs D >= 2) or ``'rms'`` (``x /
  sqrt(mean(x^2) + eps)``, and no bias). Differentiable in both modes and vmappable."""
  if not available():
    raise RuntimeError('the norm CPU kernel could not be built; see the logged warning')
  if kind not in KINDS:
    raise ValueError(f'unknown norm kind {kind!r}; expected one of {sorted(KINDS)}')
  if bias is None:
    bias = jnp.zeros(x.shape[-1:], F32)
  elif kind == 'rms':
    raise ValueError('RMS normalisation takes no bias')
  y, _, _ = forward_p.bind(
    x, scale.astype(F32), bias.astype(F32), epsilon=float(epsilon), kind=KINDS[kind]
  )
  return y
