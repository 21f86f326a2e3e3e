"""Tiny configs for the trainer tests: one layer, width 16, a handful of steps."""

import importlib

TINY_MODEL = dict(
  num_layers=1, d_model=16, num_heads=2, d_ff=32, dropout_rate=0.0, attention_dropout_rate=0.0
)


def tiny_fields(task: str) -> dict:
  """Dotted field paths -> values that shrink the ``task`` preset to run in seconds."""
  fields = {f'model.{k}': v for k, v in TINY_MODEL.items()}
  fields.update(
    {
      'batch_size': 8,
      'num_train_steps': 6,
      'warmup_steps': 2,
      'log_every_steps': 1,
      'eval_every_steps': 3,
      'eval_batches': 1,
      'checkpoint_every_steps': 3,
      'learning_rate': 1e-2,
      'sample.enabled': False,
    }
  )
  if task in ('lm', 'mlm'):
    fields.update({'data.seq_len': 16, 'model.max_len': 16})
  if task == 'translation':
    fields.update(
      {'data.train_size': 64, 'data.val_size': 8, 'data.max_digits': 3, 'data.bleu_examples': 8}
    )
  if task == 'classify':
    fields['data.builtin_size'] = 80
  return fields


def layout_fields(task: str, layout: str) -> dict:
  """Tiny-run fields for the device-layout tests: 4 heads and FFN width 32 (so a 4-way tensor axis splits them), a
  batch of 16 (an LM step in two micro-batches), one evaluation and one checkpoint at the end. ``layout`` is
  ``'single'``, ``'pmap'`` or a mesh ``'DATAxFSDPxTENSOR'``; ``'nnx-'`` before a mesh trains with ``api='nnx'``."""
  # adam_eps: a key projection's bias has an exactly zero gradient (softmax ignores a shift shared by all keys), so
  # what reaches Adam there is float noise that differs with the reduction order; the default eps of 1e-8 would
  # scale that noise up to steps of the learning rate's size.
  fields = {
    **tiny_fields(task),
    'model.num_heads': 4,
    'batch_size': 16,
    'eval_every_steps': 1000,
    'checkpoint_every_steps': 1000,
    'adam_eps': 1e-4,
  }
  if task == 'lm':
    fields['grad_accum_steps'] = 2
  if layout.startswith('nnx-'):
    fields['api'], layout = 'nnx', layout.removeprefix('nnx-')
  if layout == 'pmap':
    fields['parallelism'] = 'pmap'
  elif layout != 'single':
    fields.update(zip(('mesh.data', 'mesh.fsdp', 'mesh.tensor'), map(int, layout.split('x'))))
  return fields


def tiny_config(task='lm', fields=None, **overrides):
  """The ``task`` preset with ``fields`` (default :func:`tiny_fields`) and ``overrides`` (dotted paths) set."""
  name = 'default' if task == 'lm' else task
  config = importlib.import_module(f'train.configs.{name}').get_config()
  for path, value in {**(tiny_fields(task) if fields is None else fields), **overrides}.items():
    *parents, leaf = path.split('.')
    target = config
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config


def command_line(task: str, fields: dict) -> list[str]:
  """The ``python -m train`` flags that give the same config as ``tiny_config(task, fields)``."""
  preset = [] if task == 'lm' else [f'--config=train/configs/{task}.py']
  return preset + [f'--config.{path}={value}' for path, value in fields.items()]
