"""Layer normalisation with float32 statistics."""

from __future__ import annotations

from typing import Any, Literal

import flax.linen as nn
import jax.numpy as jnp

NormVariant = Literal['standard', 'seed']


class LayerNorm(nn.Module):
  """LayerNorm over the last axis; statistics are always computed in float32.

  ``variant='standard'`` is ``(x - mean) / sqrt(var + eps)`` with the biased variance (``torch.nn.LayerNorm``, Flax,
  GPT-2, BERT). ``variant='seed'`` is ``(x - mean) / (std + eps)`` with the unbiased std, which is what the course's
  hand-written PyTorch LayerNorm computes; it exists only so that converted seed models give identical numbers.
  """

  epsilon: float = 1e-5
  variant: NormVariant = 'standard'
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """``(..., D) -> (..., D)`` in ``dtype``."""
    features = x.shape[-1]
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    centred = x32 - mean
    if self.variant == 'standard':
      y = centred * jnp.reciprocal(jnp.sqrt(jnp.mean(centred**2, -1, keepdims=True) + self.epsilon))
    elif self.variant == 'seed':
      if features < 2:
        raise ValueError('the seed LayerNorm uses the unbiased std and needs at least 2 features')
      std = jnp.sqrt(jnp.sum(centred**2, -1, keepdims=True) / (features - 1))
      y = centred / (std + self.epsilon)
    else:
      raise ValueError(f"unknown LayerNorm variant {self.variant!r}; expected 'standard' or 'seed'")
    scale = self.param('scale', nn.initializers.ones, (features,), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (features,), self.param_dtype)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(self.dtype)
