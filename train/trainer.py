"""``train_and_evaluate(config, workdir)``: the whole training run, in small steps.

Order of work: check the config, check it against any checkpoint in the workdir, read the data (every input error
surfaces here, before anything compiles), build or restore the state, loop, save, summarise.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import time

import jax
import numpy as np
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from train import adapters, nnx_training
from train.checkpoint import Checkpoints, check_resumable
from train.errors import RunStopped
from train.metrics import MetricWriter
from train.optim import SCHEDULES, make_optimizer
from train.parallel import make_layout
from train.processes import host_copy, initialize_distributed, is_primary, primary_first
from train.steps import create_state, eval_step_fn, evaluate, train_step_fn
from train.summary import closing_lines
from train.tasks import TASKS, build_task
from train.vocab import KINDS

log = logging.getLogger('train')


class NonFiniteError(RunStopped):
  """A non-finite loss or gradient with ``skip_nonfinite_updates=False``."""


def check_config(config) -> None:
  """Raises ``ValueError`` naming every impossible value (the model's own fields are checked by its config class)."""
  problems = []
  if config.task not in TASKS:
    problems.append(f'task must be one of {sorted(TASKS)}, got {config.task!r}')
  for name in (
    'batch_size',
    'grad_accum_steps',
    'num_train_steps',
    'log_every_steps',
    'eval_every_steps',
    'checkpoint_every_steps',
    'keep_last',
  ):
    if not isinstance(config[name], int) or config[name] < 1:
      problems.append(f'{name} must be a positive integer, got {config[name]!r}')
  if not problems and config.batch_size % config.grad_accum_steps:
    problems.append(
      f'batch_size={config.batch_size} is not divisible by grad_accum_steps={config.grad_accum_steps}'
    )
  for name in ('warmup_steps', 'decay_steps', 'keep_best', 'eval_batches'):
    if config[name] < 0:
      problems.append(f'{name} must be >= 0, got {config[name]}')
  if not config.learning_rate > 0:
    problems.append(f'learning_rate must be positive, got {config.learning_rate}')
  if not 0 <= config.label_smoothing < 1:
    problems.append(f'label_smoothing must lie in [0, 1), got {config.label_smoothing}')
  if config.get('api', 'linen') not in nnx_training.API:
    problems.append(f'api must be one of {nnx_training.API}, got {config.api!r}')
  elif config.get('api') == 'nnx':
    if config.parallelism != 'jit':
      problems.append(
        f'api=nnx trains under parallelism=jit, got parallelism={config.parallelism!r}'
      )
    if config.lora.get('rank', 0):
      problems.append('api=nnx does not train LoRA adapters yet: use api=linen with lora.rank > 0')
  if config.lr_schedule not in SCHEDULES:
    problems.append(f'lr_schedule must be one of {SCHEDULES}, got {config.lr_schedule!r}')
  if not 0 < config.data.get('val_fraction', 0.5) < 1:
    problems.append(f'data.val_fraction must lie in (0, 1), got {config.data.val_fraction}')
  for name in ('vocab', 'target_vocab'):
    if config.data.get(name, 'char') not in KINDS:
      problems.append(f'data.{name} must be one of {KINDS}, got {config.data[name]!r}')
  try:
    adapters.settings(config)
  except ValueError as e:
    problems.append(str(e).replace('invalid LoRA config', 'lora'))
  if problems:
    raise ValueError('invalid config: ' + '; '.join(problems))


def setup_logging() -> None:
  """Progress lines of the ``train`` logger to stderr (once; warnings only from processes other than 0), and the
  libraries' per-save chatter (Orbax logs every file it writes at INFO) down to warnings."""
  for library in ('absl', 'jax'):  # e.g. jax's note that it found no TPU, on every CPU run
    logging.getLogger(library).setLevel(logging.WARNING)
  if not log.handlers:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter('%(asctime)s %(message)s', '%H:%M:%S'))
    log.addHandler(handler)
    log.propagate = False
  log.setLevel(logging.INFO if is_primary() else logging.WARNING)


def enable_compilation_cache(path: str) -> None:
  """JAX's persistent cache: a re-run (or a resumed run) skips compiling. Private to this user: cached programs run
  as code."""
  cache_root = os.environ.get('XDG_CACHE_HOME', os.path.join(os.path.expanduser('~'), '.cache'))
  path = path or os.path.join(cache_root, 'transformer_jax', 'jax')
  os.makedirs(path, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', path)


class StopSignals(contextlib.AbstractContextManager):
  """Turns SIGTERM (preemption) and SIGINT (Ctrl-C) into a flag the loop checks between steps, so the run saves a
  checkpoint and returns instead of dying mid-step. A second signal of the same kind is handled by the default."""

  def __init__(self):
    self.received = None
    self._previous = {}

  def _handle(self, signum, frame):
    self.received = signal.Signals(signum).name
    signal.signal(signum, self._previous[signum])
    log.warning('%s received: saving a checkpoint after this step, then stopping', self.received)

  def __enter__(self):
    for signum in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[signum] = signal.signal(signum, self._handle)
      except ValueError:  # not the main thread (e.g. a notebook worker): signals stay as they are
        pass
    return self

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)


def _due(step: int, every: int, last_step: int) -> bool:
  return step % every == 0 or step == last_step


class Run:
  """One training run's moving parts, so the loop functions take one argument instead of ten.

  Everything that can fail on a user's input (the config against the workdir's checkpoints, the data, the model
  config, the device layout) is checked before the first file is written; then the task's files and
  ``config.json`` are saved and the checkpoint manager opens. A failed start leaves the workdir as it was.
  """

  def __init__(self, config, workdir: str):
    self.config, self.workdir = config, workdir
    check_resumable(workdir, config.to_dict())
    self.task, optimizer, schedule, create, self.layout = primary_first(self._prepare, 'data')
    # fixed: placed once
    self.eval_data = [self.layout.place_eval(batch) for batch in self.task.eval_batches()]
    if config.get('api') == 'nnx':
      train_step = nnx_training.train_step_fn(
        self.task, schedule, config.label_smoothing, config.skip_nonfinite_updates
      )
      eval_step = nnx_training.eval_step_fn(self.task)
    else:
      train_step = train_step_fn(
        self.task,
        optimizer,
        schedule,
        config.label_smoothing,
        config.skip_nonfinite_updates,
        self.layout.axis_name,
      )
      eval_step = eval_step_fn(self.task, self.layout.axis_name)
    self.train_step = self.layout.compile_train(train_step)
    self.eval_step = self.layout.compile_eval(eval_step)
    self.checkpoints = Checkpoints(
      workdir, config.keep_last, config.keep_best, self.task.metric, self.task.metric_mode
    )
    try:
      abstract = self.layout.abstract_state(jax.eval_shape(create))
      saved, meta = self.checkpoints.restore(adapters.saved_part(abstract))
      # a fresh start; from init_from, the pretrained weights (never on a resume, except LoRA's frozen ones, which
      # checkpoints leave out)
      if meta is None:
        state = self._fresh_state(create)
      else:
        frozen = {} if self.task.lora is None else self._fresh_state(create).frozen
        state = adapters.restored(saved, frozen)
      self.state = self.layout.to_device(state)
    except BaseException:  # the manager's background threads must not outlive a failed start
      self.checkpoints.close()
      raise
    self.start_step = 0 if meta is None else meta['step']
    self.last_eval: dict = {}
    self.last_train: dict = {}
    self.trained_tokens, self.train_seconds = 0, 0.0  # this invocation's, for the closing tokens/s

  def _fresh_state(self, create):
    """A new state on the devices, its model parameters from ``init_from`` when the run has one."""
    state = self.layout.init_state(create)
    if self.task.lora is None:
      return state.replace(params=self.task.start_params(state.params))
    return adapters.with_base(state, self.task.start_params(adapters.base_params(state)))

  def _prepare(self):
    """The task, optimizer, state constructor and device layout, checked; then (on process 0) the task's files and
    the config saved."""
    optimizer, schedule = make_optimizer(self.config)
    task = build_task(self.config, self.workdir)
    create = functools.partial(create_state, task, optimizer, self.config.seed)
    abstract = jax.eval_shape(create)
    if self.config.get('api') == 'nnx':
      layout = nnx_training.NNXLayout(self.config, abstract, task, optimizer)
    else:
      layout = make_layout(self.config, abstract, task.param_axes())
    if is_primary():
      task.save()
      write_config(self.config, self.workdir)
    return task, optimizer, schedule, create, layout

  def canonical_state(self):
    """The state in global arrays (one copy), whatever the layout."""
    return self.layout.canonical(self.state)

  def full_params(self):
    """The model's plain parameters on the host (LoRA's adapters merged into their kernels)."""
    return host_copy(adapters.full_params(self.canonical_state(), self.task.lora))

  def meta(self, step: int) -> dict:
    """The JSON record saved beside the state."""
    meta = {
      'step': step,
      'examples_seen': step * self.config.batch_size,
      'config': self.config.to_dict(),
    }
    if self.task.lora is not None:  # what the frozen weights are rebuilt from
      meta['lora_base'] = self.config.init_from or f'random init of seed {self.config.seed}'
    return meta

  def check_finite(self) -> None:
    """In stop mode, raises :class:`NonFiniteError` once any update was not finite (one small transfer)."""
    bad = self.layout.counter(self.state, 'nonfinite_step')
    if bad >= 0 and not self.config.skip_nonfinite_updates:
      steps = self.checkpoints.steps()
      kept = (
        f'the last good checkpoint is step {steps[-1]} in {self.checkpoints.directory}'
        if steps
        else 'no checkpoint was saved'
      )
      raise NonFiniteError(
        f'non-finite loss or gradient at step {bad}: stopping ({kept}); set '
        'skip_nonfinite_updates=True to skip such updates instead'
      )

  def save(self, step: int, metrics: dict | None) -> None:
    self.check_finite()
    state = adapters.saved_part(self.canonical_state())
    self.checkpoints.save(step, state, self.meta(step), metrics)


def log_train(
  run: Run, writer: MetricWriter, step: int, pending: list, tokens: int, started: float, bar
) -> None:
  """Averages the metrics of the steps since the last log (one transfer), writes them and updates the bar."""
  # waits for the queued steps, so the clock below covers their work
  history = jax.device_get(pending)
  metrics = {k: float(np.mean([m[k] for m in history])) for k in history[0]}
  seconds = time.perf_counter() - started
  metrics['tokens_per_sec'] = tokens / max(seconds, 1e-9)
  run.trained_tokens += tokens
  run.train_seconds += seconds
  metrics['skipped_updates'] = run.layout.counter(run.state, 'skipped')
  run.check_finite()
  writer.write(step, 'train', metrics)
  run.last_train = metrics
  bar.set_postfix(
    loss=f'{metrics["loss"]:.4f}',
    lr=f'{metrics["learning_rate"]:.2e}',
    tok_s=f'{metrics["tokens_per_sec"]:,.0f}',
  )


def run_eval(run: Run, writer: MetricWriter, step: int) -> dict:
  params, frozen = run.layout.eval_inputs(run.state)
  metrics = evaluate(run.eval_step, params, run.eval_data, run.task.token_level, frozen)
  metrics.update(run.task.extra_eval(run.full_params()))
  writer.write(step, 'eval', metrics)
  log.info('step %d eval: %s', step, '  '.join(f'{k} {v:.4f}' for k, v in metrics.items()))
  run.last_eval = metrics
  return metrics


def train_loop(run: Run, writer: MetricWriter, stop: StopSignals) -> int:
  """Steps from the restored position to ``num_train_steps``; returns the step reached."""
  config = run.config
  last = config.num_train_steps
  pending, tokens, started = [], 0, time.perf_counter()
  step = run.start_step
  with tqdm(
    total=last,
    initial=step,
    desc='train',
    unit='step',
    dynamic_ncols=True,
    disable=not is_primary(),
  ) as bar:
    while step < last and stop.received is None:
      batch = run.task.train_batch(step, run.layout.train_rows)  # only this process's rows
      run.state, metrics = run.train_step(run.state, batch)
      step += 1
      pending.append(metrics)
      tokens += batch['inputs'][0].size * config.batch_size
      bar.update()
      if _due(step, config.log_every_steps, last):
        log_train(run, writer, step, pending, tokens, started, bar)
        pending, tokens, started = [], 0, time.perf_counter()
      evaluated = _due(step, config.eval_every_steps, last) and run_eval(run, writer, step)
      if _due(step, config.checkpoint_every_steps, last):
        run.save(step, evaluated or None)
      if evaluated:
        started = time.perf_counter()  # tokens/s counts training only
  if stop.received is not None and step > run.start_step:
    run.save(step, None)
  return step


def write_config(config, workdir: str) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(config.to_dict(), f, indent=2)


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains ``config.task`` in ``workdir`` (resuming from its checkpoints) and returns a summary: the step reached,
  the last train and eval metrics, the task's baseline, the checkpoint steps, the final ``state`` (params under
  ``state.params``) and an end-of-run sample (unless the run was interrupted)."""
  started = time.perf_counter()
  check_config(config)
  initialize_distributed(config)
  setup_logging()
  enable_compilation_cache(config.compilation_cache_dir)
  run = Run(config, workdir)
  log.info('layout: %s', run.layout.describe())
  if run.start_step:
    log.info('resuming from step %d in %s', run.start_step, run.checkpoints.directory)
  for name, value in run.task.baseline().items():
    log.info('baseline %s %.4f', name, value)
  try:
    with (
      MetricWriter(workdir, run.start_step, enabled=is_primary()) as writer,
      StopSignals() as stop,
      logging_redirect_tqdm(),
    ):
      step = train_loop(run, writer, stop)
      if not run.last_eval and stop.received is None:
        run_eval(run, writer, step)  # the run was already complete: still report where it stands
  finally:
    run.checkpoints.close()
  summary = {
    'step': step,
    'interrupted': stop.received,
    'train': run.last_train,
    'eval': run.last_eval,
    'baseline': run.task.baseline(),
    'checkpoint_dir': run.checkpoints.directory,
    'checkpoints': run.checkpoints.steps(),
    'train_tokens': run.trained_tokens,
    'train_seconds': run.train_seconds,
    'state': run.canonical_state(),
  }
  if stop.received is None and config.sample.enabled:
    summary['sample'] = run.task.sample(run.full_params(), jax.random.PRNGKey(config.seed))
    log.info('sample:\n%s', summary['sample'])
  summary['wall_seconds'] = time.perf_counter() - started
  for line in closing_lines(summary, config, workdir, run.task.metric):
    log.info('%s', line)
  return summary
