"""``modules.cross_entropy``: the CPU kernel's loss terms, argmax and derivatives (reverse, forward, second order,
vmap) against a float64 reference and against XLA's path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax.kernels import cross_entropy as kernel
from transformer_jax.modules.cross_entropy import softmax_cross_entropy


def reference(x, t):
  """float64 ``nll``, ``uniform`` and the softmax, by numpy."""
  x = np.asarray(x, np.float64)
  shifted = x - x.max(-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  nll = -np.take_along_axis(log_probs, np.asarray(t)[..., None], -1)[..., 0]
  return nll, -log_probs.mean(-1), np.exp(log_probs)


def case(name):
  """(logits, targets): one situation each, odd sizes throughout."""
  key_x, key_t = jax.random.split(jax.random.key(len(name)))
  if name == 'batch_positions':  # (B, T, V) of a language model
    shape, scale = (2, 5, 1031), 3.0
  elif name == 'gpt2_vocab':
    shape, scale = (3, 50257), 2.0
  elif name == 'tiny_vocab':
    shape, scale = (7, 3), 1.0
  elif name == 'large_logits':  # exp(x) alone would overflow
    shape, scale = (4, 333), 60.0
  else:
    raise KeyError(name)
  x = jax.random.normal(key_x, shape) * scale
  t = jax.random.randint(key_t, shape[:-1], 0, shape[-1])
  if name == 'batch_positions':  # the first and last token as targets
    t = t.at[0, 0].set(0).at[1, 4].set(shape[-1] - 1)
  return x, t


CASES = ['batch_positions', 'gpt2_vocab', 'tiny_vocab', 'large_logits']


def smoothed(x, t, w=0.1):
  out = softmax_cross_entropy(x, t)
  return ((1 - w) * out.nll + w * out.uniform).sum()


def on_xla(monkeypatch, fn, *args):
  monkeypatch.setattr(kernel, 'available', lambda: False)
  return jax.jit(fn)(*args)


@pytest.mark.parametrize('name', CASES)
def test_terms_and_argmax_equal_a_float64_reference(name):
  x, t = case(name)
  out = jax.jit(softmax_cross_entropy)(x, t)
  nll, uniform, _ = reference(x, t)
  np.testing.assert_allclose(out.nll, nll, rtol=1e-5, atol=2e-5)
  np.testing.assert_allclose(out.uniform, uniform, rtol=1e-5, atol=2e-5)
  np.testing.assert_array_equal(out.predicted, jnp.argmax(x, -1))
  assert out.nll.shape == out.predicted.shape == t.shape and out.predicted.dtype == jnp.int32


@pytest.mark.parametrize('name', CASES)
def test_gradient_equals_a_float64_reference(name):
  x, t = case(name)
  w = 0.1
  grad = jax.jit(jax.grad(smoothed))(x, t)
  _, _, probs = reference(x, t)
  onehot = np.zeros(x.shape)
  np.put_along_axis(onehot, np.asarray(t)[..., None], 1.0, axis=-1)
  expected = probs - (1 - w) * onehot - w / x.shape[-1]
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)


def test_every_derivative_equals_xla_s_path(monkeypatch):
  """Forward mode, a Hessian-vector product and a gradient of a gradient norm go through the kernel's rules."""
  x, t = case('batch_positions')
  v = jax.random.normal(jax.random.key(9), x.shape)
  derivatives = {
    'jvp': lambda x: jax.jvp(lambda z: smoothed(z, t), (x,), (v,))[1],
    'hvp': lambda x: jax.jvp(jax.grad(lambda z: smoothed(z, t)), (x,), (v,))[1],
    'grad_of_grad_norm': jax.grad(lambda x: (jax.grad(lambda z: smoothed(z, t))(x) ** 2).sum()),
  }
  ours = {name: jax.jit(fn)(x) for name, fn in derivatives.items()}
  for name, fn in derivatives.items():  # the primal on each path is the forward kernel's
    assert kernel.FORWARD in jax.jit(fn).lower(x).compile().as_text(), name
  for name, fn in derivatives.items():
    np.testing.assert_allclose(
      ours[name], on_xla(monkeypatch, fn, x), rtol=1e-5, atol=1e-7, err_msg=name
    )


def test_vmap_over_a_middle_axis_equals_the_whole():
  x, t = case('batch_positions')
  whole = jax.jit(softmax_cross_entropy)(x, t)
  mapped = jax.jit(jax.vmap(softmax_cross_entropy, in_axes=(1, 1), out_axes=1))(x, t)
  for a, b in zip(mapped, whole):
    np.testing.assert_array_equal(a, b)
  grads = jax.vmap(jax.grad(smoothed), in_axes=(1, 1), out_axes=1)(x, t)
  np.testing.assert_allclose(grads, jax.grad(smoothed)(x, t), rtol=1e-6, atol=1e-8)


def test_nan_logits_and_a_target_out_of_range_give_nan_in_their_rows_only(monkeypatch):
  x, t = case('tiny_vocab')
  x = x.at[2, 1].set(jnp.nan)
  t = t.at[4].set(3)  # the vocabulary is 3
  for out in (
    jax.jit(softmax_cross_entropy)(x, t),
    on_xla(monkeypatch, softmax_cross_entropy, x, t),
  ):
    bad = np.isnan(np.asarray(out.nll))
    np.testing.assert_array_equal(bad, np.isin(np.arange(7), [2, 4]))
    assert int(out.predicted[2]) == 1  # the NaN, as jnp.argmax finds it


def test_xla_path_gives_the_same_terms(monkeypatch):
  x, t = case('batch_positions')
  ours = jax.jit(softmax_cross_entropy)(x, t)
  xla = on_xla(monkeypatch, softmax_cross_entropy, x, t)
  np.testing.assert_allclose(ours.nll, xla.nll, rtol=1e-5)
  np.testing.assert_allclose(ours.uniform, xla.uniform, rtol=1e-5)
  np.testing.assert_array_equal(ours.predicted, xla.predicted)


def test_a_training_gradient_writes_no_softmax_of_its_own():
  """The compiled gradient calls both kernels; XLA's loss would write ``exp(x - max)`` as an ``f32[B, T, V]``."""
  x, t = case('batch_positions')
  hlo = jax.jit(jax.grad(smoothed)).lower(x, t).compile().as_text()
  assert kernel.FORWARD in hlo and kernel.BACKWARD in hlo
  assert 'exponential' not in hlo


@pytest.mark.parametrize('x', [jnp.zeros((2, 5), jnp.bfloat16), jnp.zeros((3, 0)), jnp.zeros(())])
def test_kernel_refuses_what_it_cannot_take(x):
  with pytest.raises(ValueError, match='float32 with a non-empty last axis'):
    kernel.forward(x, jnp.zeros(x.shape[:-1], jnp.int32))
