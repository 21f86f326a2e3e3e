"""``modules.update_slice``: ``lax.dynamic_update_slice`` bit for bit, differentiable, and in a bf16 decoding program
a key/value cache written as ``uint16`` without a float32 copy of the cache."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decoding_helpers import greedy_generate_hlo
from jax import lax

from transformer_jax.modules.update_slice import update_slice


def bits(x):
  return np.asarray(lax.bitcast_convert_type(x, jnp.uint16) if x.dtype.itemsize == 2 else x)


@pytest.mark.parametrize('dtype', ['bfloat16', 'float16', 'float32'])
@pytest.mark.parametrize(
  'start', [(0, 3, 0, 0), (1, 6, 2, 0), (0, 99, 0, 0)], ids=['first', 'inner', 'clamped']
)
def test_same_bits_as_dynamic_update_slice(dtype, start):
  """Odd shapes; a start past the end is clamped as XLA clamps it; a NaN with a payload keeps its bits."""
  operand = jax.random.normal(jax.random.key(0), (2, 9, 3, 5)).astype(dtype)
  update = jax.random.normal(jax.random.key(1), (1, 2, 1, 5)).astype(dtype)
  update = update.at[0, 0, 0, 0].set(jnp.nan)
  start = tuple(jnp.int32(i) for i in start)
  got = jax.jit(update_slice)(operand, update, start)
  want = jax.jit(lax.dynamic_update_slice)(operand, update, start)
  assert got.dtype == operand.dtype
  np.testing.assert_array_equal(bits(got), bits(want))


@pytest.mark.parametrize('dtype', ['bfloat16', 'float32'])
def test_derivatives_are_dynamic_update_slices(dtype):
  operand = jax.random.normal(jax.random.key(0), (2, 9, 3, 5)).astype(dtype)
  update = jax.random.normal(jax.random.key(1), (2, 2, 3, 5)).astype(dtype)
  start = (0, jnp.int32(4), 0, 0)
  weights = jax.random.normal(jax.random.key(2), operand.shape)

  def loss(fn):
    return lambda o, u: jnp.sum(fn(o, u, start).astype(jnp.float32) * weights)

  grads = jax.grad(loss(update_slice), (0, 1))(operand, update)
  want = jax.grad(loss(lax.dynamic_update_slice), (0, 1))(operand, update)
  for a, b in zip(grads, want, strict=True):
    np.testing.assert_array_equal(bits(a), bits(b))
  tangents = (jnp.ones_like(operand), 2 * jnp.ones_like(update))
  _, tangent = jax.jvp(lambda o, u: update_slice(o, u, start), (operand, update), tangents)
  expected = lax.dynamic_update_slice(*tangents, start)
  np.testing.assert_array_equal(bits(tangent), bits(expected))


def test_a_bf16_decoding_program_writes_its_cache_in_place_as_bits():
  """The one-layer GPT's cache is (1, 8, 3, 4): its update is a uint16 one and no float32 copy of it is made (XLA:CPU
  converted the whole cache to float32 and back at every step)."""
  hlo = greedy_generate_hlo(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  updated = set(re.findall(r'(\w+\[[\d,]+\])\{[\d,]*\} dynamic-update-slice', hlo))
  assert 'u16[1,8,3,4]' in updated
  assert 'f32[1,8,3,4]' not in hlo
