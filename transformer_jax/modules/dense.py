"""``Dense`` and ``DenseGeneral``: Flax's layers (same parameters, initialisation, attributes and interceptors), with
the product and the bias add done together by :func:`transformer_jax.modules.dot.dense_product`, and a kernel
narrower than the compute dtype passed as stored (:func:`~transformer_jax.modules.dot.keep_narrow_kernel`).

Flax adds the bias after ``dot_general`` returns, so a ``dot_general`` of our own could not reach it; on the CPU in
bf16 the bias gradient then cost a float32 copy of every output gradient and a tree of reductions (12% of a GPT
step). Here the bf16 path adds the bias in float32 inside the product and sums its gradient with the few-row kernel.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from flax.core import meta

from transformer_jax.modules.dot import dense_product, keep_narrow_kernel


def _reshaped_init(init, flat_shape, shape):
  """``init`` called on ``flat_shape`` (so fan-in and fan-out are the flattened ones, as in Flax), reshaped."""

  def wrapped(rng, _shape, dtype=jnp.float32):
    value = init(rng, flat_shape, dtype)
    if isinstance(value, meta.AxisMetadata):
      return meta.replace_boxed(value, jnp.reshape(value.unbox(), shape))
    return jnp.reshape(value, shape)

  return wrapped


class Dense(nn.Dense):
  """``flax.linen.Dense`` over the last dimension (see the module docstring). ``result_dtype``: the product's
  dtype when not the compute dtype's (float32 logits from bf16 operands)."""

  result_dtype: Any = None
  promote_dtype: Any = keep_narrow_kernel

  @nn.compact
  def __call__(self, inputs):
    shape = (jnp.shape(inputs)[-1], self.features)
    kernel = self.param('kernel', self.kernel_init, shape, self.param_dtype)
    bias = (
      self.param('bias', self.bias_init, (self.features,), self.param_dtype)
      if self.use_bias
      else None
    )
    inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    dims = (((inputs.ndim - 1,), (0,)), ((), ()))
    return dense_product(inputs, kernel, bias, dims, self.precision, self.result_dtype)


class DenseGeneral(nn.DenseGeneral):
  """``flax.linen.DenseGeneral`` over the ``axis`` dimensions, without ``batch_dims`` (see the module docstring)."""

  promote_dtype: Any = keep_narrow_kernel

  @nn.compact
  def __call__(self, inputs):
    if self.batch_dims:
      raise ValueError('DenseGeneral takes no batch_dims here; use flax.linen.DenseGeneral')
    features = (
      tuple(self.features) if isinstance(self.features, (tuple, list)) else (self.features,)
    )
    axes = tuple(self.axis) if isinstance(self.axis, (tuple, list)) else (self.axis,)
    axes = tuple(a % inputs.ndim for a in axes)
    contracted = tuple(inputs.shape[a] for a in axes)
    kernel_shape = contracted + features
    flat = (math.prod(contracted), math.prod(features))
    kernel = self.param(
      'kernel', _reshaped_init(self.kernel_init, flat, kernel_shape), kernel_shape, self.param_dtype
    )
    bias = None
    if self.use_bias:
      init = _reshaped_init(self.bias_init, flat[1:], features)
      bias = self.param('bias', init, features, self.param_dtype)
    inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    dims = ((axes, tuple(range(len(axes)))), ((), ()))
    return dense_product(inputs, kernel, bias, dims, self.precision)
