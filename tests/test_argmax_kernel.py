"""The argmax CPU kernel against ``jnp.argmax``: ties, NaN, infinities, rows that end inside a block, leading axes
and vmap; through ``modules.argmax`` in a differentiated function and in greedy decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decoding_helpers import greedy_generate_hlo

from transformer_jax.kernels import argmax
from transformer_jax.modules.argmax import argmax as module_argmax

NAN, INF = float('nan'), float('inf')


def rows_with(n, rows, seed=0):
  return np.random.default_rng(seed).standard_normal((rows, n)).astype(np.float32)


def case(name):
  """(x, what jnp.argmax gives): rows built around one situation each."""
  if name == 'vocab':  # GPT-2's vocabulary, the maximum anywhere
    return rows_with(50257, 3)
  if name == 'max_in_last_element':  # past the last whole block of 512
    x = rows_with(1031, 2)
    x[:, -1] = 9.0
    return x
  if name == 'ties_take_the_first':
    x = np.zeros((2, 1100), np.float32)
    x[0, [700, 5, 1099]] = 3.0
    x[1, [513, 1024]] = 3.0
    return x
  if name == 'signed_zeros_tie':
    return np.array([[-1.0, -0.0, 0.0, -2.0], [-3.0, 0.0, -0.0, -1.0]], np.float32)
  if name == 'nan_wins_from_its_first_position':
    x = rows_with(1500, 3)
    x[0, [900, 30]] = NAN
    x[1, 1499] = NAN
    x[1, 3] = INF
    x[2, 0] = NAN
    return x
  if name == 'infinities':
    x = np.full((3, 7), -INF, np.float32)  # row 0: all -inf gives 0
    x[1, 4] = INF
    x[1, 6] = INF
    x[2, 5] = -1e30
    return x
  if name == 'one_element':
    return np.array([[2.5], [-INF]], np.float32)
  raise KeyError(name)


CASES = [
  'vocab',
  'max_in_last_element',
  'ties_take_the_first',
  'signed_zeros_tie',
  'nan_wins_from_its_first_position',
  'infinities',
  'one_element',
]


@pytest.mark.parametrize('name', CASES)
def test_argmax_equals_jnp_argmax(name):
  x = jnp.asarray(case(name))
  out = jax.jit(argmax.argmax)(x)
  assert out.dtype == jnp.int32 and out.shape == x.shape[:-1]
  np.testing.assert_array_equal(out, jnp.argmax(x, axis=-1))


def test_argmax_of_leading_axes_and_under_vmap():
  x = jnp.asarray(rows_with(517, 2 * 3 * 5).reshape(2, 3, 5, 517))
  expected = jnp.argmax(x, axis=-1)
  np.testing.assert_array_equal(jax.jit(argmax.argmax)(x), expected)
  np.testing.assert_array_equal(
    jax.jit(jax.vmap(argmax.argmax, in_axes=2))(x), expected.transpose(2, 0, 1)
  )


@pytest.mark.parametrize('x', [jnp.zeros((2, 5), jnp.bfloat16), jnp.zeros((3, 0)), jnp.zeros(())])
def test_argmax_refuses_what_it_cannot_take(x):
  with pytest.raises(ValueError, match='float32 with a non-empty last axis'):
    argmax.argmax(x)


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_module_argmax_takes_the_kernel_for_float32_only(dtype):
  x = jnp.asarray(case('ties_take_the_first')).astype(dtype)
  hlo = jax.jit(module_argmax).lower(x).compile().as_text()
  assert (argmax.TARGET in hlo) == (dtype == 'float32')
  np.testing.assert_array_equal(jax.jit(module_argmax)(x), jnp.argmax(x, axis=-1))


def test_module_argmax_inside_a_differentiated_function():
  """A loss that also counts argmax hits: the kernel gets no tangent, and the gradient is the loss's alone."""
  logits = jax.random.normal(jax.random.key(0), (2, 5, 7))
  best = jnp.argmax(logits, -1)
  targets = best.at[0, 1].set((best[0, 1] + 1) % 7)  # one miss in 10

  def loss(z):
    nll = -(jax.nn.log_softmax(z) * jax.nn.one_hot(targets, 7)).sum()
    return nll, (module_argmax(z) == targets).sum()

  (value, correct), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(logits)
  assert argmax.TARGET in jax.jit(loss).lower(logits).compile().as_text()
  assert int(correct) == 9
  expected = jax.value_and_grad(lambda z: loss(z)[0])(logits)
  np.testing.assert_allclose(value, expected[0], rtol=1e-6)
  np.testing.assert_allclose(grad, expected[1], rtol=1e-6, atol=1e-7)


def test_greedy_decoding_program_calls_the_kernel():
  hlo = greedy_generate_hlo(batch=2)
  assert argmax.TARGET in hlo
