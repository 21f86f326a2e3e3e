"""Trains tiny runs under device layouts, in a fresh process; the test compares what they leave in ``OUT``.

    python train_layouts.py DEVICES OUT RUN [RUN ...]

Each ``RUN`` is ``name:task:layout:steps[:from]`` where ``layout`` is ``single``, ``pmap`` or a mesh
``DATAxFSDPxTENSOR`` and ``from`` names an earlier run whose workdir this one continues (a restore under another
layout). Every run leaves ``OUT/<name>/`` (its workdir, with metrics.jsonl) plus ``OUT/<name>.npz`` (final parameters,
by path) and ``OUT/<name>.json`` (``specs``: the ``PartitionSpec`` of every parameter of the final train state;
``log``: the trainer's log messages).
"""

import json
import logging
import os
import shutil
import sys

DEVICES = int(sys.argv[1])
os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + f' --xla_force_host_platform_device_count={DEVICES}'
)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')

from train_helpers import layout_fields, tiny_config  # noqa: E402

from train.trainer import train_and_evaluate  # noqa: E402


def flat(tree) -> dict:
  return {
    '/'.join(str(getattr(k, 'key', k)) for k in path): leaf
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }


class Messages(logging.Handler):
  def __init__(self):
    super().__init__()
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


def main(out: str, runs: list[str]) -> None:
  messages = Messages()
  logging.getLogger('train').addHandler(messages)
  for run in runs:
    messages.messages.clear()
    name, task, layout, steps, *start = run.split(':')
    workdir = os.path.join(out, name)
    if start:
      shutil.copytree(os.path.join(out, start[0]), workdir)
    config = tiny_config(task, layout_fields(task, layout), num_train_steps=int(steps))
    params = flat(train_and_evaluate(config, workdir)['state'].params)
    np.savez(os.path.join(out, f'{name}.npz'), **{k: np.asarray(v) for k, v in params.items()})
    with open(os.path.join(out, f'{name}.json'), 'w') as f:
      json.dump(
        {'specs': {k: str(v.sharding.spec) for k, v in params.items()}, 'log': messages.messages}, f
      )
    print(f'{name}: done', flush=True)


if __name__ == '__main__':
  main(sys.argv[2], sys.argv[3:])
