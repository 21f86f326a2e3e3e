"""T5's relative position bias (Raffel et al. 2020, section 2.1): a learned scalar per head and per bucket of the
key-minus-query distance, added to the attention logits. Exact buckets for small distances, logarithmic ones up to
``max_distance``; bidirectional (the encoder) or causal (the decoder, where keys after the query share one bucket).
In T5 the first layer of each stack holds the table and every layer adds the same bias."""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from transformer_jax.sharding import Module


def relative_position_buckets(
  relative_position, *, bidirectional: bool, num_buckets: int = 32, max_distance: int = 128
):
  """Integer ``key - query`` distances (any shape) -> bucket ids in ``[0, num_buckets)``, as Hugging Face's
  ``T5Attention._relative_position_bucket``."""
  buckets = jnp.zeros_like(relative_position)
  if bidirectional:
    num_buckets //= 2
    # keys after the query
    buckets = buckets + (relative_position > 0).astype(relative_position.dtype) * num_buckets
    distance = jnp.abs(relative_position)
  else:
    distance = -jnp.minimum(relative_position, 0)  # keys after the query all fall in bucket 0
  max_exact = num_buckets // 2
  # Distances from max_exact to max_distance share num_buckets - max_exact logarithmic buckets; jnp.maximum keeps the
  # log finite where the exact branch is taken anyway.
  log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact) / math.log(
    max_distance / max_exact
  )
  large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(relative_position.dtype)
  large = jnp.minimum(large, num_buckets - 1)
  return buckets + jnp.where(distance < max_exact, distance, large)


class RelativePositionBias(Module):
  """``(T, S)`` query and key lengths -> ``(1, H, T, S)`` float32 logit bias. Parameter: ``embedding``
  ``(num_buckets, H)`` (Hugging Face's ``relative_attention_bias.weight``)."""

  num_heads: int
  bidirectional: bool
  num_buckets: int = 32
  max_distance: int = 128
  param_dtype: Any = jnp.float32
  embedding_init: Callable = nn.initializers.normal(stddev=1.0)

  @nn.compact
  def __call__(self, q_len: int, kv_len: int, offset=0):
    """``offset``: the position of the first query (cached decoding continues at the cache index)."""
    # (buckets, H): heads follow attention's split
    init = nn.with_logical_partitioning(self.embedding_init, (None, 'heads'))
    table = self.param('embedding', init, (self.num_buckets, self.num_heads), self.param_dtype)
    relative = jnp.arange(kv_len)[None, :] - (jnp.arange(q_len)[:, None] + offset)  # (T, S)
    buckets = relative_position_buckets(
      relative,
      bidirectional=self.bidirectional,
      num_buckets=self.num_buckets,
      max_distance=self.max_distance,
    )
    bias = jnp.take(table.astype(jnp.float32), buckets, axis=0)  # (T, S, H)
    return jnp.transpose(bias, (2, 0, 1))[None]  # (1, H, T, S)
