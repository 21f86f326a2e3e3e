"""The fused CPU attention kernel (``kernels/attention.cc``) against the einsum path and a float64 reference."""

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


def value_and_grads(fn, q, k, v, w):
  loss = lambda q, k, v: (fn(q, k, v).astype(jnp.float32) * w).sum()  # noqa: E731
  out = fn(q, k, v)
  return out, jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def assert_matches_einsum_path(q, k, v, w, mask):
  """The kernel's output and gradients against the einsum path's, float32 products at full precision."""
  with jax.default_matmul_precision('highest'):
    ref_out, ref_grads = value_and_grads(
      lambda q, k, v: dot_product_attention(q, k, v, mask, implementation='einsum'), q, k, v, w
    )
    out, grads = value_and_grads(lambda q, k, v: kernel_attention(q, k, v, mask), q, k, v, w)
  np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=1e-5)
  for name, got, want in zip('qkv', grads, ref_grads):
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5, err_msg=f'd{name}')


@pytest.mark.parametrize('mask_kind', ['none', 'causal', 'padding', 'per_head'])
@pytest.mark.parametrize('shape', list(SHAPES), ids=list(SHAPES))
def test_float32_matches_einsum_path(shape, mask_kind):
  b, t, s, h, g, k = SHAPES[shape]
  if mask_kind == 'padding':
    b = 3
  q, kk, v, w = operands(b, t, s, h, g, k)
  mask = make_mask(mask_kind, b, t, s, h)
  assert_matches_einsum_path(q, kk, v, w, mask)


def test_float32_matches_float64_reference():
  b, t, s, h, g, k = SHAPES['grouped']
  q, kk, v, _ = operands(b, t, s, h, g, k)
  mask = make_mask('per_head', b, t, s, h)
  qn, kn, vn = (np.asarray(x, np.float64) for x in (q, kk, v))
  kn, vn = (
    np.repeat(x, h // g, axis=2) for x in (kn, vn)
  )  # query head i meets key head i // (H / G)
  logits = np.einsum('bthk,bshk->bhts', qn, kn) / math.sqrt(k)
  logits = np.where(np.asarray(mask), logits, -np.inf)
  top = logits.max(-1, keepdims=True)
  weights = np.exp(logits - np.where(np.isfinite(top), top, 0))
  weights = weights / np.maximum(weights.sum(-1, keepdims=True), 1e-300)
  want = np.einsum('bhts,bshk->bthk', weights, vn)
  np.testing.assert_allclose(kernel_attention(q, kk, v, mask), want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize('shape', ['causal_long', 'one_row_long'])
def test_a_window_one_key_past_each_vector_boundary(shape):
  """The kernel takes only the columns between a block's first and last visible keys, widened to whole vectors
  (8 or 16 floats). Row t sees keys 16 (t % 4 + 1) - 1 to 16 (t % 4 + 2): one key before a boundary and one key
  after one, so a span one short at either end would leave a visible key out."""
  b, t, s, h, g, k = SHAPES[shape]
  q, kk, v, w = operands(b, t, s, h, g, k)
  first = 16 * (jnp.arange(t) % 4 + 1) - 1  # (T,)
  keys = jnp.arange(s)[None]  # (1, S)
  mask = ((keys >= first[:, None]) & (keys <= first[:, None] + 17))[None, None]  # (1, 1, T, S)
  assert_matches_einsum_path(q, kk, v, w, mask)


def test_a_decoding_row_split_over_threads_with_heads_seeing_different_parts():
  """A long decoding row is cut into parts of its keys that run on the pool's threads, each part's softmax relative
  to its own maximum. Here head 0 sees only keys in the first part, head 1 only in the last, head 2 none and head 3
  all: parts where a head sees nothing must add nothing, and the others be rescaled to the largest maximum."""
  b, t, s, h, g, k = SHAPES['one_row_long']
  q, kk, v, w = operands(b, t, s, h, g, k)
  keys = jnp.arange(s)
  mask = jnp.stack([keys < 10, keys >= s - 5, jnp.zeros(s, bool), jnp.ones(s, bool)])  # (H, S)
  assert_matches_einsum_path(q, kk, v, w, mask[None, :, None, :])


@pytest.mark.parametrize('shape', ['tiny', 'one_row'])
def test_fully_masked_rows_give_zeros_not_nan(shape):
  b, t, s, h, g, k = SHAPES[shape]
  q, kk, v, w = operands(b, t, s, h, g, k)
  mask = jnp.zeros((b, 1, 1, s), bool).at[1].set(True)  # sequence 0 sees nothing
  out, grads = value_and_grads(lambda q, k, v: kernel_attention(q, k, v, mask), q, kk, v, w)
  assert np.all(np.asarray(out[0]) == 0) and np.all(np.isfinite(out))
  for grad in grads:
    assert np.all(np.asarray(grad[0]) == 0) and np.all(np.isfinite(grad))
  assert np.any(np.asarray(out[1]) != 0)


@pytest.mark.parametrize('mask_kind', ['causal', 'per_head'])
@pytest.mark.parametrize('shape', list(SHAPES), ids=list(SHAPES))
def test_bfloat16_close_to_float32_of_the_same_inputs(shape, mask_kind):
  """bf16 attention against the float32 kernel on the same (widened) inputs, as relative error norms. Where the CPU
  has AVX512-BF16 the products take bf16 operands, the softmax weights and their gradient rounded to bf16 as XLA's
  einsum path rounds them (whose own errors here are 2-3.5e-3 for the output, 2.4-4.5e-3 for the gradients); a
  misplaced pair, scale or padding gives errors of order 1."""
  b, t, s, h, g, k = SHAPES[shape]
  q, kk, v, w = operands(b, t, s, h, g, k, jnp.bfloat16)
  mask = make_mask(mask_kind, b, t, s, h)
  out, grads = value_and_grads(lambda q, k, v: kernel_attention(q, k, v, mask), q, kk, v, w)
  assert out.dtype == jnp.bfloat16 and all(x.dtype == jnp.bfloat16 for x in grads)
  wide = [x.astype(jnp.float32) for x in (q, kk, v)]
  with jax.default_matmul_precision('highest'):
    ref_out, ref_grads = value_and_grads(lambda q, k, v: kernel_attention(q, k, v, mask), *wide, w)
  for name, got, want, bound in zip(
    ['out', 'dq', 'dk', 'dv'], [out, *grads], [ref_out, *ref_grads], [2**-8] + [1e-2] * 3
  ):
    error = np.linalg.norm(np.asarray(got, np.float32) - want) / np.linalg.norm(want)
    assert error < bound, f'{name}: relative error {error:.3g}'


def hlo(fn, *args):
  return jax.jit(fn).lower(*args).compile().as_text()


def test_default_path_takes_the_kernel_decoding_included():
  q, k, v, _ = operands(2, 5, 7, 3, 3, 4)
  mask = make_mask('causal', 2, 5, 7, 3)
  assert fused.FORWARD in hlo(lambda q, k, v: dot_product_attention(q, k, v, mask), q, k, v)
  assert fused.FORWARD not in hlo(
    lambda q, k, v: dot_product_attention(q, k, v, mask, implementation='einsum'), q, k, v
  )
  step = q[:, :1]  # one query row: a decoding step
  assert fused.FORWARD in hlo(lambda q, k, v: dot_product_attention(q, k, v), step, k, v)
  grad = jax.grad(lambda q: dot_product_attention(q, k, v, mask).sum())
  assert fused.BACKWARD in hlo(grad, q)


@pytest.mark.parametrize(
  'given, kept',
  [
    ((5, 7), (1, 1, 5, 7)),  # a causal mask without leading axes
    ((1, 1, 5, 7), (1, 1, 5, 7)),
    ((2, 1, 1, 7), (2, 1, 1, 7)),  # padding: one row per sequence
    ((2, 3, 5, 1), (2, 3, 5, 7)),  # the key axis is always whole
  ],
  ids=['causal_2d', 'causal', 'padding', 'key_axis_broadcast'],
)
def test_kernel_mask_keeps_broadcast_axes_and_the_values(given, kept):
  mask = jax.random.bernoulli(jax.random.key(3), 0.5, given)
  got = fused.kernel_mask(mask, 2, 3, 5, 7)
  assert got.shape == kept and got.dtype == jnp.uint8
  want = np.broadcast_to(np.asarray(mask).reshape((1,) * (4 - mask.ndim) + given), kept)
  np.testing.assert_array_equal(got, want.astype(np.uint8))


def test_kernel_mask_of_none_sees_every_key():
  got = fused.kernel_mask(None, 2, 3, 5, 7)
  assert got.shape == (1, 1, 1, 7) and np.all(np.asarray(got) == 1)
