"""Layer normalisation and RMS normalisation, with float32 statistics."""

from __future__ import annotations

from typing import Any, Literal

import flax.linen as nn
import jax.numpy as jnp

from transformer_jax.kernels import norm as norm_kernel
from transformer_jax.sharding import Module

NormVariant = Literal['standard', 'unbiased_std']


class LayerNorm(Module):
  """LayerNorm over the last axis; statistics are always computed in float32.

  ``variant='standard'`` is ``(x - mean) / sqrt(var + eps)`` with the biased variance (``torch.nn.LayerNorm``, Flax,
  GPT-2, BERT). ``variant='unbiased_std'`` is ``(x - mean) / (std + eps)`` with the unbiased std: what the
  hand-written PyTorch LayerNorm of the course this project grew from computes (see the README), kept so that its
  models convert to identical numbers. ``'seed'`` is the old name of ``'unbiased_std'``.
  """

  epsilon: float = 1e-5
  variant: NormVariant = 'standard'
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """``(..., D) -> (..., D)`` in ``dtype``."""
    features = x.shape[-1]
    if self.variant not in ('standard', 'unbiased_std', 'seed'):
      raise ValueError(
        f"unknown LayerNorm variant {self.variant!r}; expected 'standard' or 'unbiased_std'"
      )
    unbiased = self.variant != 'standard'
    if unbiased and features < 2:
      raise ValueError('the unbiased-std LayerNorm needs at least 2 features')
    scale = self.param('scale', _features(nn.initializers.ones), (features,), self.param_dtype)
    bias = (
      self.param('bias', _features(nn.initializers.zeros), (features,), self.param_dtype)
      if self.use_bias
      else None
    )
    if norm_kernel.applies(x, self.dtype):
      kind = 'unbiased_std' if unbiased else 'standard'
      return norm_kernel.normalize(x, scale, bias, epsilon=self.epsilon, kind=kind)
    x32 = x.astype(jnp.float32)
    centred = x32 - x32.mean(-1, keepdims=True)
    if unbiased:
      std = jnp.sqrt(jnp.sum(centred**2, -1, keepdims=True) / (features - 1))
      y = centred / (std + self.epsilon)
    else:
      y = centred * jnp.reciprocal(jnp.sqrt(jnp.mean(centred**2, -1, keepdims=True) + self.epsilon))
    y = y * scale.astype(jnp.float32)
    if bias is not None:
      y = y + bias.astype(jnp.float32)
    return y.astype(self.dtype)


class RMSNorm(Module):
  """Root-mean-square normalisation (Zhang & Sennrich 2019): ``x / sqrt(mean(x^2) + eps) * scale``, no centring and
  no bias (T5, Llama, Mistral, Qwen2). Statistics and the scaling are float32.

  ``scale_plus_one``: the scale is stored as an offset from 1 and applied as ``(1 + scale)`` (Gemma), so it
  initialises to zeros.
  """

  epsilon: float = 1e-6
  scale_plus_one: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """``(..., D) -> (..., D)`` in ``dtype``."""
    init = nn.initializers.zeros if self.scale_plus_one else nn.initializers.ones
    scale = self.param('scale', _features(init), (x.shape[-1],), self.param_dtype)
    scale = scale.astype(jnp.float32)
    scale = 1.0 + scale if self.scale_plus_one else scale
    if norm_kernel.applies(x, self.dtype):
      return norm_kernel.normalize(x, scale, None, epsilon=self.epsilon, kind='rms')
    x32 = x.astype(jnp.float32)
    y = x32 * jnp.reciprocal(jnp.sqrt(jnp.mean(x32**2, -1, keepdims=True) + self.epsilon))
    return (y * scale).astype(self.dtype)


def _features(init):
  """A ``(D,)`` norm parameter, split like the residual stream's features."""
  return nn.with_logical_partitioning(init, ('embed',))


def make_norm(config, name: str | None = None) -> nn.Module:
  """The norm a :class:`~transformer_jax.BlockConfig` asks for (``norm_type``, ``norm_eps``, ...)."""
  common = dict(
    epsilon=config.norm_eps, dtype=config.compute_dtype, param_dtype=config.weight_dtype, name=name
  )
  if config.norm_type == 'rms_norm':
    return RMSNorm(scale_plus_one=config.norm_scale_plus_one, **common)
  return LayerNorm(variant=config.norm_variant, use_bias=config.use_bias, **common)
