"""Orbax checkpoints of a run: the train state plus a JSON record of the step, data position and config.

``workdir/checkpoints/<step>/{state,meta}``. Orbax writes each checkpoint to a temporary directory and renames it
when complete, so a process killed mid-save leaves nothing that :meth:`Checkpoints.restore` would pick up; a
checkpoint that is complete on disk but unreadable (truncated, corrupted) is skipped with a warning in favour of the
previous one.
"""

from __future__ import annotations

import logging
import os

import jax
import orbax.checkpoint as ocp
from flax import traverse_util
from orbax.checkpoint import checkpoint_managers as policies

log = logging.getLogger('train')

# Fields a resumed run may change: how long it runs, how it reports and how it spreads over devices, never what it
# computes.
RESUMABLE_FIELDS = ('num_train_steps', 'log_every_steps', 'eval_every_steps', 'eval_batches',
                    'checkpoint_every_steps', 'keep_last', 'keep_best', 'compilation_cache_dir',
                    'skip_nonfinite_updates', 'sample', 'parallelism', 'mesh', 'distributed')


class ConfigMismatchError(ValueError):
  """The workdir holds checkpoints of a differently configured run."""


def config_differences(saved: dict, current: dict) -> list[str]:
  """``'field: checkpoint X, now Y'`` for every field that differs, except :data:`RESUMABLE_FIELDS`."""
  saved, current = (traverse_util.flatten_dict(c, sep='.') for c in (saved, current))
  resumable = lambda key: key.split('.')[0] in RESUMABLE_FIELDS  # noqa: E731
  return [f'{key}: checkpoint {saved.get(key)!r}, now {current.get(key)!r}'
          for key in sorted(set(saved) | set(current)) if not resumable(key) and saved.get(key) != current.get(key)]


class Checkpoints:
  """A ``CheckpointManager`` keeping the newest ``keep_last`` and the ``keep_best`` by validation ``metric``."""

  def __init__(self, workdir: str, keep_last: int, keep_best: int, metric: str, mode: str):
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    preservation = policies.AnyPreservationPolicy([
        policies.LatestN(n=keep_last),
        # Checkpoints saved between evaluations have no metrics; only LatestN keeps those.
        policies.BestN(get_metric_fn=lambda m: m[metric], reverse=mode == 'min', n=keep_best,
                       keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(preservation_policy=preservation, cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=('state', 'meta'))

  def save(self, step: int, state, meta: dict, metrics: dict | None = None) -> None:
    """Starts an asynchronous save; :meth:`close` waits for it."""
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)), metrics=metrics, force=True)

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_meta(self) -> dict | None:
    """The JSON record of the newest readable checkpoint, or ``None`` in a fresh workdir."""
    for step in reversed(self.steps()):
      try:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
      except Exception as e:  # noqa: BLE001  (any unreadable checkpoint is skipped the same way)
        log.warning('checkpoint %d in %s is unreadable (%s); trying an older one', step, self.directory, e)
    return None

  def check_config(self, config: dict) -> None:
    """Raises :class:`ConfigMismatchError` listing the fields that differ from the checkpointed run's."""
    meta = self.latest_meta()
    if meta is None:
      return
    differences = config_differences(meta['config'], config)
    if differences:
      raise ConfigMismatchError(
          f'{self.directory} holds checkpoints of a run with another config; use a new workdir, or restore these '
          'values:\n  ' + '\n  '.join(differences))

  def restore(self, state):
    """``(state, meta)`` from the newest checkpoint that restores onto ``state``'s structure, or ``(state, None)``.

    ``state`` may hold arrays or ``jax.ShapeDtypeStruct`` leaves; either way each is restored with that leaf's
    sharding, which need not be the one it was saved with (8 devices to 1, FSDP to data parallel, ...)."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    for step in reversed(self.steps()):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                      meta=ocp.args.JsonRestore()))
        return restored['state'], restored['meta']
      except Exception as e:  # noqa: BLE001
        log.warning('checkpoint %d in %s could not be restored (%s); using the previous one', step, self.directory,
                    str(e).splitlines()[0] if str(e) else type(e).__name__)
    return state, None

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
