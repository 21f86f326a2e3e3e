"""Checkpoints written by earlier versions restore into today's models and give the same held-out loss.

``tests/data/checkpoints`` holds tiny runs of every model family, written by ``tests/data/write_checkpoints.py``.
A change that renames, reshapes or reorders a parameter fails here: the restore finds no matching tree. The MLM
run's held-out masks were redrawn when masking became a fixed count per row; its expected figures are those of the
same saved parameters on the new masks.
"""

import json
import pathlib
import shutil

import pytest
from train_helpers import tiny_config

from train.trainer import train_and_evaluate

ROOT = pathlib.Path(__file__).parent / 'data' / 'checkpoints'
EXPECTED = json.loads((ROOT / 'expected.json').read_text())


@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_an_old_checkpoint_restores_to_the_same_loss(name, tmp_path):
  run = EXPECTED[name]
  workdir = tmp_path / name
  shutil.copytree(ROOT / name, workdir)
  summary = train_and_evaluate(tiny_config(run['task'], **run['overrides']), str(workdir))
  assert summary['step'] == run['overrides']['num_train_steps']  # restored, not trained afresh
  assert summary['train_tokens'] == 0
  for metric, value in run['eval'].items():
    assert summary['eval'][metric] == pytest.approx(value, rel=1e-5, abs=1e-6), metric
