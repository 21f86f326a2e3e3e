"""Scaled dot-product attention and multi-head attention.

Layouts: queries ``(B, T, H, K)``, keys and values ``(B, S, H, K)``, weights ``(B, H, T, S)``; masks are boolean with
``True`` = may attend, broadcastable to ``[B, H, T, S]`` (see :mod:`transformer_jax.masks`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer_jax import masks
from transformer_jax.kernels import attention as fused_attention
from transformer_jax.modules import dot
from transformer_jax.modules.dense import DenseGeneral
from transformer_jax.modules.rotary import Rotary
from transformer_jax.modules.update_slice import update_slice
from transformer_jax.sharding import Module, dense_inits
from transformer_jax.validation import check_attention_mask

Implementation = Literal['einsum', 'xla', 'cudnn'] | None

# Names in the 'cache' collection. Every key/value buffer ends in (B, S, G, K); scan adds a leading L.
# Self-attention, per slot:
CACHED_KEY, CACHED_VALUE, CACHE_INDEX = 'cached_key', 'cached_value', 'cache_index'
# Cross-attention: the projected encoder output.
MEMORY_KEY, MEMORY_VALUE = 'memory_key', 'memory_value'


def _full_mask(mask, batch: int, q_len: int, kv_len: int):
  """Broadcast batch and sequence axes (not heads): ``jax.nn.dot_product_attention``'s cuDNN path rejects a mask
  with singleton sequence axes (jax#28974)."""
  return jnp.broadcast_to(mask, (batch, mask.shape[1], q_len, kv_len))


def dot_product_attention(
  query,
  key,
  value,
  mask=None,
  *,
  bias=None,
  scale: float | None = None,
  dropout_rate: float = 0.0,
  dropout_rng=None,
  deterministic: bool = True,
  return_weights: bool = False,
  implementation: Implementation = None,
  check_mask: bool = True,
):
  """``softmax(scale q k^T + bias) v`` with boolean masking; ``scale`` defaults to ``1 / sqrt(K)``.

  Args:
    query: ``(B, T, H, K)``.
    key: ``(B, S, G, K)``, where ``G`` divides ``H``: grouped-query attention when ``G < H`` (multi-query when
      ``G = 1``), query head ``h`` attending with key/value head ``h // (H / G)`` as Hugging Face's ``repeat_kv``
      arranges them. The key/value heads are never copied.
    value: ``(B, S, G, K)``.
    mask: boolean, broadcastable to ``(B, H, T, S)``; ``True`` = may attend.
    bias: float, broadcastable to ``(B, H, T, S)``, added to the logits before masking (T5's relative position
      bias, :mod:`~transformer_jax.modules.relative_position`). Forces the einsum path.
    scale: multiplies ``q k^T``; ``None``: ``1 / sqrt(K)`` (T5 uses 1: its init folds the scale into the queries).
    dropout_rate, dropout_rng, deterministic: dropout on the attention weights (needs ``dropout_rng`` when active).
    return_weights: also return the ``(B, H, T, S)`` float32 weights (forces the einsum path).
    implementation: ``None``: on a single CPU device, float32 or bfloat16 (a decoding step's one row too) with no
      bias, dropout or returned weights, the fused CPU kernel (:mod:`transformer_jax.kernels.attention`); otherwise, and
      for ``'einsum'``, two einsums around a float32 softmax, written out here; ``'xla'`` or ``'cudnn'``:
      ``jax.nn.dot_product_attention`` with that implementation (``'cudnn'`` on GPUs, bf16 only). Dropout and
      ``return_weights`` always take the einsum path.
    check_mask: check the mask's dtype and shape (at trace time). The models build their masks from inputs checked
      where they enter, and turn it off so that a mask is checked once, not in every layer.

  Returns:
    ``(B, T, H, K)`` in the query's dtype, or ``(output, weights)``. A query row whose every key is masked gets zero
    weights and a zero output (never NaN). Logits and softmax are float32 whatever the input dtype.
  """
  batch, q_len, heads, head_dim = query.shape
  kv_len, kv_heads = key.shape[1], key.shape[2]
  if (
    key.shape != value.shape
    or key.shape[0] != batch
    or key.shape[3] != head_dim
    or kv_heads < 1
    or heads % kv_heads
  ):
    raise ValueError(
      f'attention shapes disagree: query {query.shape}, key {key.shape}, value {value.shape}'
    )
  if mask is not None and check_mask:
    check_attention_mask(mask, batch, heads, q_len, kv_len)
  use_dropout = dropout_rate > 0.0 and not deterministic
  if use_dropout and dropout_rng is None:
    raise ValueError(
      'attention dropout is active (deterministic=False) but no dropout_rng was given'
    )
  scale = 1 / math.sqrt(head_dim) if scale is None else scale
  # what the fused kernel and jax.nn.dot_product_attention compute: no bias, no dropout, no weights returned
  plain = bias is None and not return_weights and not use_dropout

  if implementation is None and plain and fused_attention.applies(query, key, value):
    fused_mask = fused_attention.kernel_mask(mask, batch, heads, q_len, kv_len)
    return fused_attention.attention(query, key, value, fused_mask, scale)

  # Rows with no visible key: zeros, not a uniform average over masked keys. (B, H|1, T, 1)
  row_ok = None if mask is None else jnp.any(mask, axis=-1, keepdims=True)

  if implementation in ('xla', 'cudnn') and plain:
    full = None if mask is None else _full_mask(mask, batch, q_len, kv_len)
    out = jax.nn.dot_product_attention(
      query, key, value, mask=full, scale=scale, implementation=implementation
    )
    return _zero_empty_rows(out, row_ok)

  # Scaling the (B, T, H, K) query instead of the (B, H, T, S) logits saves a pass over the larger array. Query heads
  # are split into (G, H/G) groups so that each group meets its one key/value head.
  # (B, T, G, H/G, K)
  scaled = (query * jnp.asarray(scale, query.dtype)).reshape(
    batch, q_len, kv_heads, heads // kv_heads, head_dim
  )
  logits = dot.einsum('BTGQK,BSGK->BGQTS', scaled, key, jnp.float32)
  logits = logits.astype(jnp.float32).reshape(batch, heads, q_len, kv_len)  # (B, H, T, S)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1)  # (B, H, T, S)
  applied = weights
  if use_dropout:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
    applied = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
  grouped = applied.astype(value.dtype).reshape(batch, kv_heads, heads // kv_heads, q_len, kv_len)
  out = dot.einsum('BGQTS,BSGK->BTGQK', grouped, value).reshape(batch, q_len, heads, head_dim)
  out = _zero_empty_rows(out, row_ok)
  if not return_weights:
    return out
  return out, weights if row_ok is None else jnp.where(row_ok, weights, 0.0)


def _zero_empty_rows(out, row_ok):
  """Zeroes the ``(B, T, H, K)`` output of query rows with no visible key (``row_ok``: ``(B, H|1, T, 1)``). Zeroing
  the output costs less than zeroing the ``(B, H, T, S)`` weights, and gives the same values and gradients."""
  return out if row_ok is None else jnp.where(jnp.swapaxes(row_ok, 1, 2), out, 0)


# (D, H, K) projections: heads split over the tensor axis; a key/value head count the axis does not divide stays whole
# (see sharding._spec).
HEAD_KERNEL = ('embed', 'heads', 'kv')


class MultiHeadAttention(Module):
  """Multi-head attention for self- (``inputs_kv=None``) and cross-attention.

  Parameters: ``query`` kernel ``(D, H, K)``, ``key``/``value`` kernels ``(D, G, K)`` for ``G = num_kv_heads``
  (grouped-query attention when ``G < H``), or, with ``fused_qkv``, one ``qkv`` kernel ``(D, 3, H, K)``
  (self-attention with ``G = H`` only); ``out`` kernel ``(H, K, D)``. Applied with ``mutable=['intermediates']``
  it also sows the ``(B, H, T, S)`` attention weights under ``attention_weights``.

  With ``decode=True`` (applied with ``mutable=['cache']``, see :mod:`transformer_jax.generation`) self-attention
  writes the chunk's keys and values into fixed-size ``cached_key`` / ``cached_value`` buffers ``(B, S, G, K)`` (KV
  heads only) at ``cache_index`` and attends to every slot written so far. Cross-attention (``cross=True``) stores the
  projected encoder output as ``memory_key`` / ``memory_value`` when ``inputs_kv`` is given; later calls pass
  ``inputs_kv=None``, so the memory is projected once per sequence. With ``rotary`` or ``rope_theta`` (self-attention
  only), queries and keys are rotated by their ``positions`` (:mod:`~transformer_jax.modules.rotary`); the cache holds
  rotated keys.
  """

  num_heads: int
  num_kv_heads: int | None = None  # default: num_heads
  head_dim: int | None = None  # default: D // num_heads
  scale: float | None = None  # multiplies q k^T; default: 1 / sqrt(head_dim)
  qkv_bias: bool = True
  out_bias: bool = True
  fused_qkv: bool = False
  cross: bool = False  # keys/values come from a separate memory (the decoder's cross-attention); matters for caching
  dropout_rate: float = 0.0
  implementation: Implementation = None
  # Rotary positions: `rotary` in full, or `rope_theta` alone for the plain rotation with that base. Neither: the
  # inputs carry their positions.
  rotary: Rotary | None = None
  rope_theta: float | None = None
  # cached decoding sees only the newest this many slots (Mistral); without decode the caller's mask says so
  sliding_window: int | None = None
  check_mask: bool = True  # see dot_product_attention
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.xavier_uniform()

  @nn.compact
  def __call__(
    self,
    inputs_q,
    inputs_kv=None,
    mask=None,
    *,
    positions=None,
    bias=None,
    deterministic: bool = True,
    decode: bool = False,
  ):
    """``(B, T, D)`` queries, optional ``(B, S, D)`` keys/values -> ``(B, T, D)``. ``positions``: ``(B, T)`` position
    ids of the queries (and keys) for rotary attention; default ``0..T-1``, except in cached decoding. ``bias``:
    float, broadcastable to ``(B, H, T, S)``, added to the logits (in cached decoding ``S`` is the cache's slots)."""
    features = inputs_q.shape[-1]
    if self.head_dim is None and features % self.num_heads:
      raise ValueError(f'd_model={features} is not divisible by num_heads={self.num_heads}')
    head_dim = self.head_dim or features // self.num_heads
    kv_heads = self.num_kv_heads or self.num_heads
    if self.num_heads % kv_heads or (self.fused_qkv and kv_heads != self.num_heads):
      raise ValueError(
        f'num_kv_heads={kv_heads} must divide num_heads={self.num_heads} (and equal it with fused_qkv)'
      )
    if decode and inputs_kv is not None and not self.cross:
      raise ValueError(
        'cached decoding of attention over a separate memory needs MultiHeadAttention(cross=True)'
      )

    def dense(features, name, kernel_axes, axis=-1, use_bias=self.qkv_bias):
      return DenseGeneral(
        features,
        axis=axis,
        use_bias=use_bias,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=name,
        **dense_inits(self.kernel_init, kernel_axes, inputs=len(kernel_axes) - len(features)),
      )

    if self.fused_qkv:
      if inputs_kv is not None:
        raise ValueError(
          'fused_qkv projects one input; cross-attention needs separate query and key/value inputs'
        )
      qkv = dense((3, self.num_heads, head_dim), 'qkv', ('embed', None, 'heads', 'kv'))(
        inputs_q
      )  # (B, T, 3, H, K)
      query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:
      query = dense((self.num_heads, head_dim), 'query', HEAD_KERNEL)(inputs_q)  # (B, T, H, K)
      # Later decoding steps reuse the memory projected at the first.
      if self.cross and decode and inputs_kv is None:
        if not self.has_variable('cache', MEMORY_KEY):
          raise ValueError(
            'cached cross-attention needs inputs_kv (the encoder output) on its first call'
          )
        key = self.get_variable('cache', MEMORY_KEY)  # (B, S, G, K)
        value = self.get_variable('cache', MEMORY_VALUE)
      else:
        inputs_kv = inputs_q if inputs_kv is None else inputs_kv
        key = dense((kv_heads, head_dim), 'key', HEAD_KERNEL)(inputs_kv)  # (B, S, G, K)
        value = dense((kv_heads, head_dim), 'value', HEAD_KERNEL)(inputs_kv)  # (B, S, G, K)
    if self.rotary is not None or self.rope_theta is not None:
      query, key = self._rotate(query, key, positions, decode)
    if decode:
      key, value, mask = self._use_cache(key, value, mask)

    want_weights = self.is_mutable_collection('intermediates')
    use_dropout = self.dropout_rate > 0.0 and not deterministic
    result = dot_product_attention(
      query,
      key,
      value,
      mask,
      bias=bias,
      scale=self.scale,
      dropout_rate=self.dropout_rate,
      dropout_rng=self.make_rng('dropout') if use_dropout else None,
      deterministic=deterministic,
      return_weights=want_weights,
      implementation=self.implementation,
      check_mask=self.check_mask,
    )
    if want_weights:
      result, weights = result
      self.sow('intermediates', 'attention_weights', weights)
    out = dense((features,), 'out', ('heads', 'kv', 'embed'), axis=(-2, -1), use_bias=self.out_bias)
    return out(result)  # (B, T, D)

  def _rotate(self, query, key, positions, decode: bool):
    if self.cross:
      raise ValueError(
        'rotary positions apply to self-attention; cross-attention keys have positions of their own'
      )
    if positions is None:
      if decode:
        raise ValueError(
          'cached decoding with rotary positions needs the positions of the new tokens'
        )
      positions = jnp.arange(query.shape[1])[None]  # (1, T)
    rotary = self.rotary or Rotary(self.rope_theta)
    return rotary.apply(query, positions), rotary.apply(key, positions)

  def _use_cache(self, key, value, mask):
    """The keys, values ``(B, S, G, K)`` and mask to attend with in cached decoding (see the class docstring)."""
    if self.cross:
      self.put_variable('cache', MEMORY_KEY, key)
      self.put_variable('cache', MEMORY_VALUE, value)
      return key, value, mask
    cached_key = self.variable('cache', CACHED_KEY, jnp.zeros, key.shape, key.dtype)
    cached_value = self.variable('cache', CACHED_VALUE, jnp.zeros, value.shape, value.dtype)
    index = self.variable('cache', CACHE_INDEX, lambda: jnp.zeros((), jnp.int32))
    start, chunk, size = index.value, key.shape[1], cached_key.value.shape[1]
    cached_key.value = update_slice(cached_key.value, key, (0, start, 0, 0))
    cached_value.value = update_slice(cached_value.value, value, (0, start, 0, 0))
    index.value = start + chunk
    # Slots past the chunk hold zeros (or stale entries): causality with the chunk's offset hides them.
    return (
      cached_key.value,
      cached_value.value,
      masks.combine_masks(mask, masks.causal_mask(chunk, size, start, self.sliding_window)),
    )
