"""Layer and RMS normalisation through a CPU kernel (``norm.cc``): each row normalised, and its gradient taken, while
it is in cache.

XLA:CPU runs a norm as several fusions over the whole array: the mean, the centred square's mean and the output
forward; three row reductions, two column reductions and the elementwise terms backward. Each is a pass over memory:
on Ice Lake about 50 ms of a course GPT step's op time. The kernel makes one pass forward and one backward (the
column sums of the scale's and bias's gradients included). Statistics are float32 whatever the input's
dtype (float32 or bfloat16); the output has the input's dtype.

:func:`normalize` is differentiable in reverse mode (``jax.custom_vjp``, like the attention kernel) and vmappable.
Built on first use for this CPU (:mod:`transformer_jax.kernels.cpu_build`); :func:`available` is False where it
cannot be. :mod:`transformer_jax.modules.normalization` takes it where :func:`applies`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax.kernels import cpu_build

FORWARD = 'transformer_jax_norm_forward'
BACKWARD = 'transformer_jax_norm_backward'
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
# the kernel's kinds: LayerNorm with the biased variance, LayerNorm as (x - mean) / (std + eps) with the unbiased std,
# and RMSNorm (no centring, no bias)
KINDS = {'standard': 0, 'unbiased_std': 1, 'rms': 2}


def available() -> bool:
  """True when both kernels are built and registered for the CPU (built on the first call)."""
  return cpu_build.ffi_target(
    'norm.cc', 'TransformerJaxNormForward', FORWARD
  ) and cpu_build.ffi_target('norm.cc', 'TransformerJaxNormBackward', BACKWARD)


def applies(x: jax.Array, out_dtype) -> bool:
  """The kernel is the default path for ``x``: float32 or bfloat16 with at least one feature, the output wanted in
  the same dtype, and the CPU the only device (:func:`~transformer_jax.kernels.cpu_build.sole_cpu_device`); and the
  kernel builds here."""
  return (
    x.dtype in DTYPES
    and jnp.dtype(out_dtype) == x.dtype
    and x.ndim > 0
    and x.shape[-1] > 0
    and cpu_build.sole_cpu_device()
    and available()
  )


def _forward_call(x2, scale, bias, epsilon, kind):
  rows = jax.ShapeDtypeStruct((x2.shape[0],), jnp.float32)
  call = jax.ffi.ffi_call(
    FORWARD, (jax.ShapeDtypeStruct(x2.shape, x2.dtype), rows, rows), vmap_method='sequential'
  )
  return call(x2, scale, bias, epsilon=np.float32(epsilon), kind=np.int32(kind))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _normalize(x2, scale, bias, epsilon: float, kind: int):
  return _forward_call(x2, scale, bias, epsilon, kind)[0]


def _normalize_fwd(x2, scale, bias, epsilon, kind):
  y, mean, inverse = _forward_call(x2, scale, bias, epsilon, kind)
  return y, (x2, scale, mean, inverse)


def _normalize_bwd(epsilon, kind, residuals, dy):
  x2, scale, mean, inverse = residuals
  width = x2.shape[1]
  shapes = (
    jax.ShapeDtypeStruct(x2.shape, x2.dtype),
    jax.ShapeDtypeStruct((width,), jnp.float32),
    jax.ShapeDtypeStruct((width,), jnp.float32),
  )
  call = jax.ffi.ffi_call(BACKWARD, shapes, vmap_method='sequential')
  return call(x2, scale, mean, inverse, dy.astype(x2.dtype), kind=np.int32(kind))


_normalize.defvjp(_normalize_fwd, _normalize_bwd)


def normalize(
  x: jax.Array, scale: jax.Array, bias: jax.Array | None, *, epsilon: float, kind: str
) -> jax.Array:
  """``(..., D)`` ``x`` normalised over its last axis, times ``scale`` plus ``bias`` (``(D,)``, taken as float32;
  None for no bias), in ``x``'s dtype. ``kind``: ``'standard'`` (``(x - mean) / sqrt(var + eps)``),
  ``'unbiased_std'`` (``(x - mean) / (std + eps)``, the unbiased std; needs D >= 2) or ``'rms'`` (``x /
  sqrt(mean(x^2) + eps)``, and no bias)."""
  if not available():
    raise RuntimeError('the norm CPU kernel could not be built; see the logged warning')
  if kind not in KINDS:
    raise ValueError(f'unknown norm kind {kind!r}; expected one of {sorted(KINDS)}')
  width = x.shape[-1]
  if bias is None:
    bias = jnp.zeros((width,), jnp.float32)
  elif kind == 'rms':
    raise ValueError('RMS normalisation takes no bias')
  x2 = jnp.reshape(x, (math.prod(x.shape[:-1]), width))
  y = _normalize(x2, scale.astype(jnp.float32), bias.astype(jnp.float32), epsilon, KINDS[kind])
  return jnp.reshape(y, x.shape)
