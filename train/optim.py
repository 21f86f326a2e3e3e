"""Learning-rate schedules and the AdamW optimizer with a weight-decay mask, gradient clipping and per-parameter
learning rates (``param_lr``)."""

from __future__ import annotations

import functools
import re

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
  """True for the leaves weight decay applies to: matrix kernels and LoRA's two factors. Biases, norm scales and
  embedding tables (token, position, segment) are left alone, as in BERT and GPT-2 training."""
  return jax.tree_util.tree_map_with_path(
    lambda path, _: getattr(path[-1], 'key', None) in ('kernel', 'lora_a', 'lora_b'), params
  )


def parse_param_lr(text: str) -> list[tuple[str, float]]:
  """``'PATTERN=LR,PATTERN=LR'`` (the ``param_lr`` field) -> ``[(pattern, lr)]``, in order; ``''`` -> ``[]``."""
  rules = []
  for entry in filter(None, (part.strip() for part in text.split(','))):
    pattern, _, value = entry.rpartition('=')
    try:
      re.compile(pattern)
      lr = float(value)
    except (re.error, ValueError):
      lr = -1.0
    if not pattern or not lr >= 0:
      raise ValueError(
        f'param_lr entry {entry!r} is not PATTERN=LR (a regular expression over parameter paths and a '
        "learning rate >= 0), e.g. param_lr='classifier=1e-3,bert/encoder/layers_0=0'"
      )
    rules.append((pattern, lr))
  return rules


def param_groups(params, rules: list[tuple[str, float]]):
  """The tree of group labels for ``multi_transform``: the index (as a string) of the first rule whose pattern
  matches the start of a parameter's path in whole parts (``classifier`` covers ``classifier/kernel``, not
  ``classifier2/kernel``), else ``'default'``. A pattern that matches no parameter is an error: it is a typo."""
  paths = {}
  for path, _ in jax.tree_util.tree_leaves_with_path(params):
    paths[path] = '/'.join(str(getattr(k, 'key', k)) for k in path)
  compiled = [re.compile(f'(?:{pattern})(?:/|$)') for pattern, _ in rules]
  labels = {
    path: next((str(i) for i, c in enumerate(compiled) if c.match(name)), 'default')
    for path, name in paths.items()
  }
  unused = [pattern for i, (pattern, _) in enumerate(rules) if str(i) not in labels.values()]
  if unused:
    examples = ', '.join(list(paths.values())[:3])
    raise ValueError(
      f'param_lr pattern {unused[0]!r} matches no parameter; paths look like {examples}, ...'
    )
  return jax.tree_util.tree_map_with_path(lambda path, _: labels[path], params)


def make_optimizer(config) -> tuple[optax.GradientTransformation, callable]:
  """Global-norm clipping, then AdamW with the schedule; returns ``(optimizer, schedule)``.

  With ``param_lr``, each pattern's parameters get their own AdamW whose schedule is the main one scaled to that
  peak, or none at all at 0 (frozen: their gradients count for nothing, clipping included, and they keep no
  moments).
  """
  schedule = make_schedule(
    config.learning_rate,
    config.warmup_steps,
    config.decay_steps or config.num_train_steps,
    config.lr_schedule,
    config.end_lr_ratio,
  )

  def adamw(learning_rate):
    return optax.adamw(
      learning_rate,
      b1=config.adam_b1,
      b2=config.adam_b2,
      eps=config.adam_eps,
      weight_decay=config.weight_decay,
      mask=decay_mask,
    )

  chain = [optax.clip_by_global_norm(config.grad_clip_norm)] if config.grad_clip_norm > 0 else []
  rules = parse_param_lr(config.get('param_lr', ''))
  if not rules:
    return optax.chain(*chain, adamw(schedule)), schedule
  groups = {'default': adamw(schedule)}
  for i, (_, lr) in enumerate(rules):
    scale = lr / config.learning_rate
    groups[str(i)] = (
      adamw(lambda count, scale=scale: scale * schedule(count)) if lr else optax.set_to_zero()
    )
  labels = functools.partial(param_groups, rules=rules)
  frozen = {str(i) for i, (_, lr) in enumerate(rules) if not lr}
  is_frozen = lambda params: jax.tree.map(lambda label: label in frozen, labels(params))  # noqa: E731
  if frozen:
    chain.insert(0, optax.masked(optax.set_to_zero(), is_frozen))
  return optax.chain(*chain, optax.multi_transform(groups, labels)), schedule
