"""Mask helpers against hand-built references."""

import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax import masks


def test_padding_mask_marks_real_tokens():
  ids = jnp.array([[5, 3, 0, 0, 0], [1, 2, 3, 4, 0]])
  expected = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], bool)[:, None, None, :]
  got = masks.padding_mask(ids, pad_id=0)
  assert got.dtype == jnp.bool_ and got.shape == (2, 1, 1, 5)
  np.testing.assert_array_equal(got, expected)


def test_padding_mask_uses_the_given_pad_id():
  ids = jnp.array([[0, 7, 7], [7, 0, 1]])
  np.testing.assert_array_equal(masks.padding_mask(ids, pad_id=7)[:, 0, 0], [[1, 0, 0], [0, 1, 1]])


def test_causal_mask_is_lower_triangular():
  expected = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], bool)
  got = masks.causal_mask(4)
  assert got.shape == (1, 1, 4, 4)
  np.testing.assert_array_equal(got[0, 0], expected)


def test_causal_mask_with_offset_covers_a_continuation():
  # Two new queries at absolute positions 3 and 4 over 6 cached keys.
  expected = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0]], bool)
  np.testing.assert_array_equal(masks.causal_mask(2, kv_length=6, offset=3)[0, 0], expected)


def test_sliding_window_keeps_the_newest_keys_of_a_causal_row():
  window = masks.causal_mask(6, window=3)[0, 0]
  expected = np.array([[q - 3 < k <= q for k in range(6)] for q in range(6)])
  np.testing.assert_array_equal(window, expected)
  # continuing a longer sequence: queries 7, 8 of 9 slots see slots 5..7 and 6..8
  cont = masks.causal_mask(2, 9, offset=7, window=3)[0, 0]
  np.testing.assert_array_equal(np.flatnonzero(cont[0]), [5, 6, 7])
  np.testing.assert_array_equal(np.flatnonzero(cont[1]), [6, 7, 8])


def test_cross_attention_mask_hides_source_padding_from_every_query():
  src = jnp.array([[4, 4, 0], [4, 0, 0]])
  got = masks.cross_attention_mask(src, pad_id=0)
  full = np.broadcast_to(got, (2, 1, 5, 3))  # any number of target queries
  np.testing.assert_array_equal(full[0, 0], np.tile([1, 1, 0], (5, 1)).astype(bool))
  np.testing.assert_array_equal(full[1, 0], np.tile([1, 0, 0], (5, 1)).astype(bool))


def test_combine_masks_is_logical_and_with_broadcasting():
  tgt = jnp.array([[1, 2, 3, 0], [1, 2, 0, 0]])
  combined = masks.combine_masks(masks.causal_mask(4), masks.padding_mask(tgt, 0))
  assert combined.shape == (2, 1, 4, 4)
  causal = np.tril(np.ones((4, 4), bool))
  for b, length in enumerate([3, 2]):
    keys = np.arange(4) < length
    np.testing.assert_array_equal(combined[b, 0], causal & keys[None, :])


def test_combine_masks_skips_none():
  m = masks.causal_mask(3)
  assert masks.combine_masks(None, m, None) is not None
  np.testing.assert_array_equal(masks.combine_masks(None, m), m)
  assert masks.combine_masks(None, None) is None


@pytest.mark.parametrize('valid', [[1, 0, 1], [True, True, False]], ids=['ints', 'bools'])
def test_key_mask_lifts_validity(valid):
  got = masks.key_mask(jnp.array([valid]))
  assert got.dtype == jnp.bool_ and got.shape == (1, 1, 1, 3)
  np.testing.assert_array_equal(got[0, 0, 0], np.array(valid, bool))
