"""Attention through a CPU kernel that keeps each head's logits in cache (``attention.cc``).

XLA:CPU runs attention as a chain of whole-array ops over the ``(B, H, T, S)`` logits (product, mask, the softmax's
max, exponent, sum and division, then as many again for the gradient), and the passes over memory, not the
products, are its cost. The kernel takes one head at a time and its queries in blocks, so a block's logits and
probabilities stay in cache between the products that make and use them; everything is float32 inside (bfloat16
inputs widened, outputs rounded once), the softmax as the einsum path's. Its gradient is the second kernel, which
recomputes the probabilities from the saved log-sum-exp (FlashAttention's recipe) instead of storing them.

:func:`attention` is differentiable (``jax.custom_vjp``) and vmappable (one call per example). Built on first use for
this CPU (:mod:`transformer_jax.kernels.cpu_build`); :func:`available` is False where it cannot be.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax.kernels import cpu_build

FORWARD = 'transformer_jax_attention_forward'
BACKWARD = 'transformer_jax_attention_backward'
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def available() -> bool:
  """True when both kernels are built and registered for the CPU (built on the first call)."""
  return cpu_build.ffi_target(
    'attention.cc', 'TransformerJaxAttentionForward', FORWARD
  ) and cpu_build.ffi_target('attention.cc', 'TransformerJaxAttentionBackward', BACKWARD)


def applies(query: jax.Array, key: jax.Array, value: jax.Array) -> bool:
  """The kernel is the default path for these operands: float32 or bfloat16 of one dtype, and the CPU the only
  device (:func:`~transformer_jax.kernels.cpu_build.sole_cpu_device`); and the kernel builds here. A decoding step's
  query row takes it too: it reads the key/value cache where it lies, where the einsum path copies each layer's cache
  into two layouts (widened to float32 for a bf16 cache) at every step."""
  return (
    query.dtype in DTYPES
    and query.dtype == key.dtype == value.dtype
    and cpu_build.sole_cpu_device()
    and available()
  )


def kernel_mask(
  mask: jax.Array | None, batch: int, heads: int, q_len: int, kv_len: int
) -> jax.Array:
  """``mask`` (boolean, broadcastable to ``(B, H, T, S)``, or None) as the kernel's ``uint8 (MB, MH, MT, S)``, each
  leading size 1 or the full one, so a causal or padding mask is never expanded to a mask per head."""
  if mask is None:
    return jnp.ones((1, 1, 1, kv_len), jnp.uint8)
  mask = jnp.reshape(mask, (1,) * (4 - mask.ndim) + mask.shape)
  full = (batch, heads, q_len)
  shape = tuple(1 if size == 1 else whole for size, whole in zip(mask.shape[:3], full)) + (kv_len,)
  return jnp.broadcast_to(mask, shape).astype(jnp.uint8)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def attention(query, key, value, mask, scale: float):
  """``softmax(scale q k^T, masked) v``: query ``(B, T, H, K)``, key and value ``(B, S, G, K)`` (``G`` divides
  ``H``), mask from :func:`kernel_mask`; float32 or bfloat16, one dtype. A row with no visible key gives zeros."""
  return _forward(query, key, value, mask, scale)[0]


def _forward(query, key, value, mask, scale):
  if not available():
    raise RuntimeError('the attention CPU kernel could not be built; see the logged warning')
  batch, q_len, heads, _ = query.shape
  shapes = (
    jax.ShapeDtypeStruct(query.shape, query.dtype),
    jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32),
  )
  call = jax.ffi.ffi_call(FORWARD, shapes, vmap_method='sequential')
  return call(query, key, value, mask, scale=np.float32(scale))


def _attention_fwd(query, key, value, mask, scale):
  out, lse = _forward(query, key, value, mask, scale)
  return out, (query, key, value, mask, out, lse)


def _attention_bwd(scale, residuals, d_out):
  query, key, value, mask, out, lse = residuals
  shapes = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (query, key, value))
  call = jax.ffi.ffi_call(BACKWARD, shapes, vmap_method='sequential')
  d_query, d_key, d_value = call(
    query, key, value, mask, out, lse, d_out.astype(query.dtype), scale=np.float32(scale)
  )
  return d_query, d_key, d_value, None


attention.defvjp(_attention_fwd, _attention_bwd)
