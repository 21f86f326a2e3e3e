"""Position-wise feed-forward networks, plain or gated."""

from __future__ import annotations

from typing import Any, Callable, Literal

import flax.linen as nn
import jax.numpy as jnp

from transformer_jax.activations import ACTIVATIONS, activate
from transformer_jax.modules.dense import Dense
from transformer_jax.sharding import Module, dense_inits

Activation = Literal['relu', 'gelu', 'gelu_tanh', 'silu']


class FeedForward(Module):
  """``(B, T, D) -> (B, T, D)`` through ``F`` hidden units.

  Plain: ``act(x W_in + b_in) W_out + b_out`` (``fc_in``, ``fc_out``). Gated (Shazeer 2020, "GLU Variants Improve
  Transformer"): ``(act(x W_gate) * (x W_in)) W_out`` with a third projection ``fc_gate``; SwiGLU with ``'silu'``
  (Llama's ``gate_proj``/``up_proj``/``down_proj``), GeGLU with ``'gelu'``/``'gelu_tanh'`` (T5 v1.1's ``wi_0``/
  ``wi_1``/``wo``).
  """

  hidden_dim: int
  activation: Activation = 'relu'
  gated: bool = False
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.xavier_uniform()

  @nn.compact
  def __call__(self, x):
    if self.activation not in ACTIVATIONS:
      raise ValueError(
        f'unknown activation {self.activation!r}; expected one of {sorted(ACTIVATIONS)}'
      )

    # Hidden units split over the tensor axis.
    def dense(features, name, kernel_axes):
      return Dense(
        features,
        use_bias=self.use_bias,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=name,
        **dense_inits(self.kernel_init, kernel_axes),
      )

    # The activation (and gate) in float32, rounded to the compute dtype once (activations.activate).
    h = dense(self.hidden_dim, 'fc_in', ('embed', 'mlp'))(x)  # (B, T, F)
    if self.gated:
      gate = dense(self.hidden_dim, 'fc_gate', ('embed', 'mlp'))(x)
      h = activate(self.activation, gate, h)
    else:
      h = activate(self.activation, h)
    return dense(x.shape[-1], 'fc_out', ('mlp', 'embed'))(h)  # (B, T, D)
