"""Training an NNX model: optax AdamW with linear warmup and cosine decay, gradient clipping, weight decay on the
kernels only, and one ``nnx.jit`` step that updates the model and the optimizer in place.

    model = transformer_jax.nnx.GPT(config, rngs=nnx.Rngs(params=0, dropout=1))
    optimizer = make_optimizer(model, peak_lr=3e-4, warmup_steps=100, total_steps=5000)
    for ids in batches:                                  # (B, T + 1) token ids
      loss = train_step(model, optimizer, {'ids': ids})  # float32 scalar

Dropout draws from the model's own ``dropout`` stream (its ``default`` one without), a new key every step.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def decay_mask(params):
  """True for the kernels: biases, norm scales and embedding tables take no weight decay (GPT-2's, BERT's recipe).
  ``params``: Linen params or an NNX state (whose leaves sit one ``value`` below their parameter's name)."""

  def is_kernel(path, _):
    names = [key.key for key in path if isinstance(key, jax.tree_util.DictKey)]
    return names[-1] == 'kernel'

  return jax.tree_util.tree_map_with_path(is_kernel, params)


def adamw_warmup_cosine(
  peak_lr: float,
  warmup_steps: int,
  total_steps: int,
  *,
  end_ratio: float = 0.1,
  weight_decay: float = 0.1,
  b1: float = 0.9,
  b2: float = 0.95,
  clip_norm: float | None = 1.0,
) -> optax.GradientTransformation:
  """Clipping to ``clip_norm`` (``None``: none), then AdamW at a rate rising linearly from 0 to ``peak_lr`` over
  ``warmup_steps`` and falling along half a cosine to ``end_ratio * peak_lr`` at ``total_steps`` (warmup included)."""
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, peak_lr, warmup_steps, total_steps, end_value=end_ratio * peak_lr
  )
  adamw = optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask)
  return adamw if clip_norm is None else optax.chain(optax.clip_by_global_norm(clip_norm), adamw)


def make_optimizer(model: nnx.Module, **schedule) -> nnx.Optimizer:
  """``nnx.Optimizer`` over the model's ``nnx.Param``\\ s with :func:`adamw_warmup_cosine` (``schedule``: its
  arguments)."""
  return nnx.Optimizer(model, adamw_warmup_cosine(**schedule), wrt=nnx.Param)


def causal_lm_loss(model: nnx.Module, ids, weights=None, *, deterministic: bool = False):
  """Mean next-token cross-entropy of ``(B, T + 1)`` ids: the logits of ``ids[:, :-1]`` against ``ids[:, 1:]``.
  ``weights``: ``(B, T)``, 0 for targets that do not count (padding); default all 1."""
  logits = model(ids[:, :-1], deterministic=deterministic)  # (B, T, V) float32
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:])  # (B, T)
  weights = jnp.ones_like(losses) if weights is None else weights
  return (losses * weights).sum() / jnp.maximum(weights.sum(), 1.0)


@functools.partial(nnx.jit, static_argnames='loss_fn')
def train_step(
  model: nnx.Module, optimizer: nnx.Optimizer, batch: dict, loss_fn: Callable = causal_lm_loss
):
  """One step on ``batch`` (the keyword arguments of ``loss_fn(model, **batch)``): the model's params and the
  optimizer's state are updated in place; returns the loss before the update."""
  loss, grads = nnx.value_and_grad(lambda model: loss_fn(model, **batch))(model)
  optimizer.update(model, grads)
  return loss
