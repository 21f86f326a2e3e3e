"""Attention through a CPU kernel that keeps each head's logits in cache (``attention.cc``).

XLA:CPU runs attention as a chain of whole-array ops over the ``(B, H, T, S)`` logits (product, mask, the softmax's
max, exponent, sum and division, then as many again for the gradient), and the passes over memory, not the
products, are its cost. The kernel takes one head at a time and its queries in blocks, so a block's logits and
probabilities stay in cache between the products that make and use them. The softmax and every sum are float32,
as the einsum path's; float32 inputs are multiplied in float32, and bfloat16 ones too on a CPU without AVX512-BF16
(outputs rounded once). With it, bfloat16 inputs are multiplied as bfloat16 pairs, the softmax's weights and their
gradient rounded to bfloat16 first as the einsum path rounds them: the products run twice as fast. Its gradient is
the second kernel, which recomputes the probabilities from the saved log-sum-exp (FlashAttention's recipe) instead of
storing them.

In JAX these are three primitives, as for the norm kernel: the forward kernel; its tangent map, linear in the
tangents of the query, keys and values, evaluated by XLA over the whole ``(B, H, T, S)`` probabilities
(:func:`reference_tangent`; forward mode is rare); and that map's transpose, the backward kernel. So reverse mode
runs both kernels, forward mode (``jax.jvp``, ``jax.jacfwd``) works, and derivatives of higher order follow the same
formulas in XLA's ops. vmap folds the mapped axis into the batch: one call for all. Built on first use for this CPU
(:mod:`transformer_jax.kernels.cpu_build`); :func:`available` is False where it cannot be.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.interpreters import ad, batching

from transformer_jax.kernels import cpu_build, primitives

FORWARD = 'transformer_jax_attention_forward'
BACKWARD = 'transformer_jax_attention_backward'
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
F32 = jnp.float32


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


def _forward_avals(query, key, value, mask, *, scale):
  """The output (the query's shape and dtype) and the log-sum-exp of each row's logits, ``(B, H, T)`` float32
  (``+inf`` for a row with no visible key): the primitive's abstract values and the FFI call's result shapes both."""
  batch, q_len, heads, _ = query.shape
  return (
    jax.core.ShapedArray(query.shape, query.dtype),
    jax.core.ShapedArray((batch, heads, q_len), F32),
  )


def _backward_avals(query, key, value, mask, out, lse, d_out, *, scale):
  return tuple(jax.core.ShapedArray(x.shape, x.dtype) for x in (query, key, value))


def _forward_call(query, key, value, mask, *, scale):
  avals = _forward_avals(query, key, value, mask, scale=scale)
  return jax.ffi.ffi_call(FORWARD, avals)(query, key, value, mask, scale=np.float32(scale))


def _backward_call(query, key, value, mask, out, lse, d_out, *, scale):
  avals = _backward_avals(query, key, value, mask, out, lse, d_out, scale=scale)
  return jax.ffi.ffi_call(BACKWARD, avals)(
    query, key, value, mask, out, lse, d_out, scale=np.float32(scale)
  )


# The XLA formulas, float32 inside. Query heads are split into G groups of R = H / G, each meeting its key/value head.


def _grouped(query, kv_heads):
  """``(B, T, H, K)`` as ``(B, T, G, R, K)`` float32."""
  batch, q_len, heads, head_dim = query.shape
  return query.astype(F32).reshape(batch, q_len, kv_heads, heads // kv_heads, head_dim)


def _ungrouped(x, like):
  """``(B, T, G, R, K)`` float32 back to ``like``'s ``(B, T, H, K)`` and dtype."""
  return x.reshape(like.shape).astype(like.dtype)


def _probabilities(query, key, mask, lse, scale):
  """The softmax weights ``(B, G, R, T, S)`` float32, from the saved log-sum-exp; 0 where the mask hides a key (a
  row with no visible key has ``lse = +inf`` and all zeros)."""
  kv_heads = key.shape[2]
  logits = scale * jnp.einsum('btgrk,bsgk->bgrts', _grouped(query, kv_heads), key.astype(F32))
  batch, heads, q_len = lse.shape
  rows = lse.reshape(batch, kv_heads, heads // kv_heads, q_len, 1)
  m_batch, m_heads, m_rows, kv_len = mask.shape
  group_shape = (kv_heads, heads // kv_heads) if m_heads == heads else (1, 1)
  visible = mask.reshape(m_batch, *group_shape, m_rows, kv_len).astype(bool)
  # masked before the exponent: a hidden logit far above the visible ones would give exp() = inf, and its derivative
  # inf x 0 = NaN through a where() after it
  return jnp.exp(jnp.where(visible, logits - rows, -jnp.inf))


def _logit_tangent(d_query, d_key, query, key, scale):
  """The tangent of the logits ``scale q k^T`` for tangents of the query and keys, ``(B, G, R, T, S)``."""
  kv_heads = key.shape[2]
  return scale * (
    jnp.einsum('btgrk,bsgk->bgrts', _grouped(d_query, kv_heads), key.astype(F32))
    + jnp.einsum('btgrk,bsgk->bgrts', _grouped(query, kv_heads), d_key.astype(F32))
  )


def reference_tangent(d_query, d_key, d_value, query, key, value, mask, out, lse, *, scale):
  """The tangents of the output (in the query's dtype) and of the log-sum-exp for tangents of the query, keys and
  values (linear in them): ``dP v + P dv`` with ``dP = P (dS - rowsum(P dS))``, and ``rowsum(P dS)``."""
  p = _probabilities(query, key, mask, lse, scale)
  d_logits = _logit_tangent(d_query, d_key, query, key, scale)
  d_lse = jnp.sum(p * d_logits, -1, keepdims=True)  # (B, G, R, T, 1)
  d_out = jnp.einsum('bgrts,bsgk->btgrk', p * (d_logits - d_lse), value.astype(F32)) + jnp.einsum(
    'bgrts,bsgk->btgrk', p, d_value.astype(F32)
  )
  return _ungrouped(d_out, query), d_lse.reshape(lse.shape)


def _query_key_cotangents(d_logits, query, key):
  """The cotangents of the query and keys for the cotangent ``(B, G, R, T, S)`` of ``q k^T`` (any scale already in
  it), in their dtypes: the last step of both backward formulas."""
  d_query = jnp.einsum('bgrts,bsgk->btgrk', d_logits, key.astype(F32))
  d_key = jnp.einsum('bgrts,btgrk->bsgk', d_logits, _grouped(query, key.shape[2]))
  return _ungrouped(d_query, query), d_key.astype(key.dtype)


def _lse_backward(ct_lse, query, key, mask, lse, scale):
  """The cotangents of the query and keys for a cotangent of the log-sum-exp (the transpose of its tangent)."""
  kv_heads = key.shape[2]
  batch, heads, q_len = lse.shape
  rows = ct_lse.reshape(batch, kv_heads, heads // kv_heads, q_len, 1)
  d_logits = scale * _probabilities(query, key, mask, lse, scale) * rows
  return _query_key_cotangents(d_logits, query, key)


def reference_backward(query, key, value, mask, out, lse, d_out, *, scale):
  """The cotangents of the query, keys and values for a cotangent of the output (the transpose of
  :func:`reference_tangent`), as the backward kernel computes them."""
  kv_heads = key.shape[2]
  p = _probabilities(query, key, mask, lse, scale)
  d_grouped = _grouped(d_out, kv_heads)  # (B, T, G, R, K)
  d_value = jnp.einsum('bgrts,btgrk->bsgk', p, d_grouped)
  d_p = jnp.einsum('btgrk,bsgk->bgrts', d_grouped, value.astype(F32))
  # rowsum(P dP) = rowsum(dO O): (B, G, R, T, 1)
  row_dots = jnp.einsum('btgrk,btgrk->bgrt', d_grouped, _grouped(out, kv_heads))[..., None]
  d_query, d_key = _query_key_cotangents(scale * p * (d_p - row_dots), query, key)
  return d_query, d_key, d_value.astype(value.dtype)


forward_p = primitives.define(
  FORWARD, _forward_call, _forward_avals, multiple_results=True, cpu_only=True
)
# (dq, dk, dv, q, k, v, mask, out, lse) -> (d_out, d_lse): linear in the first three, evaluated by XLA; its
# transpose is the backward kernel (and, where the log-sum-exp has a cotangent, XLA's ops for that part)
tangent_p = primitives.define(
  'transformer_jax_attention_tangent',
  reference_tangent,
  lambda d_query, d_key, d_value, *primals, scale: _forward_avals(*primals[:4], scale=scale),
  multiple_results=True,
  cpu_only=False,
)
# (q, k, v, mask, out, lse, d_out) -> (dq, dk, dv): linear in d_out; its transpose is the tangent
backward_p = primitives.define(
  BACKWARD, _backward_call, _backward_avals, multiple_results=True, cpu_only=True
)


def _forward_jvp(primals, tangents, *, scale):
  query, key, value, mask = primals
  out, lse = forward_p.bind(query, key, value, mask, scale=scale)
  d_query, d_key, d_value = (ad.instantiate_zeros(t) for t in tangents[:3])
  d_out, d_lse = tangent_p.bind(
    d_query, d_key, d_value, query, key, value, mask, out, lse, scale=scale
  )
  return (out, lse), (d_out, d_lse)


def _tangent_transpose(cts, d_query, d_key, d_value, query, key, value, mask, out, lse, *, scale):
  ct_out, ct_lse = cts
  ct_out = ad.instantiate_zeros(ct_out).astype(query.dtype)
  ct_query, ct_key, ct_value = backward_p.bind(
    query, key, value, mask, out, lse, ct_out, scale=scale
  )
  if (
    type(ct_lse) is not ad.Zero
  ):  # only where a derivative of the forward primitive's lse is itself differentiated
    lse_query, lse_key = _lse_backward(ct_lse, query, key, mask, lse, scale)
    ct_query, ct_key = ct_query + lse_query, ct_key + lse_key
  return ct_query, ct_key, ct_value, None, None, None, None, None, None


def _backward_transpose(cts, query, key, value, mask, out, lse, d_out, *, scale):
  ct_query, ct_key, ct_value = (ad.instantiate_zeros(ct) for ct in cts)
  d_out, _ = tangent_p.bind(
    ct_query, ct_key, ct_value, query, key, value, mask, out, lse, scale=scale
  )
  return None, None, None, None, None, None, d_out


ad.primitive_jvps[forward_p] = _forward_jvp
ad.primitive_transposes[tangent_p] = _tangent_transpose
ad.primitive_transposes[backward_p] = _backward_transpose
# second derivatives: XLA's ops on the same formulas
primitives.jvp_of_reference(tangent_p, reference_tangent)
primitives.jvp_of_reference(backward_p, reference_backward)

# the position of the mask among each primitive's operands: it leads with (1 or B); every other operand leads with B
MASK_AT = {forward_p: 3, tangent_p: 6, backward_p: 3}


def _fold_into_batch(primitive):
  """vmap (every primitive here has several results): the mapped axis N joins the batch, ``(N, B, ...)`` -> ``(N B,
  ...)``, and one call does all. A mask shared by every example and by the batch (leading 1) stays as it is."""

  def rule(args, dims, **params):
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    batch = args[0].shape[1 if dims[0] == 0 else 0]  # the query's B, wherever N is
    folded = []
    for i, (a, d) in enumerate(zip(args, dims)):
      if i == MASK_AT[primitive] and d is None and a.shape[0] == 1:
        folded.append(a)
        continue
      a = batching.bdim_at_front(a, d, size)
      if i == MASK_AT[primitive]:
        a = jnp.broadcast_to(a, (size, batch, *a.shape[2:]))
      folded.append(a.reshape(size * batch, *a.shape[2:]))
    out = primitive.bind(*folded, **params)
    unfold = lambda x: x.reshape(size, batch, *x.shape[1:])  # noqa: E731
    return [unfold(x) for x in out], [0] * len(out)

  batching.primitive_batchers[primitive] = rule


for _primitive in MASK_AT:
  _fold_into_batch(_primitive)


def attention(query, key, value, mask, scale: float):
  """``softmax(scale q k^T, masked) v``: query ``(B, T, H, K)``, key and value ``(B, S, G, K)`` (``G`` divides
  ``H``), mask from :func:`kernel_mask`; float32 or bfloat16, one dtype. A row with no visible key gives zeros.
  Differentiable in both modes and vmappable."""
  if not available():
    raise RuntimeError('the attention CPU kernel could not be built; see the logged warning')
  out, _ = forward_p.bind(query, key, value, mask, scale=float(scale))
  return out
