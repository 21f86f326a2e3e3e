"""``modules.take``: ``jnp.take``'s numbers and gradients, without a float32 copy of a 16-bit operand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decoding_helpers import greedy_generate_hlo

from transformer_jax.kernels import take_rows
from transformer_jax.modules.embeddings import TokenEmbedding
from transformer_jax.modules.take import take

DTYPES = ['bfloat16', 'float16', 'float32']


def bits(x):
  x = np.asarray(x)
  return x.view(np.uint16 if x.dtype.itemsize == 2 else np.uint32)


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize(
  'shape, indices, axis',
  [
    ((11, 6), np.array([[3, 0, 10, 3, 7], [1, 2, 2, 9, 4]]), 0),  # a (V, D) table by (B, T) ids
    (
      (5, 7, 3, 4),
      np.array([4, 0, 0, 2, 1, 3, -1, -5]),
      0,
    ),  # a cache's rows, reordered and repeated (beam search), and negative ones counted from the end
    ((5, 7, 3, 4), np.array([6, 1, 5]), 1),
  ],
  ids=['table', 'cache_rows', 'axis_1'],
)
def test_take_equals_jnp_take_bit_for_bit(shape, indices, axis, dtype):
  x = jax.random.normal(jax.random.key(0), shape, dtype)
  compiled = jax.jit(take, static_argnums=2).lower(x, jnp.asarray(indices), axis).compile()
  out = compiled(x, jnp.asarray(indices))
  expected = jnp.take(x, indices, axis=axis)
  assert out.dtype == x.dtype and out.shape == expected.shape
  np.testing.assert_array_equal(bits(out), bits(expected))
  if dtype != 'float32':
    # a 16-bit operand is never widened (XLA:CPU's own gather converts all of it)
    assert 'f32[' not in compiled.as_text()


@pytest.mark.parametrize('dtype', DTYPES)
def test_out_of_range_index_gives_nan_rows(dtype):
  x = jnp.ones((4, 3), dtype)
  out = take(x, jnp.array([1, 4, -9]))
  assert np.all(np.asarray(out[0], np.float32) == 1)
  assert np.all(np.isnan(np.asarray(out[1:], np.float32)))


@pytest.mark.parametrize('dtype', ['bfloat16', 'float32'])
def test_gradients_equal_jnp_take(dtype):
  """Repeated indices accumulate in the gradient, as jnp.take's scatter-add does; forward mode works too."""
  kx, kw = jax.random.split(jax.random.key(1))
  x = jax.random.normal(kx, (7, 5), dtype)
  weights = jax.random.normal(kw, (2, 3, 5), dtype)
  ids = jnp.array([[6, 0, 6], [2, 2, 2]])

  def loss(fn, x):
    return jnp.sum((fn(x, ids) * weights).astype(jnp.float32))

  ours = jax.grad(lambda x: loss(take, x))(x)
  theirs = jax.grad(lambda x: loss(lambda x, i: jnp.take(x, i, axis=0), x))(x)
  np.testing.assert_array_equal(bits(ours), bits(theirs))
  assert np.any(np.asarray(ours[6], np.float32) != 0) and np.all(np.asarray(ours[1]) == 0)
  _, tangent = jax.jvp(lambda x: take(x, ids), (x,), (jnp.ones_like(x) * 2,))
  np.testing.assert_array_equal(np.asarray(tangent, np.float32), 2.0)


def test_bf16_embedding_lookup_makes_no_float32_table():
  """The compiled lookup of a bf16 table holds no (V, D) float32 array (XLA:CPU's gather would convert it)."""
  module = TokenEmbedding(vocab_size=13, features=6, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  ids = jnp.array([[1, 12, 0, 5, 5], [2, 3, 4, 7, 11]])
  params = module.init(jax.random.key(2), ids)
  hlo = jax.jit(module.apply).lower(params, ids).compile().as_text()
  assert 'f32[13,6]' not in hlo
  table = params['params']['embedding']
  table = getattr(table, 'value', table)
  np.testing.assert_array_equal(bits(module.apply(params, ids)), bits(jnp.take(table, ids, axis=0)))


def test_a_bf16_decoding_program_reads_table_rows_without_copying_the_table():
  """Inside the decoding loop XLA hoists a loop-invariant bitcast of the embedding table and writes all of it out
  once per call; on the CPU the lookup copies only the rows asked for (:mod:`transformer_jax.kernels.take_rows`)."""
  hlo = greedy_generate_hlo(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  assert 'u16[37,12]' not in hlo and 'f32[37,12]' not in hlo
  assert take_rows.TARGET in hlo
