"""The attention kernel's primitives beyond reverse mode: forward mode, second derivatives, the log-sum-exp's own
derivatives, and vmap folded into the batch. References: the einsum path (XLA's ops) and ``jax.nn.logsumexp``."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_helpers import SHAPES, kernel_attention, make_mask, operands

from transformer_jax.kernels import attention as fused
from transformer_jax.modules import dot_product_attention

pytestmark = pytest.mark.skipif(
  jax.default_backend() != 'cpu' or not fused.available(), reason='the CPU kernel is not built here'
)


def einsum_attention(q, k, v, mask):
  return dot_product_attention(q, k, v, mask, implementation='einsum')


def tangents_like(*xs, seed=11):
  keys = jax.random.split(jax.random.key(seed), len(xs))
  return tuple(jax.random.normal(key, x.shape).astype(x.dtype) for key, x in zip(keys, xs))


def compiled_text(fn, *args):
  return jax.jit(fn).lower(*args).compile().as_text()


def assert_trees_close(got, want, atol, rtol=1e-5):
  for i, (a, b) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)):
    np.testing.assert_allclose(a, b, atol=atol, rtol=rtol, err_msg=f'leaf {i}')


# per_head has a query row with no visible key; the grouped shape meets one key/value head with several query heads;
# one_row is a decoding step's path
@pytest.mark.parametrize(
  'shape, mask_kind', [('tiny', 'per_head'), ('grouped', 'causal'), ('one_row', 'per_head')]
)
def test_forward_mode_matches_einsum_path(shape, mask_kind):
  b, t, s, h, g, k = SHAPES[shape]
  q, kk, v, _ = operands(b, t, s, h, g, k)
  mask = make_mask(mask_kind, b, t, s, h)
  tangents = tangents_like(q, kk, v)
  ours = lambda q, k, v: kernel_attention(q, k, v, mask)  # noqa: E731
  assert fused.FORWARD in compiled_text(
    lambda q, k, v: jax.jvp(ours, (q, k, v), tangents), q, kk, v
  )
  got = jax.jvp(ours, (q, kk, v), tangents)
  want = jax.jvp(lambda q, k, v: einsum_attention(q, k, v, mask), (q, kk, v), tangents)
  assert_trees_close(got, want, atol=2e-5)


def test_jacobian_forward_equals_reverse():
  b, t, s, h, g, k = SHAPES['tiny']
  q, kk, v, _ = operands(b, t, s, h, g, k)
  mask = make_mask('per_head', b, t, s, h)
  ours = lambda q, k, v: kernel_attention(q, k, v, mask)  # noqa: E731
  assert_trees_close(
    jax.jacfwd(ours, (0, 1, 2))(q, kk, v), jax.jacrev(ours, (0, 1, 2))(q, kk, v), atol=1e-5
  )


@pytest.mark.parametrize('shape', ['multi_query'])  # one key/value head for four query heads
def test_second_derivatives_match_einsum_path(shape):
  """Forward over reverse (a Hessian-vector product: the backward primitive's derivative) and reverse over reverse
  (the gradient of the gradient's size: the backward primitive transposed into the tangent primitive)."""
  b, t, s, h, g, k = SHAPES[shape]
  q, kk, v, w = operands(b, t, s, h, g, k)
  mask = make_mask('per_head', b, t, s, h)
  tangents = tangents_like(q, kk, v)

  def derivatives(attention):
    loss = lambda q, k, v: jnp.sum(attention(q, k, v, mask) ** 2 * w)  # noqa: E731
    grad = jax.grad(loss, (0, 1, 2))
    hvp = jax.jvp(grad, (q, kk, v), tangents)[1]
    grad_of_grad = jax.grad(lambda *x: sum(jnp.sum(d**2) for d in grad(*x)), (0, 1, 2))(q, kk, v)
    return hvp, grad_of_grad

  assert_trees_close(derivatives(kernel_attention), derivatives(einsum_attention), atol=1e-4)


def test_a_hidden_logit_far_above_the_visible_ones_leaves_every_derivative_finite():
  """The XLA formulas mask before the exponent: a masked key whose logit exceeds the row's log-sum-exp by more than
  float32's exponent range must give zero weight and zero derivatives, not inf x 0 = NaN."""
  b, t, s, h, g, k = SHAPES['tiny']
  q, kk, v, w = operands(b, t, s, h, g, k)
  q = jnp.abs(q) + 1.0
  kk = kk.at[:, -1].set(60.0)  # the last key: logits of at least 0.5 x 60 x 4 = 120
  mask = (jnp.arange(s) < s - 1)[None, None, None, :]  # ... and always hidden

  def derivatives(attention):  # reverse over reverse: the formulas' own gradients
    loss = lambda q, k, v: jnp.sum(attention(q, k, v, mask) ** 2 * w)  # noqa: E731
    grad = jax.grad(loss, (0, 1, 2))
    return jax.grad(lambda *x: sum(jnp.sum(d**2) for d in grad(*x)), (0, 1, 2))(q, kk, v)

  got = derivatives(kernel_attention)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(got))
  assert_trees_close(got, derivatives(einsum_attention), atol=1e-4)


def masked_logsumexp(q, k, mask):
  """Each row's log-sum-exp by XLA, ``(B, H, T)`` (the grouped key/value heads repeated)."""
  repeated = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2)
  logits = jnp.einsum('bthk,bshk->bhts', q, repeated) / math.sqrt(q.shape[-1])
  return jax.nn.logsumexp(jnp.where(mask, logits, -jnp.inf), axis=-1)


@pytest.mark.parametrize('shape', ['tiny', 'multi_query'])
def test_the_log_sum_exp_and_its_derivatives(shape):
  """The forward primitive's saved log-sum-exp, its tangent (from the JVP rule) and that tangent's transpose (XLA's
  ops added to the backward kernel's) against ``jax.nn.logsumexp``; a sign flip in either fails it."""
  b, t, s, h, g, k = SHAPES[shape]
  q, kk, v, w = operands(b, t, s, h, g, k)
  w = w[..., 0].transpose(0, 2, 1)  # (B, H, T)
  mask = make_mask('causal', b, t, s, h)  # every row sees a key: a finite log-sum-exp
  kernel_mask = fused.kernel_mask(mask, b, h, t, s)
  ours = lambda q, k: fused.forward_p.bind(q, k, v, kernel_mask, scale=1 / math.sqrt(k.shape[-1]))[
    1
  ]  # noqa: E731
  reference = lambda q, k: masked_logsumexp(q, k, mask)  # noqa: E731
  tangents = tangents_like(q, kk)

  def derivatives(lse):
    value, tangent = jax.linearize(lse, q, kk)
    return value, tangent(*tangents), jax.linear_transpose(tangent, q, kk)(w)

  assert_trees_close(derivatives(ours), derivatives(reference), atol=1e-5)


def test_bfloat16_tangent_is_bfloat16_and_close_to_float32():
  b, t, s, h, g, k = SHAPES['grouped']
  q, kk, v, _ = operands(b, t, s, h, g, k, jnp.bfloat16)
  mask = make_mask('causal', b, t, s, h)
  tangents = tangents_like(q, kk, v)
  ours = lambda q, k, v: kernel_attention(q, k, v, mask)  # noqa: E731
  _, tangent = jax.jvp(ours, (q, kk, v), tangents)
  wide = lambda xs: [x.astype(jnp.float32) for x in xs]  # noqa: E731
  _, want = jax.jvp(ours, tuple(wide((q, kk, v))), tuple(wide(tangents)))
  assert tangent.dtype == jnp.bfloat16
  # float32 inside, one rounding at the end
  np.testing.assert_allclose(np.asarray(tangent, np.float32), want, rtol=2**-8, atol=1e-5)


def stacked_operands(shape):
  """Two examples of (q, k, v), the second twice the first, with a padding mask of their own each: ``(2, B, ...)``."""
  b, t, s, h, g, k = SHAPES[shape]
  q, kk, v, w = operands(b, t, s, h, g, k)
  stack = lambda x: jnp.stack([x, 2 * x])  # noqa: E731
  lengths = jnp.array([[s, 3], [2, 0]])  # (2, B): one sequence with no visible key
  padding = (jnp.arange(s) < lengths[..., None])[:, :, None, None, :]  # (2, B, 1, 1, S)
  return stack(q), stack(kk), stack(v), stack(w), padding


@pytest.mark.parametrize('shape', ['tiny', 'grouped', 'one_row'])
@pytest.mark.parametrize('mask_kind', ['shared', 'per_example'])
def test_vmap_is_one_call_for_all_examples(shape, mask_kind):
  q, k, v, _, padding = stacked_operands(shape)
  b, t, s, h, *_ = SHAPES[shape]
  if mask_kind == 'shared':
    mask, in_axes = make_mask('causal', b, t, s, h), (0, 0, 0, None)
  else:
    mask, in_axes = padding, (0, 0, 0, 0)
  batched = jax.vmap(kernel_attention, in_axes=in_axes)
  text = compiled_text(batched, q, k, v, mask)
  assert text.count(f'custom_call_target="{fused.FORWARD}"') == 1 and ' while(' not in text
  got = batched(q, k, v, mask)
  for i in range(2):
    example_mask = mask if mask_kind == 'shared' else mask[i]
    want = kernel_attention(q[i], k[i], v[i], example_mask)
    np.testing.assert_allclose(got[i], want, rtol=1e-6, atol=1e-6)


def test_per_example_gradients_under_vmap():
  q, k, v, w, padding = stacked_operands('grouped')
  loss = lambda q, k, v, w, m: jnp.sum(kernel_attention(q, k, v, m) * w)  # noqa: E731
  per_example = jax.vmap(jax.grad(loss, (0, 1, 2)))
  text = compiled_text(per_example, q, k, v, w, padding)
  assert text.count(f'custom_call_target="{fused.BACKWARD}"') == 1
  got = per_example(q, k, v, w, padding)
  for i in range(2):
    want = jax.grad(loss, (0, 1, 2))(q[i], k[i], v[i], w[i], padding[i])
    assert_trees_close([x[i] for x in got], want, atol=1e-6)
