"""``python -m train --config.api=nnx``: the NNX model, an ``nnx.Optimizer`` and an ``nnx.jit`` step train every task to
the Linen run's losses, parameters and optimizer state bit for bit (dropout on, two micro-batches), and a checkpoint of
either API resumes under the other. The 8-device layouts are in ``test_parallel.py``."""

import jax
import numpy as np
import pytest
from flax import nnx
from train_helpers import tiny_config

import transformer_jax.nnx as tnnx
from train import nnx_training
from train.metrics import read_metrics
from train.trainer import Run, check_config, train_and_evaluate

# dropout on and two micro-batches, so the dropout keys and the accumulation must match too
FIELDS = {
  'num_train_steps': 4,
  'batch_size': 4,
  'grad_accum_steps': 2,
  'eval_every_steps': 4,
  'checkpoint_every_steps': 2,
  'model.dropout_rate': 0.1,
}


def train_losses(workdir) -> list[float]:
  return [r['loss'] for r in read_metrics(str(workdir)) if r['split'] == 'train']


def assert_same_state(a, b):
  """Two canonical train states hold equal arrays, leaf for leaf (optimizer moments and counters included)."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(jax.random.key_data(x) if _is_key(x) else x, y)


def _is_key(x) -> bool:
  return jax.dtypes.issubdtype(getattr(x, 'dtype', None), jax.dtypes.prng_key)


def train_both(root, task: str, **overrides) -> dict:
  """The same config trained under each API: ``{api: (workdir, summary)}``."""
  out = {}
  for api in nnx_training.API:
    workdir = root / api
    config = tiny_config(task, api=api, **FIELDS, **overrides)
    out[api] = workdir, train_and_evaluate(config, str(workdir))
  return out


# the LM pair also has per-path learning rates with one group frozen (the nnx.Optimizer's state is made from a tree of
# Variables and updated from arrays: its masks and labels must agree), label smoothing and a cosine schedule
LM_EXTRAS = {
  'param_lr': 'decoder/layers_0/ffn=3e-3,decoder/final_norm=0',
  'label_smoothing': 0.1,
  'lr_schedule': 'cosine',
}


@pytest.fixture(scope='module')
def lm_runs(tmp_path_factory):
  return train_both(tmp_path_factory.mktemp('lm'), 'lm', **LM_EXTRAS)


@pytest.mark.parametrize('task', ['lm', 'mlm', 'translation', 'classify'])
def test_nnx_run_equals_linen_run(task, lm_runs, tmp_path):
  done = lm_runs if task == 'lm' else train_both(tmp_path, task)
  (linen_dir, linen), (nnx_dir, ours) = done['linen'], done['nnx']
  assert len(train_losses(nnx_dir)) == 4
  assert train_losses(nnx_dir) == train_losses(linen_dir)
  assert (
    ours['eval'] == linen['eval']
  )  # translation: BLEU and ROUGE of the decoded validation set too
  assert_same_state(ours['state'], linen['state'])
  assert ours['checkpoints'] == linen['checkpoints'] == [2, 4]
  if task == 'lm':  # the frozen group never moved from its initial ones
    final_norm = ours['state'].params['decoder']['final_norm']['scale']
    np.testing.assert_array_equal(final_norm, np.ones_like(final_norm))


@pytest.mark.parametrize('first,then', [('linen', 'nnx'), ('nnx', 'linen')])
def test_a_checkpoint_resumes_under_the_other_api(first, then, lm_runs, tmp_path):
  workdir = str(tmp_path / 'resumed')
  half = tiny_config(api=first, **{**FIELDS, 'num_train_steps': 2}, **LM_EXTRAS)
  train_and_evaluate(half, workdir)
  resumed = train_and_evaluate(tiny_config(api=then, **FIELDS, **LM_EXTRAS), workdir)
  straight_dir, straight = lm_runs[then]
  assert train_losses(workdir) == train_losses(straight_dir)
  assert_same_state(resumed['state'], straight['state'])


def test_the_device_state_is_an_nnx_model_and_optimizer(tmp_path):
  run = Run(tiny_config(api='nnx', **FIELDS), str(tmp_path))
  try:
    state = run.state
    assert isinstance(state, nnx_training.NNXTrainState)
    assert isinstance(state.model, tnnx.GPT) and isinstance(state.optimizer, nnx.Optimizer)
    # the canonical state holds the model's own arrays: no copy
    canonical = run.canonical_state()
    kernel = state.model.decoder['layers_0']['ffn']['fc_in']['kernel']
    assert canonical.params['decoder']['layers_0']['ffn']['fc_in']['kernel'] is kernel.get_value()
    assert run.layout.describe().startswith('nnx jit over mesh')
  finally:
    run.checkpoints.close()


@pytest.mark.parametrize(
  'fields,message',
  [
    ({'api': 'torch'}, "api must be one of ('linen', 'nnx'), got 'torch'"),
    ({'api': 'nnx', 'parallelism': 'pmap'}, 'api=nnx trains under parallelism=jit'),
    ({'api': 'nnx', 'lora.rank': 4}, 'api=nnx does not train LoRA adapters yet'),
  ],
)
def test_impossible_api_settings_are_refused(fields, message):
  with pytest.raises(ValueError, match=message.replace('(', r'\(').replace(')', r'\)')):
    check_config(tiny_config(**fields))
