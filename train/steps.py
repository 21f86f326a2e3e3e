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


def where_tree(keep_new, new, old):
  return jax.tree.map(lambda a, b: jnp.where(keep_new, a, b), new, old)


def accumulated_gradient(micro_grads, params, batch: dict, axis_name: str | None = None):
  """``(grads, sums, weight, grad_norm)`` of the ``(A, B / A, ...)`` micro-batches: ``micro_grads(params, micro,
  index) -> (grads, sums)`` (gradients of the *summed* loss) added over them in order (and across ``axis_name``),
  then divided once by the total weight (non-padding tokens), which is exactly the gradient of the whole batch's mean
  loss, however the padding falls."""

  def accumulate(carry, xs):
    micro, index = xs
    return jax.tree.map(jnp.add, carry, micro_grads(params, micro, index)), None

  zeros = (jax.tree.map(jnp.zeros_like, params), {k: jnp.float32(0) for k in SUM_KEYS})
  count = jax.tree.leaves(batch)[0].shape[0]
  (grads, sums), _ = jax.lax.scan(accumulate, zeros, (batch, jnp.arange(count)))
  if axis_name is not None:
    grads, sums = jax.lax.psum((grads, sums), axis_name)
  weight = jnp.maximum(sums['weight'], 1.0)
  grads = jax.tree.map(lambda g: g / weight, grads)
  return grads, sums, weight, optax.tree.norm(grads)


def update_outcome(sums, grad_norm, step, nonfinite_step, skip_nonfinite: bool):
  """``(apply, nonfinite_step, not_finite)``: whether this step's update may reach the parameters (a non-finite one
  never does; in stop mode, none after the first non-finite one), the first non-finite step so far, and whether this
  one was not finite (for the ``skipped`` count)."""
  finite = jnp.isfinite(sums['loss']) & jnp.isfinite(grad_norm)
  apply = finite if skip_nonfinite else finite & (nonfinite_step < 0)
  first = jnp.where(~finite & (nonfinite_step < 0), step, nonfinite_step)
  return apply, first, ~finite


def step_metrics(sums, weight, grad_norm, learning_rate) -> dict:
  return {
    'loss': sums['loss'] / weight,
    'accuracy': sums['correct'] / weight,
    'grad_norm': grad_norm,
    'learning_rate': learning_rate,
  }


def train_step_fn(
  task,
  optimizer,
  schedule,
  label_smoothing: float,
  skip_nonfinite: bool,
  axis_name: str | None = None,
):
  """The pure ``(state, batch) -> (state, metrics)``, for :mod:`train.parallel` to compile under a mesh or ``pmap``.

  The batch holds ``(A, B / A, ...)`` micro-batches (:func:`accumulated_gradient`). A non-finite loss or gradient
  never reaches the parameters: with ``skip_nonfinite`` that update is skipped; otherwise the state freezes at its
  last good values and records the step in ``nonfinite_step`` for the host to report (no host round trip inside the
  step).

  Under ``pmap`` (``axis_name`` given) each device holds a slice of every micro-batch: the gradient and loss sums
  are added across devices before the division, so the update equals the one-device update, and dropout draws
  differ per device. Under ``jit`` the batch is one global array and XLA inserts the reductions itself.
  """

  def train_step(state: TrainState, batch: dict):
    rng = jax.random.fold_in(state.rng, state.step)
    if axis_name is not None:
      rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    frozen = None if task.lora is None else state.frozen

    def micro_grads(params, micro, index):
      def loss_fn(p):
        options = dict(deterministic=False, label_smoothing=label_smoothing, frozen=frozen)
        sums = task.loss_sums(p, micro, jax.random.fold_in(rng, index), **options)
        return sums['loss'], sums

      return jax.grad(loss_fn, has_aux=True)(params)

    grads, sums, weight, grad_norm = accumulated_gradient(
      micro_grads, state.params, batch, axis_name
    )
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    apply, nonfinite_step, not_finite = update_outcome(
      sums, grad_norm, state.step, state.nonfinite_step, skip_nonfinite
    )
    new_state = state.replace(
      step=state.step + 1,
      params=where_tree(apply, params, state.params),
      opt_state=where_tree(apply, opt_state, state.opt_state),
      nonfinite_step=nonfinite_step,
      skipped=state.skipped + not_finite.astype(jnp.int32),
    )
    return new_state, step_metrics(sums, weight, grad_norm, schedule(state.step))

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
