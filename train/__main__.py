"""``python -m train [--config=train/configs/<task>.py] [--config.<field>=<value> ...] [--workdir=DIR]``."""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from train.configs.default import get_config
from train.errors import parse_flags, run_main, unknown_field
from train.trainer import train_and_evaluate
from transformer_jax.host_memory import keep_freed_memory

_DEFAULTS = get_config()
try:  # ml_collections applies the command line's --config.<field> overrides here already
  config_flags.DEFINE_config_file(
    'config',
    os.path.join(os.path.dirname(__file__), 'configs', 'default.py'),
    'A config file (train/configs/{default,translation,mlm,classify}.py); override any field with '
    '--config.<field>=<value>. Fields of the default (lm) config:\n' + str(_DEFAULTS),
    lock_config=True,
  )
except (AttributeError, KeyError) as e:
  sys.exit(unknown_field(e, sys.argv))
flags.DEFINE_string(
  'workdir',
  None,
  'Checkpoints, logs and vocabulary go here; the same workdir resumes. Default: runs/<task>.',
)


def main(argv):
  del argv  # parse_flags refuses stray arguments
  config = flags.FLAGS.config
  keep_freed_memory()  # each step's scratch buffer is reused, not faulted in again
  run_main(lambda: train_and_evaluate(config, flags.FLAGS.workdir or f'runs/{config.task}'))


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
