"""Masked-LM training at the masked positions only: the model's ``masked_positions`` and the data's fixed-count
masking."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import data
from train.vocab import MASK, SPECIALS, CharVocab
from transformer_jax import BERTConfig, BERTForMaskedLM
from transformer_jax import nnx as tnnx

B, T, P, H, K, V = 2, 7, 3, 3, 4, 41
CONFIG = BERTConfig(
  vocab_size=V, num_layers=2, d_model=H * K, num_heads=H, d_ff=20, max_len=16, num_labels=3
)
IDS = jax.random.randint(jax.random.key(3), (B, T), 1, V).at[1, 5:].set(0)  # row 1 padded
POSITIONS = jnp.array([[0, 4, 6], [2, 2, 3]], jnp.int32)  # a repeat too


@pytest.fixture(scope='module')
def mlm():
  model = BERTForMaskedLM(CONFIG)
  return model, model.init(jax.random.key(0), IDS)['params']


def test_logits_at_positions_equal_the_full_heads_there(mlm):
  model, params = mlm
  with jax.default_matmul_precision('highest'):
    full = model.apply({'params': params}, IDS)  # (B, T, V)
    picked = model.apply({'params': params}, IDS, masked_positions=POSITIONS)
  assert picked.shape == (B, P, V) and picked.dtype == jnp.float32
  np.testing.assert_allclose(picked, np.take_along_axis(full, POSITIONS[..., None], 1), atol=1e-6)


def test_gradients_equal_the_full_heads_masked_loss(mlm):
  """The loss of the gathered logits and the loss of every position weighted to the same ones have equal gradients:
  the positions not predicted contribute nothing either way."""
  model, params = mlm
  targets = jnp.array([[5, 9, 13], [7, 7, 30]])

  def gathered(p):
    logits = model.apply({'params': p}, IDS, masked_positions=POSITIONS)
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1).sum()

  def weighted(p):
    log_probs = jax.nn.log_softmax(model.apply({'params': p}, IDS))  # (B, T, V)
    rows = jnp.arange(B)[:, None]
    return -log_probs[rows, POSITIONS, targets].sum()

  with jax.default_matmul_precision('highest'):
    (a, ga), (b, gb) = (jax.jit(jax.value_and_grad(f))(params) for f in (gathered, weighted))
  np.testing.assert_allclose(a, b, rtol=1e-6)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), ga, gb)
  assert float(jnp.abs(ga['mlm_bias']).sum()) > 0


def test_nnx_model_takes_positions(mlm):
  model, params = mlm
  nnx_model = tnnx.from_linen(model, params)
  np.testing.assert_allclose(
    nnx_model(IDS, masked_positions=POSITIONS),
    model.apply({'params': params}, IDS, masked_positions=POSITIONS),
    atol=1e-6,
  )


@pytest.mark.parametrize(
  'positions, message',
  [
    (
      jnp.array([[0, 7, 1], [1, 2, 3]]),
      r'masked_positions out of range: found \[7\] but the sequence is \[0, 7\)',
    ),
    (jnp.array([[-1, 0, 1], [1, 2, 3]]), r'out of range: found \[-1\]'),
    (jnp.array([0, 1, 2]), r'masked_positions must have shape \(B, P\) = \(2, P\), got \(3,\)'),
    (jnp.zeros((3, 2), jnp.int32), r'must have shape \(B, P\) = \(2, P\), got \(3, 2\)'),
    (jnp.zeros((2, 2), jnp.float32), 'masked_positions must be integers'),
  ],
  ids=['past_the_end', 'negative', 'one_dimension', 'batch_mismatch', 'floats'],
)
def test_bad_positions_raise(mlm, positions, message):
  model, params = mlm
  with pytest.raises((ValueError, TypeError), match=message):
    model.apply({'params': params}, IDS, masked_positions=positions)


def test_traced_position_out_of_range_gives_nan_not_another_position(mlm):
  model, params = mlm
  logits = jax.jit(lambda p: model.apply({'params': params}, IDS, masked_positions=p))(
    jnp.array([[0, 9, 1], [1, 2, 3]])
  )
  assert np.isnan(logits[0, 1]).all() and np.isfinite(logits[0, 0]).all()


# ------------------------------------------------------------------------------------------------- the masking
VOCAB = CharVocab(list('abcdefghijklmnopqrstuvwxyz'))


def masked(ids, prob=0.15, seed=0):
  return data.mask_tokens(np.asarray(ids), VOCAB, np.random.default_rng(seed), prob)


def test_fixed_count_of_distinct_regular_positions():
  rng = np.random.default_rng(1)
  ids = rng.integers(len(SPECIALS), VOCAB.size, (64, 41))
  ids[:, 0], ids[:, -1] = 1, 2  # [BOS] ... [EOS], never chosen
  out = masked(ids)
  count = round(0.15 * 41)
  assert out['positions'].shape == out['targets'].shape == out['weights'].shape == (64, count)
  assert out['inputs'].shape == ids.shape and out['inputs'].dtype == np.int32
  positions = out['positions']
  assert (np.diff(positions, axis=1) > 0).all()  # ascending and distinct
  assert positions.min() >= 1 and positions.max() <= 39
  assert (out['weights'] == 1).all()
  np.testing.assert_array_equal(out['targets'], np.take_along_axis(ids, positions, 1))
  untouched = np.ones(ids.shape, bool)
  np.put_along_axis(untouched, positions, False, 1)
  np.testing.assert_array_equal(out['inputs'][untouched], ids[untouched])


def test_mask_random_keep_shares():
  ids = np.random.default_rng(2).integers(len(SPECIALS), VOCAB.size, (2000, 40))
  out = masked(ids)
  chosen = np.take_along_axis(out['inputs'], out['positions'], 1)
  is_mask = chosen == MASK
  kept = chosen == out['targets']
  other = ~is_mask & ~kept
  assert abs(is_mask.mean() - 0.8) < 0.01
  # a random draw equals the original 1 time in 26, so "kept" takes about 10% + 10% / 26
  assert abs(kept.mean() - (0.1 + 0.1 / 26)) < 0.01
  assert abs(other.mean() - 0.1 * 25 / 26) < 0.01
  assert (chosen[other] >= len(SPECIALS)).all()  # a random token is never a special one


def test_rows_with_few_regular_tokens_fill_up_with_weight_zero():
  ids = np.zeros((2, 20), np.int64)  # padding
  ids[0, :3] = [1, 7, 2]  # one regular token
  ids[1] = np.arange(20) % 26 + len(SPECIALS)
  out = masked(ids, prob=0.2)
  np.testing.assert_array_equal(out['weights'][0], [1, 0, 0, 0])
  assert out['positions'][0, 0] == 1 and out['targets'][0, 0] == 7
  np.testing.assert_array_equal(
    out['inputs'][0, 2:], ids[0, 2:]
  )  # [EOS] and padding never replaced
  assert out['weights'][1].sum() == 4


def test_masking_is_reproducible_and_at_least_one_per_row():
  ids = np.random.default_rng(3).integers(len(SPECIALS), VOCAB.size, (3, 4))
  a, b = masked(ids, seed=5), masked(ids, seed=5)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  assert a['positions'].shape == (3, 1)  # round(0.15 * 4) = 1
  assert masked(ids, prob=0.01)['positions'].shape == (3, 1)
