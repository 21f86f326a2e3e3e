"""Learning-rate schedules and the AdamW optimizer with a weight-decay mask and gradient clipping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ('cosine', 'linear', 'constant', 'rsqrt')


def make_schedule(
  peak: float, warmup_steps: int, decay_steps: int, kind: str, end_ratio: float = 0.0
):
  """Linear warmup from 0 to ``peak`` over ``warmup_steps``, then ``kind`` decay:

  - ``cosine``: half a cosine from ``peak`` to ``end_ratio * peak`` at step ``decay_steps`` (the total, warmup
    included), flat after;
  - ``linear``: a straight line between the same points;
  - ``constant``: ``peak`` forever;
  - ``rsqrt``: ``peak * sqrt(warmup_steps / step)``, the original Transformer's ("Noam") schedule.
  """
  if kind not in SCHEDULES:
    raise ValueError(f'unknown lr_schedule {kind!r}; expected one of {SCHEDULES}')
  after = max(decay_steps - warmup_steps, 1)
  if kind == 'cosine':
    decay = optax.cosine_decay_schedule(peak, after, alpha=end_ratio)
  elif kind == 'linear':
    decay = optax.linear_schedule(peak, peak * end_ratio, after)
  elif kind == 'constant':
    decay = optax.constant_schedule(peak)
  else:
    warm = max(warmup_steps, 1)
    decay = lambda count: peak * jnp.sqrt(warm / jnp.maximum(count + warm, warm))  # noqa: E731  (count from the peak)
  if warmup_steps == 0:
    return decay
  return optax.join_schedules(
    [optax.linear_schedule(0.0, peak, warmup_steps), decay], [warmup_steps]
  )


def decay_mask(params):
  """True for the leaves weight decay applies to: matrix kernels. Biases, norm scales and embedding tables (token,
  position, segment) are left alone, as in BERT and GPT-2 training."""
  return jax.tree_util.tree_map_with_path(
    lambda path, _: getattr(path[-1], 'key', None) == 'kernel', params
  )


def make_optimizer(config) -> tuple[optax.GradientTransformation, callable]:
  """Global-norm clipping, then AdamW with the schedule; returns ``(optimizer, schedule)``."""
  schedule = make_schedule(
    config.learning_rate,
    config.warmup_steps,
    config.decay_steps or config.num_train_steps,
    config.lr_schedule,
    config.end_lr_ratio,
  )
  adamw = optax.adamw(
    schedule,
    b1=config.adam_b1,
    b2=config.adam_b2,
    eps=config.adam_eps,
    weight_decay=config.weight_decay,
    mask=decay_mask,
  )
  chain = [optax.clip_by_global_norm(config.grad_clip_norm)] if config.grad_clip_norm > 0 else []
  return optax.chain(*chain, adamw), schedule
