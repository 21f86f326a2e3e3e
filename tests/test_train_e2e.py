"""The trainer end to end on tiny configs: every task, exact resume, config mismatch, non-finite steps, SIGTERM."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest
from train_helpers import tiny_config

from train.checkpoint import ConfigMismatchError
from train.metrics import read_metrics
from train.tasks import LanguageModelTask
from train.trainer import NonFiniteError, train_and_evaluate
from train.vocab import UNK

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_losses(workdir):
  return [r['loss'] for r in read_metrics(workdir) if r['split'] == 'train']


@pytest.mark.parametrize('task', ['lm', 'mlm', 'translation', 'classify'])
def test_each_task_learns_and_writes_its_files(task, tmp_path):
  config = tiny_config(
    task,
    num_train_steps=12,
    eval_every_steps=12,
    checkpoint_every_steps=6,
    **{'sample.enabled': task == 'lm'},
  )
  summary = train_and_evaluate(config, str(tmp_path))
  losses = train_losses(str(tmp_path))
  assert len(losses) == 12 and np.all(np.isfinite(losses))
  assert np.mean(losses[-3:]) < np.mean(losses[:3])
  assert summary['checkpoints'] == [6, 12]
  for name in ('config.json', 'metrics.jsonl', 'vocab.json', 'tensorboard'):
    assert os.path.exists(tmp_path / name), name
  assert {'loss', 'accuracy'} <= set(summary['eval'])
  if task == 'translation':
    assert {'bleu', 'exact_match'} <= set(summary['eval'])
  if task == 'lm':
    assert summary['baseline']['unigram_loss'] > 0 and summary['sample'].startswith(
      config.sample.prompt
    )


def test_resume_is_exact(tmp_path):
  # Dropout on, so the restored RNG matters too; the schedule length is fixed at 8 for both runs.
  config = lambda steps: tiny_config(
    num_train_steps=steps,
    decay_steps=8,
    checkpoint_every_steps=2,  # noqa: E731
    **{'model.dropout_rate': 0.1},
  )
  straight = train_and_evaluate(config(8), str(tmp_path / 'straight'))
  first = train_and_evaluate(config(4), str(tmp_path / 'resumed'))
  resumed = train_and_evaluate(config(8), str(tmp_path / 'resumed'))
  assert first['step'] == 4 and resumed['step'] == 8
  assert train_losses(str(tmp_path / 'straight')) == train_losses(str(tmp_path / 'resumed'))
  for a, b in zip(
    jax.tree.leaves(straight['state'].params), jax.tree.leaves(resumed['state'].params)
  ):
    np.testing.assert_array_equal(a, b)


def test_a_different_config_is_a_clear_error(tmp_path):
  train_and_evaluate(tiny_config(num_train_steps=3), str(tmp_path))
  with pytest.raises(ConfigMismatchError, match=r'model.num_layers: checkpoint 1, now 2'):
    train_and_evaluate(tiny_config(num_train_steps=3, **{'model.num_layers': 2}), str(tmp_path))


@pytest.fixture
def poisoned_step_3(monkeypatch):
  """Batch 3 of every LM run holds an id beyond the vocabulary: its embedding row, and so the loss, is NaN."""
  clean = LanguageModelTask.train_batch

  def train_batch(self, step, rows=None):
    batch = clean(self, step, rows)
    if step == 3:
      batch['inputs'][0, 0] = self.vocab.size + UNK
    return batch

  monkeypatch.setattr(LanguageModelTask, 'train_batch', train_batch)


@pytest.mark.parametrize('api', ['linen', 'nnx'])
def test_nonfinite_step_stops_and_keeps_the_last_good_checkpoint(api, tmp_path, poisoned_step_3):
  with pytest.raises(
    NonFiniteError, match='non-finite loss or gradient at step 3.*checkpoint is step 3'
  ):
    train_and_evaluate(tiny_config(checkpoint_every_steps=3, api=api), str(tmp_path))
  assert sorted(int(d) for d in os.listdir(tmp_path / 'checkpoints') if d.isdigit()) == [3]


@pytest.mark.parametrize('api', ['linen', 'nnx'])
def test_nonfinite_step_is_skipped_when_asked(api, tmp_path, poisoned_step_3):
  summary = train_and_evaluate(tiny_config(skip_nonfinite_updates=True, api=api), str(tmp_path))
  assert summary['step'] == 6 and summary['train']['skipped_updates'] == 1
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(summary['state'].params))


@pytest.mark.slow
def test_sigterm_saves_and_the_same_command_resumes(tmp_path):
  workdir = str(tmp_path / 'run')
  command = [
    sys.executable,
    '-m',
    'train',
    f'--workdir={workdir}',
    '--config.num_train_steps=100000',
    '--config.eval_every_steps=100000',
    '--config.checkpoint_every_steps=100000',
    '--config.batch_size=4',
    '--config.log_every_steps=1',
    '--config.model.num_layers=1',
    '--config.model.d_model=16',
    '--config.model.d_ff=32',
    '--config.data.seq_len=16',
    '--config.model.max_len=16',
    '--config.sample.enabled=False',
  ]
  process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  metrics = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + 120
  while (
    time.time() < deadline and len(read_metrics(workdir) if os.path.exists(metrics) else []) < 3
  ):
    time.sleep(0.5)
  process.send_signal(signal.SIGTERM)
  output = process.communicate(timeout=120)[0].decode()
  assert process.returncode == 0, output
  assert 'SIGTERM received' in output
  saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())
  assert len(saved) == 1 and saved[0] >= 3
  with open(os.path.join(workdir, 'config.json')) as f:
    # the run's own config, as the same command would give
    config = ml_collections.ConfigDict(json.load(f))
  config.num_train_steps = saved[0] + 2
  summary = train_and_evaluate(config, workdir)
  assert summary['step'] == saved[0] + 2 and len(train_losses(workdir)) == saved[0] + 2
