"""``config.api='nnx'``: the run trains the NNX model (:mod:`transformer_jax.nnx`) with an ``nnx.Optimizer`` and an
``nnx.jit`` step, on the same data, mesh, schedule and checkpoints as the Linen path, and to the same losses.

The state on the devices is an :class:`NNXTrainState` (the model, its optimizer, the dropout key and the non-finite
counters). What checkpoints, evaluation hooks and samples see is the canonical :class:`~train.steps.TrainState`
built from the same arrays (no copy), so a checkpoint written by either API resumes under the other.

The step is :func:`train.steps.train_step_fn` written the NNX way: the gradient of the split model (``nnx.split``,
``nnx.merge``) in a scan over the micro-batches, then ``optimizer.update(model, grads)``: the same arithmetic in the
same order, so the losses and parameters equal the Linen run's. Dropout draws the Linen step's keys: micro-batch
``i`` of step ``s`` takes draw ``i`` of an ``nnx.Rngs`` stream seeded with ``fold_in(rng, s)``, which is
``fold_in(fold_in(rng, s), i)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import transformer_jax.nnx as tnnx
from train.parallel import MeshLayout
from train.steps import (
  TrainState,
  accumulated_gradient,
  step_metrics,
  update_outcome,
  where_tree,
)

API = ('linen', 'nnx')


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def _assign(variables, values) -> None:
  """Sets each ``nnx.Variable`` of the tree ``variables`` to the leaf of ``values`` in the same place (same leaf
  order and shapes: an optimizer state laid out by optax over an NNX state or over a params dict)."""
  targets = jax.tree.leaves(variables, is_leaf=_is_variable)
  leaves = jax.tree.leaves(values)
  if len(targets) != len(leaves) or any(t.shape != jnp.shape(v) for t, v in zip(targets, leaves)):
    raise ValueError(
      f'an optimizer state of {len(leaves)} arrays does not fit this optimizer ({len(targets)} arrays)'
    )
  for target, value in zip(targets, leaves):
    target.set_value(value)


def initialised_on_arrays(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """``tx`` whose ``init`` sees the parameters as plain arrays. ``nnx.Optimizer`` initialises from a tree of
  ``nnx.Variable`` objects but updates from arrays; a mask or a label function (weight decay on kernels, ``param_lr``'s
  groups) must see one tree both times, or ``optax.masked`` and ``multi_transform`` lay out their state twice."""
  return optax.GradientTransformation(lambda params: tx.init(nnx.as_pure(params)), tx.update)


class NNXTrainState(nnx.Module):
  """The device side of an NNX run: ``model`` (a :class:`transformer_jax.nnx.Model`), ``optimizer`` (an
  ``nnx.Optimizer`` whose ``step`` counts the steps taken, skipped ones included, as ``TrainState.step`` does), the
  base dropout key ``rng`` and the counters ``nonfinite_step`` and ``skipped`` (see
  :class:`~train.steps.TrainState`)."""

  def __init__(self, state: TrainState, linen_model, tx: optax.GradientTransformation):
    self.model = tnnx.from_linen(linen_model, state.params)  # holds the state's arrays
    # the optimizer's fresh state is abstract: only the state's arrays are ever placed on the devices
    self.optimizer = nnx.eval_shape(
      lambda: nnx.Optimizer(self.model, initialised_on_arrays(tx), wrt=nnx.Param)
    )
    _assign(self.optimizer.opt_state, state.opt_state)
    self.optimizer.step.set_value(state.step.astype(jnp.uint32))
    self.rng = nnx.Variable(state.rng)
    self.nonfinite_step = nnx.Variable(state.nonfinite_step)
    self.skipped = nnx.Variable(state.skipped)

  def train_state(self, opt_structure) -> TrainState:
    """The canonical state of the same arrays; ``opt_structure``: the tree structure of the Linen optimizer state
    (optax's over a params dict), whose leaves come in the order of this optimizer's."""
    return TrainState(
      step=self.optimizer.step[...].astype(jnp.int32),
      params=tnnx.to_linen(self.model)[1],
      opt_state=jax.tree.unflatten(
        opt_structure, jax.tree.leaves(nnx.as_pure(self.optimizer.opt_state))
      ),
      rng=self.rng[...],
      nonfinite_step=self.nonfinite_step[...],
      skipped=self.skipped[...],
    )


def train_step_fn(task, schedule, label_smoothing: float, skip_nonfinite: bool):
  """``(state, batch) -> metrics``, updating the :class:`NNXTrainState` in place: the NNX form of
  :func:`train.steps.train_step_fn`, sharing its accumulation, non-finite handling and metrics."""

  def train_step(state: NNXTrainState, batch: dict):
    step = state.optimizer.step[...]
    step_key = jax.random.fold_in(state.rng[...], step)
    graphdef, params, rest = nnx.split(state.model, nnx.Param, ...)

    def micro_grads(params, micro, index):
      def loss_fn(params):  # a functional view of the model, as a scan body needs
        model = nnx.merge(graphdef, params, rest)
        rngs = nnx.Rngs(dropout=step_key)
        rngs.dropout.count[...] = index.astype(jnp.uint32)  # this micro-batch's draw: the Linen key
        sums = task.loss_sums(
          model, micro, rngs, deterministic=False, label_smoothing=label_smoothing
        )
        return sums['loss'], sums

      return jax.grad(loss_fn, has_aux=True)(params)

    grads, sums, weight, grad_norm = accumulated_gradient(micro_grads, params, batch)
    before = nnx.as_pure((nnx.state(state.model, nnx.Param), state.optimizer.opt_state))
    state.optimizer.update(state.model, grads)
    apply, nonfinite_step, not_finite = update_outcome(
      sums, grad_norm, step.astype(jnp.int32), state.nonfinite_step[...], skip_nonfinite
    )
    after = nnx.as_pure((nnx.state(state.model, nnx.Param), state.optimizer.opt_state))
    _assign(
      (nnx.state(state.model, nnx.Param), state.optimizer.opt_state),
      where_tree(apply, after, before),
    )
    state.nonfinite_step[...] = nonfinite_step
    state.skipped[...] += not_finite.astype(jnp.int32)
    return step_metrics(sums, weight, grad_norm, schedule(step))

  return train_step


def eval_step_fn(task):
  """``(model, batch, frozen=None) -> sums``: :func:`train.steps.eval_step_fn` on the NNX model."""

  def eval_step(model, batch, frozen=None):
    return task.loss_sums(model, batch, None, deterministic=True)

  return eval_step


class NNXLayout(MeshLayout):
  """``parallelism='jit'`` for the NNX model: the parameters laid out over the mesh by the logical axes their
  ``nnx.Param``\\ s carry (``nnx.get_partition_spec``), the optimizer state like its parameters, the steps under
  ``nnx.jit``. Batches are placed as in :class:`~train.parallel.MeshLayout`."""

  def __init__(self, config, abstract_state, task, tx: optax.GradientTransformation):
    self.linen_model, self.tx = task.model, tx
    self.opt_structure = jax.tree.structure(abstract_state.opt_state)
    abstract_model = nnx.eval_shape(
      lambda: tnnx.from_linen(task.model, task.init_params(jax.random.key(0)))
    )
    super().__init__(config, abstract_state, tnnx.logical_axes(abstract_model))

  def describe(self) -> str:
    return 'nnx ' + super().describe()

  def to_device(self, state: TrainState) -> NNXTrainState:
    return NNXTrainState(state, self.linen_model, self.tx)

  def canonical(self, state):
    return state.train_state(self.opt_structure) if isinstance(state, NNXTrainState) else state

  def counter(self, state: NNXTrainState, name: str) -> int:
    return int(getattr(state, name)[...])

  def eval_inputs(self, state: NNXTrainState) -> tuple:
    return state.model, None

  def compile_train(self, step_fn):
    step = nnx.jit(step_fn, donate_argnums=0)

    def train_step(state, batch):
      with jax.set_mesh(self.mesh):
        metrics = step(state, self._global(self.micro_sharding, self._micro(batch)))
      return state, metrics

    return train_step

  def compile_eval(self, eval_fn):
    return self._in_mesh(nnx.jit(eval_fn))
