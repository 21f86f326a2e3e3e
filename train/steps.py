"""The train state and the compiled train and eval steps."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

SUM_KEYS = ('loss', 'nll', 'correct', 'weight')


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs on the device side (the data position is the step)."""

  step: jax.Array  # optimizer steps taken (int32)
  params: Any  # what trains: every parameter, or with LoRA the adapters (see train.adapters)
  opt_state: Any
  rng: jax.Array  # base dropout key (raw uint32); step s uses fold_in(rng, s), so the draws do not depend on history
  nonfinite_step: jax.Array  # first step whose loss or gradient was not finite, -1 while none was
  skipped: jax.Array  # updates skipped because they were not finite
  # with LoRA, the parameters that do not train (no gradients, no moments; not checkpointed); else {}
  frozen: Any = dataclasses.field(default_factory=dict)


def create_state(task, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
  init_key, dropout_key = jax.random.split(jax.random.PRNGKey(seed))
  params, frozen = task.init_params(init_key), {}
  if task.lora is not None:
    frozen, params = task.lora_split(params, jax.random.fold_in(init_key, 1))
  return TrainState(
    step=jnp.int32(0),
    params=params,
    opt_state=optimizer.init(params),
    rng=dropout_key,
    nonfinite_step=jnp.int32(-1),
    skipped=jnp.int32(0),
    frozen=frozen,
  )


def _where_tree(keep_new, new, old):
  return jax.tree.map(lambda a, b: jnp.where(keep_new, a, b), new, old)


def train_step_fn(
  task,
  optimizer,
  schedule,
  label_smoothing: float,
  skip_nonfinite: bool,
  axis_name: str | None = None,
):
  """The pure ``(state, batch) -> (state, metrics)``, for :mod:`train.parallel` to compile under a mesh or ``pmap``.

  The batch holds ``(A, B / A, ...)`` micro-batches. Gradients of the *summed* loss are accumulated over them and
  divided once by the total weight (non-padding tokens), which is exactly the gradient of the whole batch's mean
  loss, however the padding falls. A non-finite loss or gradient never reaches the parameters: with
  ``skip_nonfinite`` that update is skipped; otherwise the state freezes at its last good values and records the
  step in ``nonfinite_step`` for the host to report (no host round trip inside the step).

  Under ``pmap`` (``axis_name`` given) each device holds a slice of every micro-batch: the gradient and loss sums
  are added across devices before the division, so the update equals the one-device update, and dropout draws
  differ per device. Under ``jit`` the batch is one global array and XLA inserts the reductions itself.
  """

  def micro_step(params, frozen, micro, rng):
    def loss_fn(p):
      options = dict(deterministic=False, label_smoothing=label_smoothing, frozen=frozen)
      sums = task.loss_sums(p, micro, rng, **options)
      return sums['loss'], sums

    return jax.grad(loss_fn, has_aux=True)(params)

  def train_step(state: TrainState, batch: dict):
    rng = jax.random.fold_in(state.rng, state.step)
    if axis_name is not None:
      rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))

    def accumulate(carry, xs):
      micro, index = xs
      frozen = None if task.lora is None else state.frozen
      grads, sums = micro_step(state.params, frozen, micro, jax.random.fold_in(rng, index))
      return jax.tree.map(jnp.add, carry, (grads, sums)), None

    zeros = (jax.tree.map(jnp.zeros_like, state.params), {k: jnp.float32(0) for k in SUM_KEYS})
    count = jax.tree.leaves(batch)[0].shape[0]
    (grads, sums), _ = jax.lax.scan(accumulate, zeros, (batch, jnp.arange(count)))
    if axis_name is not None:
      grads, sums = jax.lax.psum((grads, sums), axis_name)
    weight = jnp.maximum(sums['weight'], 1.0)
    grads = jax.tree.map(lambda g: g / weight, grads)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    finite = jnp.isfinite(sums['loss']) & jnp.isfinite(grad_norm)
    apply = finite if skip_nonfinite else finite & (state.nonfinite_step < 0)
    new_state = state.replace(
      step=state.step + 1,
      params=_where_tree(apply, params, state.params),
      opt_state=_where_tree(apply, opt_state, state.opt_state),
      nonfinite_step=jnp.where(
        ~finite & (state.nonfinite_step < 0), state.step, state.nonfinite_step
      ),
      skipped=state.skipped + (~finite).astype(jnp.int32),
    )
    metrics = {
      'loss': sums['loss'] / weight,
      'accuracy': sums['correct'] / weight,
      'grad_norm': grad_norm,
      'learning_rate': schedule(state.step),
    }
    return new_state, metrics

  return train_step


def eval_step_fn(task, axis_name: str | None = None):
  """The pure ``(params, batch, frozen) -> sums`` of the unsmoothed loss, hits and weight (added across
  ``axis_name``); ``frozen``: a LoRA run's frozen parameters (``None`` otherwise)."""

  def eval_step(params, batch, frozen=None):
    sums = task.loss_sums(params, batch, None, deterministic=True, frozen=frozen)
    return sums if axis_name is None else jax.lax.psum(sums, axis_name)

  return eval_step


def evaluate(eval_step, params, batches: list[dict], token_level: bool, frozen=None) -> dict:
  """Loss (nats per token or example), accuracy and, for token tasks, perplexity over ``batches``. Sums stay on the
  device until the end: one transfer per evaluation."""
  totals = None
  for batch in batches:
    sums = eval_step(params, batch, frozen)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  weight = max(float(totals['weight']), 1.0)
  metrics = {'loss': float(totals['nll']) / weight, 'accuracy': float(totals['correct']) / weight}
  if token_level:
    metrics['perplexity'] = float(np.exp(min(metrics['loss'], 50.0)))
  return metrics
