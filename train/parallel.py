"""How a run spreads over devices and processes: the layout of the state and of every batch, and the compiled steps.

``config.parallelism`` picks one of two strategies:

- ``'jit'`` (the default): one program over a ``('data', 'fsdp', 'tensor')`` mesh sized by ``config.mesh``. The
  parameters and the optimizer state are sharded by the logical-axis rules of :mod:`transformer_jax.sharding` (FSDP
  splits them over ``fsdp``, tensor parallelism splits heads, FFN units and the vocabulary over ``tensor``), every
  batch is split over ``data`` x ``fsdp``, and XLA inserts the collectives. Any mix of the three runs the same code.
- ``'pmap'``: the older per-device map, data parallel only: the state is replicated on every device and gradients are
  summed with ``psum``. JAX keeps ``pmap`` in maintenance (it now runs on ``shard_map``); it is here for code and
  habits that come from it.

Either way each process builds only its own rows of the global batch (``process_rows``), and the canonical state
(what checkpoints hold) is a set of global arrays, so a checkpoint restores under any other layout or device count.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from train.adapters import settings
from transformer_jax import lora
from transformer_jax.sharding import (
  DEFAULT_RULES,
  batch_sharding,
  data_parallel_size,
  make_mesh,
  param_shardings,
)

log = logging.getLogger('train')

STRATEGIES = ('jit', 'pmap')
PMAP_AXIS = 'batch'


def _path_keys(path) -> tuple:
  return tuple(getattr(k, 'key', getattr(k, 'name', k)) for k in path)


def _same_paths(axes, tree):
  """The entries of the ``axes`` tree at the paths of ``tree`` (a part of the parameters)."""
  flat = traverse_util.flatten_dict(axes)
  return traverse_util.unflatten_dict({k: flat[k] for k in traverse_util.flatten_dict(tree)})


def state_shardings(abstract_state, param_axes, mesh: Mesh, rules=DEFAULT_RULES, adapted=False):
  """Shardings of a whole :class:`~train.steps.TrainState`: parameters by their logical axes (``param_axes``, a tree
  like the parameters), and every optimizer
  leaf that mirrors a parameter (Adam's moments: the path ends in that parameter's path, with its shape) like that
  parameter, so FSDP splits the optimizer state too. Counters, keys and step numbers are replicated."""
  replicated = NamedSharding(mesh, P())

  def laid_out(tree):  # model parameters, or a part of them (LoRA's frozen and fully trained ones)
    return param_shardings(tree, _same_paths(param_axes, tree), mesh, rules)

  frozen = laid_out(abstract_state.frozen)
  if adapted:  # LoRA (see train.adapters): the small adapters are replicated
    trained = abstract_state.params
    params = {
      lora.COLLECTION: jax.tree.map(lambda _: replicated, trained[lora.COLLECTION]),
      'params': laid_out(trained['params']),
    }
  else:
    params = laid_out(abstract_state.params)
  by_path = {
    _path_keys(path): (sharding, leaf.shape)
    for (path, sharding), leaf in zip(
      jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(abstract_state.params)
    )
  }

  def opt_leaf(path, leaf):
    keys = _path_keys(path)
    for start in range(len(keys)):
      match = by_path.get(keys[start:])
      if match is not None and match[1] == leaf.shape:
        return match[0]
    return replicated

  return abstract_state.replace(
    step=replicated,
    params=params,
    frozen=frozen,
    rng=replicated,
    nonfinite_step=replicated,
    skipped=replicated,
    opt_state=jax.tree_util.tree_map_with_path(opt_leaf, abstract_state.opt_state),
  )


def _local_block(sharding, shape: tuple, axis: int) -> tuple[int, int]:
  """The contiguous ``[start, stop)`` of ``axis`` that this process's devices hold under ``sharding``."""
  spans = {
    (s[axis].start or 0, shape[axis] if s[axis].stop is None else s[axis].stop)
    for s in sharding.addressable_devices_indices_map(shape).values()
  }
  start, stop = min(a for a, _ in spans), max(b for _, b in spans)
  if sum(b - a for a, b in spans) != stop - start:
    raise ValueError(
      f'the batch rows of process {jax.process_index()} are not contiguous under {sharding}; '
      'order the mesh so each process holds one block of the data axes'
    )
  return start, stop


def micro_batch_rows(micro_batches: int, micro_size: int, start: int, stop: int) -> np.ndarray:
  """Global row numbers of ``[start, stop)`` of every micro-batch, micro-batch after micro-batch."""
  return (np.arange(micro_batches)[:, None] * micro_size + np.arange(start, stop)).reshape(-1)


class Layout:
  """What both strategies share: the batch geometry (which rows of every batch this process feeds), the restore
  target, the sharded initialisation and the placement of the fixed evaluation batches.

  ``micro_sharding`` lays out the ``(A, B / A, ...)`` training micro-batches, ``eval_sharding`` the ``(B, ...)``
  evaluation batches; this process's rows are the block of the batch axis its devices hold under them."""

  # the named device axis the steps reduce over, when they run per device
  axis_name: str | None = None

  def __init__(
    self, config, mesh: Mesh, data_devices: int, state_shardings, micro_sharding, eval_sharding
  ):
    self.mesh, self.state_shardings = mesh, state_shardings
    self.micro_sharding, self.eval_sharding = micro_sharding, eval_sharding
    self.replicated = NamedSharding(mesh, P())
    self.micro_batches = config.grad_accum_steps
    self.micro_size = config.batch_size // config.grad_accum_steps
    if self.micro_size % data_devices:
      raise ValueError(
        f'batch_size={config.batch_size} / grad_accum_steps={config.grad_accum_steps} = '
        f'{self.micro_size} sequences per micro-batch do not divide across the {data_devices} '
        f'data-parallel devices ({self.describe()})'
      )
    start, stop = _local_block(micro_sharding, (self.micro_batches, self.micro_size), 1)
    self.train_rows = micro_batch_rows(self.micro_batches, self.micro_size, start, stop)
    self.eval_rows = np.arange(*_local_block(eval_sharding, (config.batch_size,), 0))

  def abstract_state(self, abstract):
    """Checkpoint restore target: shapes and dtypes with this layout's shardings."""
    return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract,
      self.state_shardings,
    )

  def init_state(self, create):
    """A fresh canonical state, each array created where its sharding puts it."""
    return jax.jit(create, out_shardings=self.state_shardings)()

  def counter(self, state, name: str) -> int:
    """A scalar of the state (``skipped``, ``nonfinite_step``) on the host: one small transfer."""
    return int(self.canonical(getattr(state, name)))

  def eval_inputs(self, state) -> tuple:
    """What the eval step takes beside a batch: the params and LoRA's frozen ones (``None`` without LoRA)."""
    return state.params, state.frozen or None

  def place_eval(self, batch: dict) -> dict:
    """A fixed ``(B, ...)`` evaluation batch on the devices, once for the whole run: this process's rows only."""
    return self._global(
      self.eval_sharding, self._eval_local({k: v[self.eval_rows] for k, v in batch.items()})
    )

  def _eval_local(self, rows: dict) -> dict:
    """This process's evaluation rows in the layout of ``eval_sharding`` (as they are, by default)."""
    return rows

  @staticmethod
  def _global(sharding, local: dict) -> dict:
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


class MeshLayout(Layout):
  """``parallelism='jit'``: the state sharded over a ``('data', 'fsdp', 'tensor')`` mesh, global batch arrays."""

  def __init__(self, config, abstract_state, param_axes):
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    batch = batch_sharding(mesh)
    # (A, B / A, ...): each micro-batch split over the data axes
    micro = NamedSharding(mesh, P(None, *batch.spec))
    super().__init__(
      config,
      mesh,
      data_parallel_size(mesh),
      state_shardings(abstract_state, param_axes, mesh, adapted=settings(config) is not None),
      micro,
      batch,
    )

  def describe(self) -> str:
    return f'jit over mesh {dict(self.mesh.shape)} ({jax.device_count()} devices, {jax.process_count()} processes)'

  def to_device(self, state):
    """The canonical state as the train step takes it (here: already is)."""
    return state

  def canonical(self, state):
    """The device state as checkpoints and samples take it (here: already is)."""
    return state

  def compile_train(self, step_fn):
    step = jax.jit(
      step_fn,
      in_shardings=(self.state_shardings, self.micro_sharding),
      out_shardings=(self.state_shardings, self.replicated),
      donate_argnums=(0,),
    )
    return self._in_mesh(
      lambda state, batch: step(state, self._global(self.micro_sharding, self._micro(batch)))
    )

  def compile_eval(self, eval_fn):
    """``(params, placed batch) -> sums``; batches come from :meth:`place_eval`."""
    return self._in_mesh(
      jax.jit(
        eval_fn,
        in_shardings=(
          self.state_shardings.params,
          self.eval_sharding,
          self.state_shardings.frozen or None,
        ),
        out_shardings=self.replicated,
      )
    )

  def _in_mesh(self, fn):
    """``fn`` run with the mesh in context, so the models' activation constraints
    (:func:`~transformer_jax.sharding.shard_activation`) apply when it traces."""

    def call(*args):
      with jax.set_mesh(self.mesh):
        return fn(*args)

    return call

  def _micro(self, batch: dict) -> dict:
    """This process's rows (``train_rows`` order) -> ``(A, rows / A, ...)``."""
    return {k: v.reshape((self.micro_batches, -1) + v.shape[1:]) for k, v in batch.items()}


class PmapLayout(Layout):
  """``parallelism='pmap'``: the state replicated per device (a leading device axis), batches split per device."""

  axis_name = PMAP_AXIS

  def __init__(self, config, abstract_state):
    if config.mesh.fsdp != 1 or config.mesh.tensor != 1:
      raise ValueError(
        f'parallelism=pmap is data parallel only; it cannot use mesh.fsdp={config.mesh.fsdp} or '
        f'mesh.tensor={config.mesh.tensor} (use parallelism=jit)'
      )
    if config.mesh.data not in (None, -1, jax.device_count()):
      raise ValueError(
        f'parallelism=pmap runs on all {jax.device_count()} devices; mesh.data={config.mesh.data} '
        'must be unset, -1 or that number'
      )
    mesh = Mesh(np.array(jax.devices()), (PMAP_AXIS,))  # pmap's own device order
    replicated = NamedSharding(mesh, P())
    # pmap's arrays carry a leading device axis: one slice per device.
    self.per_device = NamedSharding(mesh, P(PMAP_AXIS))
    super().__init__(
      config,
      mesh,
      jax.device_count(),
      jax.tree.map(lambda _: replicated, abstract_state),
      NamedSharding(mesh, P(None, PMAP_AXIS)),
      self.per_device,
    )
    copies = jax.device_count()
    self._replicate = jax.jit(
      lambda s: jax.tree.map(lambda x: jnp.broadcast_to(x, (copies,) + x.shape), s),
      out_shardings=self.per_device,
    )
    self._first = jax.jit(lambda s: jax.tree.map(lambda x: x[0], s), out_shardings=self.replicated)

  def describe(self) -> str:
    return f'pmap over {jax.device_count()} devices ({jax.process_count()} processes)'

  def to_device(self, state):
    return self._replicate(state)

  def canonical(self, state):
    return self._first(state)

  def compile_train(self, step_fn):
    step = jax.pmap(step_fn, axis_name=PMAP_AXIS, donate_argnums=(0,))

    def train_step(state, batch):
      # Local rows (train_rows order) -> (local devices, A, rows per device, ...).
      local = {
        k: np.swapaxes(
          v.reshape((self.micro_batches, jax.local_device_count(), -1) + v.shape[1:]), 0, 1
        )
        for k, v in batch.items()
      }
      state, metrics = step(state, local)
      return state, self._first(metrics)

    return train_step

  def compile_eval(self, eval_fn):
    """``(params, placed batch) -> sums``; batches come from :meth:`place_eval`."""
    step = jax.pmap(eval_fn, axis_name=PMAP_AXIS)
    return lambda params, batch, frozen=None: self._first(step(params, batch, frozen))

  def _eval_local(self, rows: dict) -> dict:
    return {k: v.reshape((jax.local_device_count(), -1) + v.shape[1:]) for k, v in rows.items()}


def make_layout(config, abstract_state, param_axes):
  """The layout ``config.parallelism`` names, checked against the devices and the batch; ``param_axes``: the logical
  axes of the parameters (a mesh lays them out by these; pmap replicates)."""
  if config.parallelism not in STRATEGIES:
    raise ValueError(f'parallelism must be one of {STRATEGIES}, got {config.parallelism!r}')
  if config.parallelism == 'jit':
    return MeshLayout(config, abstract_state, param_axes)
  return PmapLayout(config, abstract_state)
