"""Tiny configs for the trainer tests: one layer, width 16, a handful of steps."""

import importlib

TINY_MODEL = dict(num_layers=1, d_model=16, num_heads=2, d_ff=32, dropout_rate=0.0, attention_dropout_rate=0.0)


def tiny_config(task='lm', **overrides):
  """The ``task`` preset shrunk to run in seconds; ``overrides`` are dotted field paths (``'model.num_layers'``)."""
  name = 'default' if task == 'lm' else task
  config = importlib.import_module(f'train.configs.{name}').get_config()
  config.model.update(TINY_MODEL)
  config.update(dict(batch_size=8, num_train_steps=6, warmup_steps=2, log_every_steps=1, eval_every_steps=3,
                     eval_batches=1, checkpoint_every_steps=3, learning_rate=1e-2))
  config.sample.enabled = False
  if task in ('lm', 'mlm'):
    config.data.seq_len = 16
    config.model.max_len = 16
  if task == 'translation':
    config.data.update(dict(train_size=64, val_size=8, max_digits=3, bleu_examples=8))
  if task == 'classify':
    config.data.builtin_size = 80
  for path, value in overrides.items():
    *parents, leaf = path.split('.')
    target = config
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config
