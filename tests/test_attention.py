"""Scaled dot-product attention and multi-head attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax import masks
from transformer_jax.modules import MultiHeadAttention, dot_product_attention

B, T, S, H, K = 2, 5, 7, 3, 4


def qkv(seed=0, t=T, s=S):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  return (
    jax.random.normal(k1, (B, t, H, K)),
    jax.random.normal(k2, (B, s, H, K)),
    jax.random.normal(k3, (B, s, H, K)),
  )


def reference_attention(q, k, v, mask):
  """Plain numpy softmax attention, fully masked rows -> 0."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum('bthk,bshk->bhts', q, k) / np.sqrt(q.shape[-1])
  mask = np.broadcast_to(np.asarray(mask), logits.shape)
  logits = np.where(mask, logits, -np.inf)
  with np.errstate(invalid='ignore'):
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
  w = np.nan_to_num(w)
  return np.einsum('bhts,bshk->bthk', w, v), w


SRC_IDS = jnp.array([[3, 4, 5, 6, 0, 0, 0], [1, 2, 3, 4, 5, 6, 7]])
MASKS = {
  'none': None,
  'padding': masks.padding_mask(SRC_IDS, 0),
  'per_head': jax.random.bernoulli(jax.random.key(3), 0.6, (B, H, T, S)),
  'fully_masked_row': jnp.ones((B, 1, T, S), bool).at[0, 0, 2].set(False),
}


@pytest.mark.parametrize('mask', MASKS.values(), ids=MASKS.keys())
@pytest.mark.parametrize(
  'fast, implementation',
  [(True, None), (True, 'xla'), (False, None)],
  ids=['einsum', 'jax_xla', 'weights_path'],
)
def test_attention_matches_reference(mask, fast, implementation):
  q, k, v = qkv()
  got = dot_product_attention(q, k, v, mask, return_weights=not fast, implementation=implementation)
  out = got if fast else got[0]
  ref_out, ref_w = reference_attention(
    q, k, v, np.ones((1, 1, 1, 1), bool) if mask is None else mask
  )
  assert out.shape == (B, T, H, K)
  np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=1e-5)
  if not fast:
    assert got[1].shape == (B, H, T, S)
    np.testing.assert_allclose(got[1], ref_w, atol=1e-6)


def test_weights_sum_to_one_over_unmasked_keys_and_zero_elsewhere():
  q, k, v = qkv(1)
  mask = MASKS['per_head'] & MASKS['padding']
  _, w = dot_product_attention(q, k, v, mask, return_weights=True)
  full = np.broadcast_to(mask, w.shape)
  assert np.all(np.asarray(w)[~full] == 0)
  row_has_key = full.any(-1)
  np.testing.assert_allclose(np.asarray(w).sum(-1)[row_has_key], 1.0, atol=1e-6)


@pytest.mark.parametrize('implementation', [None, 'xla'])
def test_fully_masked_row_gives_zeros_not_nan_in_value_and_gradient(implementation):
  q, k, v = qkv(2)
  mask = MASKS['fully_masked_row']

  def output(q, fast):
    if fast:
      return dot_product_attention(q, k, v, mask, implementation=implementation)
    return dot_product_attention(q, k, v, mask, return_weights=True)[0]

  for fast in (True, False):
    out = output(q, fast)
    assert np.isfinite(np.asarray(out)).all()
    assert np.all(np.asarray(out)[0, 2] == 0)
    grad = jax.grad(lambda q, fast=fast: jnp.sum(output(q, fast) ** 2))(q)
    assert np.isfinite(np.asarray(grad)).all()
    assert np.all(np.asarray(grad)[0, 2] == 0)


def test_padding_keys_never_influence_the_output():
  q, k, v = qkv(4)
  mask = MASKS['padding']
  pad = np.asarray(SRC_IDS == 0)
  noise = jax.random.normal(jax.random.key(9), k.shape) * 100
  k2 = jnp.where(pad[:, :, None, None], noise, k)
  v2 = jnp.where(pad[:, :, None, None], noise, v)
  for fast in (True, False):
    a = dot_product_attention(q, k, v, mask, return_weights=not fast)
    b = dot_product_attention(q, k2, v2, mask, return_weights=not fast)
    np.testing.assert_allclose(a if fast else a[0], b if fast else b[0], atol=1e-6)


def test_bf16_inputs_keep_float32_weights():
  q, k, v = (x.astype(jnp.bfloat16) for x in qkv(5))
  out, w = dot_product_attention(q, k, v, MASKS['padding'], return_weights=True)
  assert out.dtype == jnp.bfloat16 and w.dtype == jnp.float32
  fast = dot_product_attention(q, k, v, MASKS['padding'])
  np.testing.assert_allclose(np.asarray(fast, np.float32), np.asarray(out, np.float32), atol=2e-2)


def test_attention_dropout_is_reproducible_and_needs_a_key():
  q, k, v = qkv(6)
  kw = dict(dropout_rate=0.5, deterministic=False, return_weights=True)
  a = dot_product_attention(q, k, v, None, dropout_rng=jax.random.key(1), **kw)[0]
  b = dot_product_attention(q, k, v, None, dropout_rng=jax.random.key(1), **kw)[0]
  c = dot_product_attention(q, k, v, None, dropout_rng=jax.random.key(2), **kw)[0]
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  with pytest.raises(ValueError, match='dropout_rng'):
    dot_product_attention(q, k, v, None, dropout_rate=0.5, deterministic=False)


@pytest.mark.parametrize(
  'shape,message',
  [
    ((B, T, S), 'not broadcastable'),
    ((B, 2, T, S), 'not broadcastable'),
    ((B, 1, T, S + 1), 'not broadcastable'),
    ((3, 1, 1, S), 'not broadcastable'),
  ],
  ids=['three_dims', 'wrong_heads', 'wrong_keys', 'wrong_batch'],
)
def test_mask_of_wrong_shape_is_rejected(shape, message):
  q, k, v = qkv()
  with pytest.raises(ValueError, match=message):
    dot_product_attention(q, k, v, jnp.ones(shape, bool))


def test_non_boolean_mask_is_rejected():
  q, k, v = qkv()
  with pytest.raises(TypeError, match='boolean'):
    dot_product_attention(q, k, v, jnp.ones((B, 1, 1, S), jnp.float32))


def test_models_check_their_masks_once_where_inputs_enter(monkeypatch):
  """The mask a model builds from checked inputs is not checked again in every layer; attention used alone checks
  its mask."""
  from transformer_jax import GPT, GPTConfig
  from transformer_jax.modules import attention

  calls = []
  checker = attention.check_attention_mask
  monkeypatch.setattr(attention, 'check_attention_mask', lambda *a: calls.append(a) or checker(*a))
  model = GPT(GPTConfig(vocab_size=11, max_len=8, num_layers=3, d_model=12, num_heads=3, d_ff=20))
  ids = jnp.ones((2, 5), jnp.int32)
  params = model.init(jax.random.key(0), ids)['params']
  model.apply({'params': params}, ids, valid=jnp.ones((2, 5), bool))
  assert not calls
  with pytest.raises(ValueError, match='input validity mask has shape'):
    model.apply({'params': params}, ids, valid=jnp.ones((2, 4), bool))
  mha = MultiHeadAttention(num_heads=3)
  x = jnp.ones((B, T, 12))
  with pytest.raises(ValueError, match='not broadcastable'):
    mha.init(jax.random.key(0), x, mask=jnp.ones((B, 1, T, T + 1), bool))
  assert calls


def project(params, name, x):
  """``x @ kernel + bias`` of one ``(D, H, K)`` projection: ``(B, L, D)`` -> ``(B, L, H, K)``."""
  return jnp.einsum('BLD,DHK->BLHK', x, params[name]['kernel']) + params[name]['bias']


def test_multi_head_attention_shapes_and_cross_attention():
  x = jax.random.normal(jax.random.key(0), (B, T, H * K))
  memory = jax.random.normal(jax.random.key(1), (B, S, H * K))
  mha = MultiHeadAttention(num_heads=H)
  params = mha.init(jax.random.key(2), x, memory)['params']
  assert params['query']['kernel'].shape == (H * K, H, K)
  assert params['out']['kernel'].shape == (H, K, H * K)
  out = mha.apply({'params': params}, x, memory)
  assert out.shape == (B, T, H * K)
  # Queries from x, keys and values from the memory, through the reference attention.
  ref, _ = reference_attention(
    project(params, 'query', x),
    project(params, 'key', memory),
    project(params, 'value', memory),
    np.ones((1, 1, 1, 1), bool),
  )
  expected = jnp.einsum('BTHK,HKD->BTD', ref, params['out']['kernel']) + params['out']['bias']
  np.testing.assert_allclose(out, expected, atol=1e-5)


def test_fused_qkv_equals_separate_projections():
  x = jax.random.normal(jax.random.key(0), (B, T, H * K))
  mask = masks.causal_mask(T)
  separate = MultiHeadAttention(num_heads=H)
  p = separate.init(jax.random.key(1), x)['params']
  fused_params = {
    'qkv': {
      'kernel': jnp.stack([p[n]['kernel'] for n in ('query', 'key', 'value')], axis=1),
      'bias': jnp.stack([p[n]['bias'] for n in ('query', 'key', 'value')], axis=0),
    },
    'out': p['out'],
  }
  fused = MultiHeadAttention(num_heads=H, fused_qkv=True)
  assert jax.tree.map(jnp.shape, fused.init(jax.random.key(1), x)['params']) == jax.tree.map(
    jnp.shape, fused_params
  )
  np.testing.assert_allclose(
    fused.apply({'params': fused_params}, x, mask=mask),
    separate.apply({'params': p}, x, mask=mask),
    atol=1e-6,
  )


def test_cached_cross_attention_needs_the_flag_and_a_first_memory():
  x, memory = jnp.ones((B, 1, H * K)), jnp.ones((B, S, H * K))
  params = MultiHeadAttention(num_heads=H).init(jax.random.key(0), x, memory)['params']
  with pytest.raises(ValueError, match=r'needs MultiHeadAttention\(cross=True\)'):
    MultiHeadAttention(num_heads=H).apply(
      {'params': params}, x, memory, decode=True, mutable=['cache']
    )
  with pytest.raises(ValueError, match='on its first call'):
    MultiHeadAttention(num_heads=H, cross=True).apply(
      {'params': params}, x, decode=True, mutable=['cache']
    )


def test_fused_qkv_rejects_cross_attention():
  x = jnp.ones((B, T, H * K))
  with pytest.raises(ValueError, match='fused_qkv'):
    MultiHeadAttention(num_heads=H, fused_qkv=True).init(jax.random.key(0), x, x)


def test_heads_must_divide_the_width():
  with pytest.raises(ValueError, match='not divisible'):
    MultiHeadAttention(num_heads=5).init(jax.random.key(0), jnp.ones((B, T, 12)))


def test_sown_weights_match_the_returned_weights():
  x = jax.random.normal(jax.random.key(0), (B, T, H * K))
  mha = MultiHeadAttention(num_heads=H)
  params = mha.init(jax.random.key(1), x)['params']
  out, state = mha.apply(
    {'params': params}, x, mask=masks.causal_mask(T), mutable=['intermediates']
  )
  (w,) = state['intermediates']['attention_weights']
  assert w.shape == (B, H, T, T)
  _, expected = reference_attention(
    project(params, 'query', x),
    project(params, 'key', x),
    project(params, 'value', x),
    masks.causal_mask(T),
  )
  np.testing.assert_allclose(w, expected, atol=1e-5)
  assert np.all(np.asarray(w)[:, :, np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]] == 0)
  np.testing.assert_allclose(
    out, mha.apply({'params': params}, x, mask=masks.causal_mask(T)), atol=1e-6
  )


def test_seed_worked_example():
  """The course's 2-word example: printed weights [[0.5, 0.5], [0.7604, 0.2396]], output [[0.35, 0.55], ...]."""
  q = jnp.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])[None, :, None, :]
  k = jnp.array([[1.0, 2.0, 1.0], [2.0, 1.0, 0.0]])[None, :, None, :]
  v = jnp.array([[0.5, 0.8], [0.2, 0.3]])[None, :, None, :]
  # values share the key width here: a zero third column
  v = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, 1)))
  out, w = dot_product_attention(q, k, v, return_weights=True)
  ref_out, ref_w = reference_attention(q, k, v, np.ones((1, 1, 1, 1), bool))
  np.testing.assert_allclose(w[0, 0], ref_w[0, 0], atol=1e-6)
  np.testing.assert_allclose(w[0, 0], [[0.5, 0.5], [0.7604, 0.2396]], atol=1e-4)
  np.testing.assert_allclose(out[0, :, 0, :2], [[0.35, 0.55], [0.4281, 0.6802]], atol=1e-4)
