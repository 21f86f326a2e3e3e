"""Trainer pieces without training: schedules, the decay mask, the loss, accumulation, data and input errors."""

import logging
import math
import os
import shlex
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl import flags as absl_flags
from ml_collections import config_flags
from train_helpers import tiny_config

from train import data, summary
from train.checkpoint import Checkpoints
from train.losses import cross_entropy_sums
from train.number_words import number_dataset, number_to_words
from train.optim import decay_mask, make_optimizer, make_schedule
from train.parallel import micro_batch_rows
from train.sample import as_text
from train.steps import create_state, train_step_fn
from train.tasks import build_task
from train.trainer import check_config, train_and_evaluate
from train.vocab import build_vocab, load_vocab
from transformer_jax import GPT, GPTConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PEAK, WARM, TOTAL, END = 2.0, 10, 50, 0.1


@pytest.mark.parametrize('kind', ['cosine', 'linear', 'constant', 'rsqrt'])
def test_warmup_is_linear_from_zero(kind):
  schedule = make_schedule(PEAK, WARM, TOTAL, kind, END)
  for step in (0, 3, 7, WARM):
    assert float(schedule(step)) == pytest.approx(PEAK * step / WARM)


@pytest.mark.parametrize(
  'kind, step, expected',
  [
    ('cosine', 30, PEAK * (END + (1 - END) * 0.5)),  # halfway down the cosine
    ('cosine', 50, PEAK * END),
    ('cosine', 70, PEAK * END),
    ('linear', 30, PEAK * (1 + END) / 2),
    ('linear', 50, PEAK * END),
    ('constant', 45, PEAK),
    ('rsqrt', 40, PEAK * math.sqrt(WARM / 40)),  # Noam: peak * sqrt(warmup / step)
    ('rsqrt', 1000, PEAK * math.sqrt(WARM / 1000)),
  ],
)
def test_decay_matches_formula(kind, step, expected):
  assert float(make_schedule(PEAK, WARM, TOTAL, kind, END)(step)) == pytest.approx(
    expected, rel=1e-5
  )


def test_weight_decay_touches_only_kernels():
  params = GPT(
    GPTConfig(vocab_size=11, num_layers=1, d_model=8, num_heads=2, d_ff=16, max_len=8)
  ).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))['params']
  flat = {
    '/'.join(k.key for k in path): v
    for path, v in jax.tree_util.tree_leaves_with_path(decay_mask(params))
  }
  assert (
    flat['decoder/layers_0/ffn/fc_in/kernel'] and flat['decoder/layers_0/self_attention/qkv/kernel']
  )
  assert not any(
    flat[k]
    for k in (
      'token_embed/embedding',
      'positions/embedding',
      'decoder/final_norm/scale',
      'decoder/layers_0/ffn/fc_in/bias',
    )
  )
  # Through the real optimizer: with zero gradients only weight decay moves anything.
  config = tiny_config(weight_decay=0.5, warmup_steps=0, learning_rate=0.1)
  optimizer, _ = make_optimizer(config)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = jax.jit(optimizer.update)(zeros, optimizer.init(params), params)
  moved = jax.tree_util.tree_map_with_path(lambda p, u: (p[-1].key, bool(jnp.any(u != 0))), updates)
  for name, changed in jax.tree.leaves(moved, is_leaf=lambda x: isinstance(x, tuple)):
    assert changed == (name == 'kernel'), name


@pytest.mark.parametrize('eps', [0.0, 0.1], ids=['plain', 'smoothed'])
def test_label_smoothing_and_padding_match_direct_computation(rng, eps):
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
  targets = rng.integers(0, 7, (2, 5))
  weights = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], np.float32)
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  smoothed = np.full((2, 5, 7), eps / 7) + (1 - eps) * np.eye(7)[targets]
  expected = (-(smoothed * log_p).sum(-1) * weights).sum()
  sums = cross_entropy_sums(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights), eps)
  np.testing.assert_allclose(float(sums['loss']), expected, rtol=1e-5)
  np.testing.assert_allclose(
    float(sums['nll']),
    (-np.take_along_axis(log_p, targets[..., None], -1)[..., 0] * weights).sum(),
    rtol=1e-5,
  )
  assert float(sums['weight']) == 7
  if not eps:
    assert float(sums['loss']) == float(sums['nll'])
  # Padded positions: any logits there change nothing.
  noisy = np.where(weights[..., None] > 0, logits, 1e3 * rng.normal(size=logits.shape)).astype(
    np.float32
  )
  again = cross_entropy_sums(jnp.asarray(noisy), jnp.asarray(targets), jnp.asarray(weights), eps)
  np.testing.assert_allclose(float(again['loss']), float(sums['loss']), rtol=1e-6)


def test_grad_accumulation_equals_the_whole_batch(tmp_path):
  # Translation batches have a different amount of padding in each half: the token weighting must still be exact.
  config = tiny_config('translation', label_smoothing=0.1, warmup_steps=0)
  task = build_task(config, str(tmp_path))
  # Plain SGD, so the update is the gradient itself (Adam's first step is about sign(g): float noise would show).
  optimizer = optax.sgd(1.0)
  step = jax.jit(
    train_step_fn(
      task, optimizer, optax.constant_schedule(1.0), config.label_smoothing, skip_nonfinite=False
    )
  )
  split = lambda b, count: {k: v.reshape((count, -1) + v.shape[1:]) for k, v in b.items()}  # noqa: E731
  uneven = lambda b: len({int(w.sum()) for w in np.split(b['weights'], 2)}) == 2  # noqa: E731
  # halves with different token counts
  batch = next(b for b in map(task.train_batch, range(50)) if uneven(b))
  state = create_state(task, optimizer, 0)
  results = [step(state, split(batch, count)) for count in (1, 2)]
  (whole, m1), (accumulated, m2) = results
  np.testing.assert_allclose(float(m1['loss']), float(m2['loss']), rtol=1e-5)
  np.testing.assert_allclose(float(m1['grad_norm']), float(m2['grad_norm']), rtol=1e-4)
  for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(accumulated.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
  'number, words',
  [
    (0, 'zero'),
    (7, 'seven'),
    (13, 'thirteen'),
    (40, 'forty'),
    (21, 'twenty one'),
    (100, 'one hundred'),
    (105, 'one hundred five'),
    (4217, 'four thousand two hundred seventeen'),
    (1000000, 'one million'),
    (1002003, 'one million two thousand three'),
    (90019, 'ninety thousand nineteen'),
  ],
)
def test_number_to_words(number, words):
  assert number_to_words(number) == words


def test_number_dataset_is_disjoint_and_consistent():
  train, val = number_dataset(300, 50, 4, seed=3)
  assert len(train) == 300 and len(val) == 50
  assert not {s for s, _ in train} & {s for s, _ in val}
  assert all(number_to_words(int(s)) == t for s, t in train + val)


def test_short_numbers_all_train_and_validation_holds_longer_ones():
  train, val = number_dataset(2000, 100, 5, seed=0)
  assert all(len(s) >= 3 for s, _ in val)
  assert {int(s) for s, _ in train} >= set(range(100))


@pytest.mark.parametrize('kind', ['char', 'byte', 'word', 'bpe'])
def test_vocab_round_trip(kind, tmp_path):
  texts = ['the cat sat on the mat', 'a dog ate the hat'] * 20
  vocab = build_vocab(kind, texts, bpe_size=300)
  vocab.save(str(tmp_path / 'v.json'))
  again = load_vocab(str(tmp_path / 'v.json'))
  assert again.encode(texts[0]) == vocab.encode(texts[0])
  assert again.decode(again.encode(texts[1])) == texts[1]
  assert min(vocab.encode(texts[0])) >= 5  # ids 0-4 are the specials


def test_epochs_visit_every_example_once():
  indices = np.concatenate([data.epoch_indices(10, 4, seed=1, step=s) for s in range(5)])
  assert sorted(indices[:10]) == list(range(10)) and sorted(indices[10:20]) == list(range(10))


def test_checkpoints_keep_last_and_best(tmp_path):
  checkpoints = Checkpoints(str(tmp_path), keep_last=2, keep_best=1, metric='loss', mode='min')
  state = {'w': jnp.ones(3)}
  losses = {1: 5.0, 2: 1.0, 3: 4.0, 4: None, 5: 3.0, 6: 6.0}
  for step, loss in losses.items():
    checkpoints.save(
      step, state, {'step': step, 'config': {}}, None if loss is None else {'loss': loss}
    )
    checkpoints.manager.wait_until_finished()
  assert checkpoints.steps() == [2, 5, 6]  # the best (loss 1.0) and the newest two
  checkpoints.close()


def test_truncated_and_half_written_checkpoints_are_skipped(tmp_path, caplog, monkeypatch):
  # The run's own handler (set up by any earlier run in this process) stops propagation, and caplog listens at the root.
  monkeypatch.setattr(logging.getLogger('train'), 'propagate', True)
  checkpoints = Checkpoints(str(tmp_path), keep_last=5, keep_best=0, metric='loss', mode='min')
  for step in (1, 2):
    checkpoints.save(step, {'w': jnp.full(3, float(step))}, {'step': step, 'config': {}})
  checkpoints.close()
  (
    tmp_path / 'checkpoints' / '3.orbax-checkpoint-tmp-99'
  ).mkdir()  # what a process killed mid-save leaves
  for f in (tmp_path / 'checkpoints' / '2' / 'state').rglob('*'):
    if f.is_file():
      f.write_bytes(f.read_bytes()[:3])  # truncated
  checkpoints = Checkpoints(str(tmp_path), keep_last=5, keep_best=0, metric='loss', mode='min')
  state, meta = checkpoints.restore({'w': jnp.zeros(3)})
  assert meta['step'] == 1 and float(state['w'][0]) == 1.0
  assert 'checkpoint 2' in caplog.text
  checkpoints.close()


# ------------------------------------------------------------------------------------------------ bad inputs
def write(path, content, mode='w'):
  with open(path, mode) as f:
    f.write(content)
  return str(path)


@pytest.mark.parametrize(
  'task, make_file, message',
  [
    ('lm', lambda d: str(d / 'missing.txt'), 'does not exist'),
    ('lm', lambda d: write(d / 'empty.txt', ''), 'empty'),
    ('lm', lambda d: write(d / 'short.txt', 'just a few words here'), 'fewer than one sequence'),
    (
      'lm',
      lambda d: write(d / 'latin1.txt', b'caf\xe9 ' * 100, 'wb'),
      'latin1.txt:1: not valid UTF-8',
    ),
    ('translation', lambda d: write(d / 'pairs.tsv', 'a\tb\nno tab here\n'), 'pairs.tsv:2: no tab'),
    (
      'classify',
      lambda d: write(d / 'rows.csv', 'good,1\nshort\n'),
      'rows.csv:2: expected "text,label"',
    ),
    (
      'classify',
      lambda d: write(d / 'rows.csv', 'text,label\n' + 'good,1\nbad,negative\n' * 5),
      'mix integers',
    ),
    ('classify', lambda d: write(d / 'rows.csv', 'good,1\nbad,7\n'), r'labels \[7\] lie outside'),
  ],
)
def test_bad_data_is_a_clear_error(task, make_file, message, tmp_path):
  config = tiny_config(task, **{'data.path': make_file(tmp_path)})
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    build_task(config, str(tmp_path / 'work'))


@pytest.mark.parametrize(
  'overrides, message',
  [
    ({'batch_size': 6, 'grad_accum_steps': 4}, 'not divisible by grad_accum_steps'),
    ({'learning_rate': -1.0}, 'learning_rate must be positive'),
    ({'lr_schedule': 'step'}, 'lr_schedule must be one of'),
    ({'num_train_steps': 0}, 'num_train_steps must be a positive integer'),
    ({'label_smoothing': 1.0}, 'label_smoothing'),
    ({'data.vocab': 'morse'}, 'data.vocab must be one of'),
  ],
)
def test_impossible_config_is_a_clear_error(overrides, message):
  with pytest.raises(ValueError, match=message):
    check_config(tiny_config(**overrides))


def test_sequence_longer_than_the_model_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match='seq_len=32 exceeds model.max_len=16'):
    build_task(tiny_config(**{'data.seq_len': 32}), str(tmp_path))


@pytest.mark.parametrize('task', ['lm', 'mlm', 'translation', 'classify'])
def test_a_process_reads_exactly_its_rows_of_the_batch(task, tmp_path):
  config = tiny_config(task, batch_size=8)
  built = build_task(config, str(tmp_path))
  rows = np.array([2, 3, 6, 7])  # what process 1 of 2 feeds with grad_accum_steps=2
  whole, part = built.train_batch(5), built.train_batch(5, rows)
  assert set(part) == set(whole)
  for key in whole:
    np.testing.assert_array_equal(part[key], whole[key][rows], err_msg=key)


def test_process_rows_cover_each_micro_batch_once():
  # A batch of 8 in 2 micro-batches of 4, split over 2 processes: each takes its half of every micro-batch.
  np.testing.assert_array_equal(micro_batch_rows(2, 4, 0, 2), [0, 1, 4, 5])
  np.testing.assert_array_equal(micro_batch_rows(2, 4, 2, 4), [2, 3, 6, 7])


@pytest.mark.parametrize(
  'overrides, message',
  [
    ({'parallelism': 'pmap', 'mesh.fsdp': 2}, 'parallelism=pmap is data parallel only'),
    ({'parallelism': 'pmap', 'mesh.data': 4}, 'pmap runs on all 1 devices; mesh.data=4'),
    ({'parallelism': 'shard'}, "parallelism must be one of \\('jit', 'pmap'\\)"),
    ({'mesh.data': 2}, 'mesh data=2 x fsdp=1 x tensor=1 = 2 devices, but 1 are available'),
    ({'mesh.data': -1, 'mesh.tensor': -1}, 'on one axis at most; got data=-1, fsdp=1, tensor=-1'),
  ],
  ids=['pmap_fsdp', 'pmap_size', 'unknown', 'too_many_devices', 'two_rests'],
)
def test_impossible_layout_is_a_clear_error(overrides, message, tmp_path):
  with pytest.raises(ValueError, match=message):
    train_and_evaluate(tiny_config(**overrides), str(tmp_path))


@pytest.mark.parametrize(
  'record, expected',
  [
    (
      {'task': 'lm', 'prompt': 'The ', 'output': 'The end.\nNext line'},
      '--- prompt: "The "\nThe end.\nNext line',
    ),
    (
      {
        'task': 'translation',
        'prompt': 'ninety one',
        'output': 'nine one',
        'translation': 'nine one',
      },
      '--- source: "ninety one"\nnine one',
    ),
    (
      {
        'task': 'classify',
        'prompt': 'très bien',
        'output': 'upbeat',
        'label': 'upbeat',
        'probabilities': {'gloomy': 0.25, 'upbeat': 0.75},
      },
      '--- text: "très bien"\nupbeat (probabilities: gloomy 0.250, upbeat 0.750)',
    ),
  ],
  ids=['lm', 'translation', 'classify'],
)
def test_sample_shows_the_input_in_a_header_and_the_output_as_text(record, expected):
  assert as_text(record) == expected


# ---------------------------------------------------------------------------------------------- closing summary
@pytest.mark.parametrize(
  'task, overrides',
  [
    ('lm', {}),
    (
      'lm',
      {'data.path': 'my corpus/notes.txt', 'model.dropout_rate': 0.25, 'sample.prompt': "It's "},
    ),
    ('classify', {'data.path': 'reviews.jsonl', 'model.num_labels': 3, 'learning_rate': 2e-4}),
  ],
)
def test_the_continue_command_rebuilds_the_config(task, overrides, monkeypatch):
  """The flags of the closing summary's command, parsed as ``python -m train`` parses them, give the run's config
  back (with the longer ``num_train_steps``)."""
  config = tiny_config(task, **overrides)
  command = shlex.split(summary.continue_command(config, 'runs/x', 99))
  assert (
    command[:4] == ['python', '-m', 'train', '--workdir=runs/x']
    and command[-1] == '--config.num_train_steps=99'
  )
  monkeypatch.chdir(REPO)
  # ml_collections defines the override flags from it
  monkeypatch.setattr(sys, 'argv', ['train', *command[4:]])
  flag_values = absl_flags.FlagValues()
  config_flags.DEFINE_config_file('config', 'train/configs/default.py', flag_values=flag_values)
  flag_values(sys.argv)
  expected = config.to_dict()
  expected['num_train_steps'] = 99
  assert flag_values.config.to_dict() == expected
