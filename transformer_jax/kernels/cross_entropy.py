"""Softmax cross-entropy of float32 rows through a CPU kernel (``cross_entropy.cc``), as JAX primitives.

:func:`forward` gives, per row of ``(R, V)`` logits and ``(R,)`` targets: ``nll = lse - x[t]``, ``uniform = lse -
mean(x)`` (label smoothing's term), ``lse`` (the log normaliser) and the argmax. Its derivative is a primitive linear
in the logits' tangent, whose transpose, the backward pass, is the second kernel: so reverse mode costs one more
pass over the logits, with no ``(R, V)`` softmax written out in between, and forward mode works too. Derivatives of
higher order follow the same formulas in XLA's ops (:func:`reference_tangent`, :func:`reference_backward`).
Built like every kernel here (:mod:`transformer_jax.kernels.cpu_build`); :func:`available` is False where it cannot
be. :func:`transformer_jax.modules.cross_entropy.softmax_cross_entropy` chooses between this and XLA.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.interpreters import ad

from transformer_jax.kernels import cpu_build, primitives

FORWARD, BACKWARD = (
  'transformer_jax_cross_entropy_forward',
  'transformer_jax_cross_entropy_backward',
)
F32 = jnp.float32


def available() -> bool:
  """True when both kernels are built and registered for the CPU (built on the first call)."""
  return cpu_build.ffi_target(
    'cross_entropy.cc', 'TransformerJaxCrossEntropyForward', FORWARD
  ) and cpu_build.ffi_target('cross_entropy.cc', 'TransformerJaxCrossEntropyBackward', BACKWARD)


def takes(x) -> bool:
  """The kernels take float32 logits with a non-empty last axis."""
  return x.dtype == F32 and x.ndim > 0 and x.shape[-1] > 0


def _forward_avals(x, t):
  """``nll``, ``uniform``, ``lse`` and the argmax: one per row. The primitive's abstract values and the FFI call's
  result shapes both."""
  rows = jax.core.ShapedArray(x.shape[:-1], F32)
  return rows, rows, rows, jax.core.ShapedArray(x.shape[:-1], jnp.int32)


def _backward_aval(x, t, lse, g_nll, g_uniform):
  return jax.core.ShapedArray(x.shape, F32)


def _forward_call(x, t):
  return jax.ffi.ffi_call(FORWARD, _forward_avals(x, t))(x, t)


def _backward_call(*args):
  return jax.ffi.ffi_call(BACKWARD, _backward_aval(*args))(*args)


def reference_tangent(dx, x, lse, t):
  """The tangents of ``nll`` and ``uniform`` for a tangent ``dx`` of the logits (linear in ``dx``)."""
  expected = jnp.sum(jnp.exp(x - lse[..., None]) * dx, axis=-1)  # E_p[dx]
  at_target = jnp.take_along_axis(dx, t[..., None], axis=-1)[..., 0]
  return expected - at_target, expected - jnp.mean(dx, axis=-1)


def reference_backward(x, t, lse, g_nll, g_uniform):
  """The logits' cotangent for cotangents ``g_nll`` and ``g_uniform`` (the transpose of :func:`reference_tangent`)."""
  probs = jnp.exp(x - lse[..., None])
  onehot = jax.nn.one_hot(t, x.shape[-1], dtype=F32)
  return (
    probs * (g_nll + g_uniform)[..., None]
    - onehot * g_nll[..., None]
    - g_uniform[..., None] / x.shape[-1]
  )


forward_p = primitives.define(
  FORWARD, _forward_call, _forward_avals, multiple_results=True, cpu_only=True
)
# (dx, x, lse, t) -> (d nll, d uniform): linear in dx, evaluated by XLA (forward mode is rare); its transpose is
# the backward kernel
tangent_p = primitives.define(
  'transformer_jax_cross_entropy_tangent',
  reference_tangent,
  lambda dx, x, lse, t: (jax.core.ShapedArray(lse.shape, F32),) * 2,
  multiple_results=True,
  cpu_only=False,
)
# (x, t, lse, g_nll, g_uniform) -> dx: linear in (g_nll, g_uniform); its transpose is the tangent
backward_p = primitives.define(
  BACKWARD, _backward_call, _backward_aval, multiple_results=False, cpu_only=True
)


def _forward_jvp(primals, tangents):
  x, t = primals
  dx, _ = tangents
  nll, uniform, lse, predicted = forward_p.bind(x, t)
  dx = ad.instantiate_zeros(dx)
  d_nll, d_uniform = tangent_p.bind(dx, x, lse, t)
  d_lse = d_nll + jnp.take_along_axis(dx, t[..., None], axis=-1)[..., 0]
  return (nll, uniform, lse, predicted), (
    d_nll,
    d_uniform,
    d_lse,
    ad.Zero(jax.typeof(predicted).to_tangent_aval()),
  )


ad.primitive_jvps[forward_p] = _forward_jvp


def _tangent_transpose(cts, dx, x, lse, t):
  g_nll, g_uniform = (ad.instantiate_zeros(ct) for ct in cts)
  return backward_p.bind(x, t, lse, g_nll, g_uniform), None, None, None


def _backward_transpose(ct, x, t, lse, g_nll, g_uniform):
  d_nll, d_uniform = tangent_p.bind(ad.instantiate_zeros(ct), x, lse, t)
  return None, None, None, d_nll, d_uniform


ad.primitive_transposes[tangent_p] = _tangent_transpose
ad.primitive_transposes[backward_p] = _backward_transpose
# second derivatives: XLA's ops on the same formulas
primitives.jvp_of_reference(tangent_p, reference_tangent)
primitives.jvp_of_reference(backward_p, reference_backward)


# vmap: every operand is per row
for _primitive in (forward_p, tangent_p, backward_p):
  primitives.batch_as_rows(_primitive)


def forward(x: jax.Array, t: jax.Array):
  """``(..., V)`` float32 logits, ``(...)`` int32 targets -> ``nll``, ``uniform``, ``lse`` (float32) and the
  argmax (int32), each ``(...)``. Differentiable in both modes and vmappable."""
  if not available():
    raise RuntimeError('the cross_entropy CPU kernels could not be built; see the logged warning')
  if not takes(x):
    raise ValueError(
      f'cross_entropy takes float32 with a non-empty last axis, got {x.dtype}{list(x.shape)}'
    )
  return forward_p.bind(x, t.astype(jnp.int32))
