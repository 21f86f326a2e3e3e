"""The closing lines of a run: what it reached against its baseline, how fast, where its checkpoints are, and the
commands that sample from it and continue it."""

from __future__ import annotations

import shlex

from flax import traverse_util

from train.configs import preset


def overrides(config, exclude: tuple[str, ...] = ()) -> list[str]:
  """The ``--config.<field>=<value>`` flags that turn the task's preset into ``config`` (none for an unchanged
  preset), the preset's ``--config=`` file first: the command line that rebuilds the same config, less the fields
  in ``exclude``."""
  base = traverse_util.flatten_dict(preset(config.task).to_dict(), sep='.')
  fields = traverse_util.flatten_dict(config.to_dict(), sep='.')
  flags = [] if config.task == 'lm' else [f'--config=train/configs/{config.task}.py']
  flags += [
    f'--config.{key}={value}'
    for key, value in sorted(fields.items())
    if key != 'task'
    and key not in exclude
    and value is not None
    and (key not in base or base[key] != value)
  ]
  return [shlex.quote(flag) for flag in flags]


def sample_command(config, workdir: str) -> str:
  text = f' --text={shlex.quote(config.sample.prompt)}' if config.task == 'lm' else ''
  return f'python -m train.sample --workdir={shlex.quote(workdir)}{text}'


def continue_command(config, workdir: str, steps: int) -> str:
  """The same run, longer: the checkpoint's config plus a larger ``num_train_steps`` (a field a resumed run may
  change)."""
  return ' '.join(
    [
      'python -m train',
      f'--workdir={shlex.quote(workdir)}',
      *overrides(config, ('num_train_steps',)),
      f'--config.num_train_steps={steps}',
    ]
  )


def duration(seconds: float) -> str:
  minutes, seconds = divmod(round(seconds), 60)
  return f'{minutes}m{seconds:02d}s' if minutes else f'{seconds}s'


def closing_lines(summary: dict, config, workdir: str, metric: str) -> list[str]:
  """A few lines a person reads at the end of a run (see :func:`train.trainer.train_and_evaluate`)."""
  lines = []
  if summary['interrupted']:
    lines.append(
      f'stopped by {summary["interrupted"]} at step {summary["step"]}; the same command resumes'
    )
  if summary['eval']:
    baselines = ', '.join(
      f'{name.replace("_", " ")} {value:.4f}' for name, value in summary['baseline'].items()
    )
    lines.append(
      f'final validation {metric} {summary["eval"][metric]:.4f} at step {summary["step"]}'
      + (f' (baseline: {baselines})' if baselines else '')
    )
  if summary['train_seconds'] > 0:
    lines.append(
      f'trained {summary["train_tokens"]:,} tokens in {duration(summary["train_seconds"])} '
      f'({summary["train_tokens"] / summary["train_seconds"]:,.0f} tokens/s); '
      f'wall time {duration(summary["wall_seconds"])}'
    )
  steps = ', '.join(map(str, summary['checkpoints'])) or 'none'
  lines += [
    f'checkpoints (steps {steps}) in {summary["checkpoint_dir"]}',
    f'sample from it:  {sample_command(config, workdir)}',
    f'continue it:     {continue_command(config, workdir, 2 * max(summary["step"], 1))}',
  ]
  if config.get('init_from'):
    out = shlex.quote(workdir.rstrip('/') + '-hf')
    lines.append(
      f'export it:       python -m train.export --workdir={shlex.quote(workdir)} --out={out}'
    )
  return lines
