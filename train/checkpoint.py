"""Orbax checkpoints of a run: the train state plus a JSON record of the step, data position and config.

``workdir/checkpoints/<step>/{state,meta}``. Orbax writes each checkpoint to a temporary directory and renames it
when complete, so a process killed mid-save leaves nothing that :meth:`Checkpoints.restore` would pick up; a
checkpoint that is complete on disk but unreadable (truncated, corrupted) is skipped with a warning in favour of the
previous one. When none can be read, the run stops with an error instead of training afresh over them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util
from orbax.checkpoint import checkpoint_managers as policies

from train.errors import first_line
from transformer_jax.models import TransformerConfig

log = logging.getLogger('train')

# Fields a resumed run may change: how long it runs, how it reports and how it spreads over devices, never what it
# computes.
RESUMABLE_FIELDS = (
  'num_train_steps',
  'log_every_steps',
  'eval_every_steps',
  'eval_batches',
  'checkpoint_every_steps',
  'keep_last',
  'keep_best',
  'compilation_cache_dir',
  'skip_nonfinite_updates',
  'sample',
  'parallelism',
  'api',  # either API reads and writes the same checkpoints
  'mesh',
  'distributed',
)


class ConfigMismatchError(ValueError):
  """The workdir holds checkpoints of a differently configured run."""


class UnreadableCheckpointError(ValueError):
  """The workdir holds checkpoints and none of them can be read."""


# Fields with their defaults: architecture fields at the library's, run fields added since the first checkpoints
# at what they add nothing with. A checkpoint written before a field existed was built with what its default now
# gives, so a missing field matches its default.
_DEFAULTS = {
  # BlockConfig's and the encoder-decoder's own (only the current config's keys are filled in)
  **{f'model.{f.name}': f.default for f in dataclasses.fields(TransformerConfig)},
  'init_from': '',
  'param_lr': '',
  'data.metric': 'bleu',  # translation runs picked their best checkpoints by BLEU before it was a choice
  # runs before LoRA trained every weight
  **{'lora.rank': 0, 'lora.alpha': 16.0, 'lora.dropout': 0.0},
  **{'lora.targets': 'query|value|qkv', 'lora.train_also': ''},
}


def config_differences(saved: dict, current: dict) -> list[str]:
  """``'field: checkpoint X, now Y'`` for every field that differs, except :data:`RESUMABLE_FIELDS`."""
  saved, current = (traverse_util.flatten_dict(c, sep='.') for c in (saved, current))
  saved = {**{k: v for k, v in _DEFAULTS.items() if k in current}, **saved}
  resumable = lambda key: key.split('.')[0] in RESUMABLE_FIELDS  # noqa: E731
  return [
    f'{key}: checkpoint {saved.get(key)!r}, now {current.get(key)!r}'
    for key in sorted(set(saved) | set(current))
    if not resumable(key) and saved.get(key) != current.get(key)
  ]


def checkpoint_directory(workdir: str) -> str:
  return os.path.abspath(os.path.join(workdir, 'checkpoints'))


@contextlib.contextmanager
def _absl_errors_only():
  """Orbax warns through absl that a read-only manager's directory is read-only: true, and noise in a run log."""
  logger = logging.getLogger('absl')
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


class Checkpoints(contextlib.AbstractContextManager):
  """A ``CheckpointManager`` keeping the newest ``keep_last`` and the ``keep_best`` by validation ``metric``.

  :meth:`reader` opens one that only reads: it creates no directory and starts no background work, for looking at
  a workdir before a run is known to start (or for sampling from it). Close either kind (or use it as a context
  manager) on every path: a writer runs background threads that must not outlive it.
  """

  def __init__(
    self,
    workdir: str,
    keep_last: int = 1,
    keep_best: int = 0,
    metric: str = 'loss',
    mode: str = 'min',
    read_only: bool = False,
  ):
    self.directory = checkpoint_directory(workdir)
    if read_only:
      options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    else:
      preservation = policies.AnyPreservationPolicy(
        [
          policies.LatestN(n=keep_last),
          # Checkpoints saved between evaluations have no metrics; only LatestN keeps those.
          policies.BestN(
            get_metric_fn=lambda m: m[metric],
            reverse=mode == 'min',
            n=keep_best,
            keep_checkpoints_without_metrics=False,
          ),
        ]
      )
      options = ocp.CheckpointManagerOptions(
        preservation_policy=preservation, cleanup_tmp_directories=True
      )
    with _absl_errors_only():
      self.manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=('state', 'meta')
      )

  @classmethod
  def reader(cls, workdir: str) -> 'Checkpoints':
    return cls(workdir, read_only=True)

  def save(self, step: int, state, meta: dict, metrics: dict | None = None) -> None:
    """Starts an asynchronous save; :meth:`close` waits for it."""
    self.manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
      metrics=metrics,
      force=True,
    )

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def _unreadable(self, errors: dict) -> UnreadableCheckpointError:
    listed = '; '.join(f'step {step}: {error}' for step, error in errors.items())
    return UnreadableCheckpointError(
      f'no checkpoint in {self.directory} can be read ({listed}); move that directory away to start afresh, or '
      'give another --workdir'
    )

  def _newest(self, read, failure: str, steps: list[int] | None = None):
    """``read(step)`` of the newest of ``steps`` (default: all) that it succeeds on; ``None`` when there is no
    checkpoint. Each failure is logged (``failure`` says what went wrong); when all fail, raises
    :class:`UnreadableCheckpointError`."""
    errors = {}
    for step in reversed(self.steps() if steps is None else steps):
      try:
        return read(step)
      except Exception as e:  # noqa: BLE001  (any unreadable checkpoint is skipped the same way)
        errors[step] = first_line(e)
        log.warning(
          'checkpoint %d in %s %s (%s); trying an older one',
          step,
          self.directory,
          failure,
          errors[step],
        )
    if errors:
      raise self._unreadable(errors)
    return None

  def latest_meta(self) -> dict | None:
    """The JSON record of the newest readable checkpoint; ``None`` when there is none. Raises
    :class:`UnreadableCheckpointError` when there are checkpoints and none is readable."""
    args = ocp.args.Composite(meta=ocp.args.JsonRestore())
    return self._newest(lambda step: self.manager.restore(step, args=args)['meta'], 'is unreadable')

  def restore(self, state, step: int | None = None):
    """``(state, meta)`` from the newest checkpoint (or the one of ``step``) that restores onto ``state``'s
    structure, or ``(state, None)`` when there is no checkpoint. Raises :class:`UnreadableCheckpointError` when none
    of those there restores, ``ValueError`` when there is no checkpoint of ``step``.

    ``state`` may hold arrays or ``jax.ShapeDtypeStruct`` leaves; either way each is restored with that leaf's
    sharding, which need not be the one it was saved with (8 devices to 1, FSDP to data parallel, ...)."""
    if step is not None and step not in self.steps():
      raise ValueError(
        f'no checkpoint of step {step} in {self.directory}; the saved steps are {self.steps()}'
      )
    args = ocp.args.Composite(
      state=ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, state)),
      meta=ocp.args.JsonRestore(),
    )
    restored = self._newest(
      lambda at: self.manager.restore(at, args=args),
      'could not be restored',
      None if step is None else [step],
    )
    return (state, None) if restored is None else (restored['state'], restored['meta'])

  def saved_params(self) -> dict | None:
    """The parameters of the newest readable checkpoint as numpy arrays, read as saved (no optimizer or model
    needed), for starting another run from them; ``None`` when there is no checkpoint."""
    # one device of this process, whatever layout the checkpoint was saved under
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    args = ocp.args.Composite(state=ocp.args.StandardRestore(fallback_sharding=device))
    params = self._newest(
      lambda step: self.manager.restore(step, args=args)['state']['params'], 'is unreadable'
    )
    return None if params is None else jax.tree.map(np.asarray, params)

  def close(self) -> None:
    # close() waits for saves but not for the clean-up of unfinished checkpoints that the manager starts when it
    # opens; a thread of it still running at interpreter exit prints a traceback.
    cleanup = getattr(self.manager, '_cleanup_tmp_directory_future', None)
    if cleanup is not None:
      cleanup.result()
    self.manager.wait_until_finished()
    self.manager.close()

  def __exit__(self, *exc):
    self.close()


def check_resumable(workdir: str, config: dict) -> None:
  """Before a run writes anything: raises :class:`ConfigMismatchError` listing the fields that differ from the
  checkpointed run's, or :class:`UnreadableCheckpointError`. Nothing is created; a fresh workdir passes."""
  if not os.path.isdir(checkpoint_directory(workdir)):
    return
  with Checkpoints.reader(workdir) as checkpoints:
    meta = checkpoints.latest_meta()
  if meta is None:
    return
  differences = config_differences(meta['config'], config)
  if differences:
    raise ConfigMismatchError(
      f'{checkpoints.directory} holds checkpoints of a run with another config; use a new workdir, or restore '
      'these values:\n  ' + '\n  '.join(differences)
    )
