"""A feed-forward layer's activation: the CPU kernel against float64 and against the XLA reference (each kind, plain
and gated, sizes that end inside a vector and a chunk, the tails, NaN); ``activations.activate`` with derivatives,
under vmap and jit, where the kernel applies, and in a bf16 decoding program; the ReLU whose tangent reads its
output."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decoding_helpers import greedy_generate_hlo

from transformer_jax import activations
from transformer_jax.kernels import activation as kernel

TRUTH = {  # float64; GPT-2's 0.5 x (1 + tanh(z)) as x / (1 + e^-2z), which does not cancel to 0 where z << 0
  'gelu_tanh': lambda x: x / (1 + np.exp(-2 * np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))),
  'silu': lambda x: x / (1 + np.exp(-x)),
}
KINDS = sorted(kernel.KINDS)


def bf16(x) -> jax.Array:
  return jnp.asarray(x, jnp.float32).astype(jnp.bfloat16)


def as64(x) -> np.ndarray:
  return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def values(shape, scale=3.0, seed=0) -> jax.Array:
  return bf16(np.random.default_rng(seed).normal(0.0, scale, shape))


def ulps_from_truth(got, truth) -> np.ndarray:
  """How many bfloat16 steps (at the truth's binade) ``got`` lies from ``truth``; where the truth is below 1e-30 (far
  in a tail, where float32's exponential saturates), 0 if ``got`` is too."""
  got = as64(got)
  tiny = np.abs(truth) < 1e-30
  step = np.exp2(np.floor(np.log2(np.where(tiny, 1.0, np.abs(truth)))) - 7)
  return np.where(tiny, np.where(np.abs(got) < 1e-30, 0.0, np.inf), np.abs(got - truth) / step)


@pytest.mark.parametrize('name', KINDS)
@pytest.mark.parametrize('shape', [(1, 1536), (3, 1537), (2, 5, 7), (1, 1)], ids=str)
def test_kernel_is_the_float64_activation_rounded_once(name, shape):
  x = values(shape)
  got = kernel.activation(name, x)
  assert got.shape == shape and got.dtype == jnp.bfloat16
  truth = TRUTH[name](as64(x))
  off = ulps_from_truth(got, truth)
  # float32 arithmetic can only move a value that lies next to a bf16 rounding boundary, and by one step
  assert off.max() <= 1.0, off.max()
  assert np.mean(off > 0.5) <= 0.002


@pytest.mark.parametrize('name', KINDS)
def test_gated_kernel_multiplies_in_float32_then_rounds(name):
  a, b = values((3, 1537), seed=1), values((3, 1537), scale=1.0, seed=2)
  got = kernel.activation(name, a, b)
  truth = TRUTH[name](as64(a)) * as64(b)
  assert ulps_from_truth(got, truth).max() <= 1.0
  # not the ungated activation, nor one rounded before the multiply
  assert not np.array_equal(np.asarray(got), np.asarray(kernel.activation(name, a)))


@pytest.mark.parametrize('name', KINDS)
def test_kernel_matches_xla_reference(name):
  """Off by at most one bf16 step from XLA's float32 activation, and only at a few values: XLA's tanh is a few
  float32 ulp off, and in the far negative tail it saturates (1 + tanh(z) = 0 below z = -7.9)."""
  x = values((4, 3001))
  got, xla = as64(kernel.activation(name, x)), as64(activations.reference(name, x))
  np.testing.assert_allclose(got, xla, rtol=2**-8, atol=1e-6)
  bulk = np.abs(as64(x)) < 3
  assert np.mean(got[bulk] != xla[bulk]) <= 0.01


@pytest.mark.parametrize('name', KINDS)
def test_tails_zero_and_nan(name):
  x = bf16([[-1e4, -90.0, -0.0, 0.0, 1e4, np.nan]])
  got = as64(kernel.activation(name, x))[0]
  assert np.all(np.abs(got[:2]) < 1e-30)  # the activation vanishes far below zero
  np.testing.assert_array_equal(got[2:5], as64(x)[0, 2:5] * [0, 0, 1])
  assert np.isnan(got[5])


def test_kernel_refuses_what_it_does_not_compute():
  x = values((2, 3))
  with pytest.raises(ValueError, match='not .relu.'):
    kernel.activation('relu', x)
  with pytest.raises(ValueError, match='bfloat16'):
    kernel.activation('silu', x.astype(jnp.float32))
  with pytest.raises(ValueError, match='one shape'):
    kernel.activation('silu', x, values((3, 2)))


@pytest.mark.parametrize(
  'name, dtype, size, expected',
  [
    ('gelu_tanh', jnp.bfloat16, 3072, True),
    ('silu', jnp.bfloat16, activations.KERNEL_MAX_VALUES, True),
    ('silu', jnp.bfloat16, activations.KERNEL_MAX_VALUES + 1, False),  # worth XLA's threads
    ('gelu_tanh', jnp.float32, 3072, False),  # XLA keeps float32's loop on one thread
    ('relu', jnp.bfloat16, 3072, False),
    ('gelu', jnp.bfloat16, 3072, False),
  ],
)
def test_activate_takes_the_kernel_for_few_bf16_values(name, dtype, size, expected):
  x = jnp.zeros((1, size), dtype)
  assert activations.kernel_takes(name, x) is expected
  hlo = jax.jit(lambda x: activations.activate(name, x)).lower(x).compile().as_text()
  assert (kernel.TARGET in hlo) is expected


@pytest.mark.parametrize('name', KINDS)
@pytest.mark.parametrize('gated', [False, True], ids=['plain', 'gated'])
def test_activate_derivatives_are_the_references(name, gated):
  """Forward and reverse mode through the kernel give the float32 reference's derivatives."""
  x, t = values((2, 5, 7), seed=3), values((2, 5, 7), scale=1.0, seed=4)
  weights = values((2, 5, 7), scale=1.0, seed=5).astype(jnp.float32)

  def loss(f):
    return lambda x, t: jnp.sum(f(name, x, t if gated else None).astype(jnp.float32) * weights)

  assert activations.kernel_takes(name, x)
  ours = jax.grad(loss(activations.activate), argnums=(0, 1))(x, t)
  theirs = jax.grad(loss(activations.reference), argnums=(0, 1))(x, t)
  for o, r in zip(ours, theirs):
    np.testing.assert_array_equal(np.asarray(o, np.float32), np.asarray(r, np.float32))
  times, tangent = (t if gated else None), values((2, 5, 7), scale=1.0, seed=6)
  _, ours_t = jax.jvp(lambda x: activations.activate(name, x, times), (x,), (tangent,))
  _, theirs_t = jax.jvp(lambda x: activations.reference(name, x, times), (x,), (tangent,))
  np.testing.assert_array_equal(np.asarray(ours_t, np.float32), np.asarray(theirs_t, np.float32))


def test_vmapped_kernel_is_one_call_over_the_stack():
  x, t = values((3, 2, 11), seed=7), values((3, 2, 11), seed=8)
  mapped = jax.jit(jax.vmap(lambda a, b: kernel.activation('silu', a, b)))
  assert mapped.lower(x, t).compile().as_text().count(f'custom_call_target="{kernel.TARGET}"') == 1
  stacked = mapped(x, t)
  for i in range(3):
    np.testing.assert_array_equal(
      np.asarray(stacked[i]), np.asarray(kernel.activation('silu', x[i], t[i]))
    )


def test_bf16_decoding_program_calls_the_kernel():
  hlo = greedy_generate_hlo(dtype=jnp.bfloat16, activation='gelu_tanh')
  assert kernel.TARGET in hlo


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float32], ids=['bf16', 'f32'])
def test_relu_tangent_from_its_output_is_the_references(dtype):
  """Values and derivatives of every order as ``reference('relu')``'s, zeros of both signs included (no tangent
  passes at 0, as ``jax.nn.relu``'s)."""
  x = values((3, 7), seed=9).astype(dtype).at[0, :3].set(jnp.asarray([0.0, -0.0, 1e-30], dtype))
  weights = values((3, 7), scale=1.0, seed=10).astype(jnp.float32)

  def loss(f):
    return lambda x: jnp.sum(f('relu', x).astype(jnp.float32) * weights)

  np.testing.assert_array_equal(
    as64(activations.activate('relu', x)), as64(activations.reference('relu', x))
  )
  ours, theirs = jax.grad(loss(activations.activate))(x), jax.grad(loss(activations.reference))(x)
  np.testing.assert_array_equal(as64(ours), as64(theirs))
  assert as64(ours)[0, 0] == as64(ours)[0, 1] == 0.0 and as64(ours)[0, 2] == as64(weights)[0, 2]
  tangent = values((3, 7), scale=1.0, seed=11).astype(dtype)
  for f in (activations.activate, activations.reference):
    _, t = jax.jvp(functools.partial(f, 'relu'), (x,), (tangent,))
    np.testing.assert_array_equal(as64(t), as64(tangent) * (as64(x) > 0))
  curvature = jax.jvp(jax.grad(loss(activations.activate)), (x,), (tangent,))[1]
  assert not np.any(as64(curvature))
