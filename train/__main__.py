"""``python -m train [--config=train/configs/<task>.py] [--config.<field>=<value> ...] [--workdir=DIR]``."""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from train.checkpoint import ConfigMismatchError
from train.configs.default import get_config
from train.trainer import NonFiniteError, train_and_evaluate

_DEFAULTS = get_config()
config_flags.DEFINE_config_file(
    'config', os.path.join(os.path.dirname(__file__), 'configs', 'default.py'),
    'A config file (train/configs/{default,translation,mlm,classify}.py); override any field with '
    '--config.<field>=<value>. Fields of the default (lm) config:\n' + str(_DEFAULTS), lock_config=True)
flags.DEFINE_string('workdir', None, 'Checkpoints, logs and vocabulary go here; the same workdir resumes. '
                    'Default: runs/<task>.')


def main(argv):
  del argv
  config = flags.FLAGS.config
  try:
    train_and_evaluate(config, flags.FLAGS.workdir or f'runs/{config.task}')
  except (ValueError, FileNotFoundError, ConfigMismatchError, NonFiniteError) as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main)
