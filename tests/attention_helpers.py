"""Operands, masks and shapes shared by the attention kernel's tests."""

import math

import jax
import jax.numpy as jnp

from transformer_jax.kernels import attention as fused

# (B, T, S, H, G, K): odd sizes; T > 64 crosses a query block; K = 20 leaves a vector tail; G < H is grouped-query
SHAPES = {
  'tiny': (2, 5, 7, 3, 3, 4),
  'grouped': (2, 70, 37, 6, 2, 20),
  'multi_query': (3, 9, 11, 4, 1, 16),
  'causal_long': (2, 130, 130, 3, 3, 64),
  # odd K, S and rows in the last block: the bf16 kernel's pairs end in a zero
  'odd_sizes': (2, 67, 9, 2, 1, 5),
  # a decoding step's few query rows take their own path (forward_rows), on the calling thread ...
  'one_row': (2, 1, 7, 3, 3, 4),
  'three_rows': (2, 3, 37, 6, 2, 20),
  # ... or, a long row, its keys cut into parts shared over the pool (H S K >= 2 x 2^17 a row)
  'one_row_long': (2, 1, 2100, 4, 2, 64),
}


def operands(b, t, s, h, g, k, dtype=jnp.float32, seed=0):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
  return (
    jax.random.normal(k1, (b, t, h, k)).astype(dtype),
    jax.random.normal(k2, (b, s, g, k)).astype(dtype),
    jax.random.normal(k3, (b, s, g, k)).astype(dtype),
    jax.random.normal(k4, (b, t, h, k)),
  )


def make_mask(kind, b, t, s, h):
  if kind == 'none':
    return None
  if kind == 'causal':  # (1, 1, T, S): broadcast over batch and heads
    return jnp.tril(jnp.ones((t, s), bool), s - t)[None, None]
  if kind == 'padding':  # (B, 1, 1, S), one sequence with no visible key at all
    lengths = jnp.array([s, 3, 0][:b])
    return (jnp.arange(s)[None] < lengths[:, None])[:, None, None, :]
  # per head and row, with one row fully masked
  return jax.random.bernoulli(jax.random.key(7), 0.6, (b, h, t, s)).at[0, 1, 2].set(False)


def kernel_attention(q, k, v, mask):
  b, t, h, d = q.shape
  return fused.attention(q, k, v, fused.kernel_mask(mask, b, h, t, k.shape[1]), 1 / math.sqrt(d))
