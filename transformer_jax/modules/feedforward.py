"""Position-wise feed-forward network."""

from __future__ import annotations

from typing import Any, Callable, Literal

import flax.linen as nn
import jax.numpy as jnp

from transformer_jax.activations import ACTIVATIONS

Activation = Literal['relu', 'gelu', 'gelu_tanh']


class FeedForward(nn.Module):
  """``FFN(x) = act(x W1 + b1) W2 + b2``: ``(B, T, D) -> (B, T, D)`` through ``F`` hidden units."""

  hidden_dim: int
  activation: Activation = 'relu'
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.xavier_uniform()

  @nn.compact
  def __call__(self, x):
    if self.activation not in ACTIVATIONS:
      raise ValueError(f'unknown activation {self.activation!r}; expected one of {sorted(ACTIVATIONS)}')
    dense = lambda n, name: nn.Dense(n, use_bias=self.use_bias, dtype=self.dtype,  # noqa: E731
                                     param_dtype=self.param_dtype, kernel_init=self.kernel_init, name=name)
    h = ACTIVATIONS[self.activation](dense(self.hidden_dim, 'fc_in')(x))  # (B, T, F)
    return dense(x.shape[-1], 'fc_out')(h)  # (B, T, D)
