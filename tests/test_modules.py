"""LayerNorm, feed-forward, embeddings and position encodings, each on its own."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from transformer_jax.modules import (
  FeedForward,
  LayerNorm,
  LearnedPositionalEmbedding,
  SinusoidalPositionalEncoding,
  TokenEmbedding,
  sinusoidal_table,
)

B, T, D, F, V = 2, 5, 12, 20, 37


def x_input(seed=0, scale=3.0, shift=5.0):
  return jax.random.normal(jax.random.key(seed), (B, T, D)) * scale + shift


# ---------------------------------------------------------------- LayerNorm


@pytest.mark.parametrize('eps', [1e-5, 1e-12, 1e-1], ids=['torch_default', 'bert', 'large'])
def test_layernorm_standard_matches_biased_variance_formula(eps):
  x = x_input()
  ln = LayerNorm(epsilon=eps)
  params = ln.init(jax.random.key(0), x)
  params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.key(1), p.shape), params)
  xn = np.asarray(x, np.float64)
  ref = (xn - xn.mean(-1, keepdims=True)) / np.sqrt(xn.var(-1, keepdims=True) + eps)
  ref = ref * np.asarray(params['params']['scale']) + np.asarray(params['params']['bias'])
  np.testing.assert_allclose(ln.apply(params, x), ref, atol=1e-5, rtol=1e-5)


def test_layernorm_seed_variant_uses_unbiased_std_and_eps_outside_the_sqrt():
  x = x_input(1)
  eps = 1e-1  # large, so eps inside vs outside the sqrt differ clearly
  seed = LayerNorm(epsilon=eps, variant='unbiased_std')
  params = seed.init(jax.random.key(0), x)
  xn = np.asarray(x, np.float64)
  ref = (xn - xn.mean(-1, keepdims=True)) / (xn.std(-1, ddof=1, keepdims=True) + eps)
  np.testing.assert_allclose(seed.apply(params, x), ref, atol=1e-5, rtol=1e-5)
  standard = LayerNorm(epsilon=eps).apply(params, x)
  assert np.abs(np.asarray(standard) - ref).max() > 1e-2  # the variants really differ


def test_layernorm_seed_worked_example():
  """The course's example: [2, -1, 3, 0] -> [0.5477, -1.0954, 1.0954, -0.5477] (eps 1e-5)."""
  x = jnp.array([[2.0, -1.0, 3.0, 0.0]])
  ln = LayerNorm(epsilon=1e-5, variant='unbiased_std')
  xn = np.asarray(x, np.float64)
  ref = (xn - xn.mean()) / (xn.std(ddof=1) + 1e-5)
  np.testing.assert_allclose(ln.apply(ln.init(jax.random.key(0), x), x), ref, atol=1e-6)


def test_layernorm_statistics_are_float32_under_bf16():
  # Values with a large common offset: bf16 statistics would lose the small deviations entirely.
  x = (jnp.arange(D, dtype=jnp.float32) * 0.01 + 100.0)[None, None]
  ln = LayerNorm(dtype=jnp.bfloat16)
  params = ln.init(jax.random.key(0), x)
  out = ln.apply(params, x)
  assert out.dtype == jnp.bfloat16
  assert params['params']['scale'].dtype == jnp.float32
  ref = LayerNorm().apply(params, x)
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=2e-2)


def test_layernorm_rejects_unknown_variant():
  with pytest.raises(ValueError, match='variant'):
    LayerNorm(variant='rms').init(jax.random.key(0), x_input())


# ---------------------------------------------------------------- FeedForward


def numpy_ffn(params, x, act):
  h = np.asarray(x, np.float64) @ np.asarray(params['fc_in']['kernel']) + np.asarray(
    params['fc_in']['bias']
  )
  return act(h) @ np.asarray(params['fc_out']['kernel']) + np.asarray(params['fc_out']['bias'])


ACTS = {
  'relu': lambda h: np.maximum(h, 0),
  'gelu': lambda h: 0.5 * h * (1 + erf(h / math.sqrt(2))),
  'gelu_tanh': lambda h: 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3))),
}


@pytest.mark.parametrize('activation', ACTS, ids=list(ACTS))
def test_feedforward_matches_formula(activation):
  x = x_input(2, scale=2.0, shift=0.0)
  ffn = FeedForward(F, activation)
  params = ffn.init(jax.random.key(0), x)['params']
  assert params['fc_in']['kernel'].shape == (D, F) and params['fc_out']['kernel'].shape == (F, D)
  np.testing.assert_allclose(
    ffn.apply({'params': params}, x), numpy_ffn(params, x, ACTS[activation]), atol=1e-5, rtol=1e-5
  )


@pytest.mark.parametrize(
  'activation, gated', [('gelu_tanh', False), ('silu', True)], ids=['plain', 'gated']
)
def test_bf16_activation_is_computed_in_float32_and_rounded_once(activation, gated):
  """In a bfloat16 FFN what reaches ``fc_out`` is the float32 activation (times the gate) of the bf16 projections,
  rounded to bf16 once: within half a bf16 ulp of the exact value (or 1e-6 where tanh's 1 + tanh cancels), where
  rounding after each elementwise op drifts by several."""
  x = x_input(4, scale=3.0, shift=0.0)
  ffn = FeedForward(F, activation, gated=gated, dtype=jnp.bfloat16)
  params = ffn.init(jax.random.key(0), x)['params']
  seen = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    seen[context.module.name] = args[0] if context.module.name == 'fc_out' else out
    return out

  with nn.intercept_methods(record):
    ffn.apply({'params': params}, x)
  act = {'gelu_tanh': ACTS['gelu_tanh'], 'silu': lambda h: h / (1 + np.exp(-h))}[activation]
  exact = act(np.asarray(seen['fc_gate' if gated else 'fc_in'], np.float64))
  if gated:
    exact = exact * np.asarray(seen['fc_in'], np.float64)
  got = seen['fc_out']
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float64), exact, rtol=2**-8, atol=1e-6)


def test_exact_and_tanh_gelu_differ():
  x = x_input(3, scale=2.0, shift=0.0)
  params = FeedForward(F, 'gelu').init(jax.random.key(0), x)
  exact = FeedForward(F, 'gelu').apply(params, x)
  approx = FeedForward(F, 'gelu_tanh').apply(params, x)
  assert np.abs(np.asarray(exact) - np.asarray(approx)).max() > 1e-5


def test_feedforward_rejects_unknown_activation():
  with pytest.raises(ValueError, match='activation'):
    FeedForward(F, 'swish').init(jax.random.key(0), x_input())


# ---------------------------------------------------------------- Embeddings


def test_token_embedding_lookup_scaling_and_attend():
  ids = jnp.array([[1, 2, 3, 4, 5], [36, 0, 7, 7, 9]])
  plain = TokenEmbedding(V, D)
  params = plain.init(jax.random.key(0), ids)
  table = np.asarray(params['params']['embedding'])
  np.testing.assert_allclose(plain.apply(params, ids), table[np.asarray(ids)])
  scaled = TokenEmbedding(V, D, scale_by_sqrt_dim=True).apply(params, ids)
  np.testing.assert_allclose(scaled, table[np.asarray(ids)] * math.sqrt(D), rtol=1e-6)
  q = x_input(4)
  logits = plain.apply(params, q, method=TokenEmbedding.attend)
  assert logits.shape == (B, T, V) and logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, np.asarray(q) @ table.T, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize('bad', [V, V + 10, -1], ids=['vocab', 'beyond', 'negative'])
def test_token_embedding_rejects_out_of_range_ids(bad):
  emb = TokenEmbedding(V, D)
  params = emb.init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32))
  ids = jnp.array([[1, bad, 2]])
  with pytest.raises(ValueError, match=rf'out of range.*{bad}.*\[0, {V}\)'):
    emb.apply(params, ids)
  # Under jit the values are unknown: the bad row becomes NaN (never a clamped, plausible row).
  out = jax.jit(emb.apply)(params, ids)
  assert np.isnan(np.asarray(out)[0, 1]).all() and np.isfinite(np.asarray(out)[0, [0, 2]]).all()


def test_token_embedding_rejects_float_ids():
  emb = TokenEmbedding(V, D)
  with pytest.raises(TypeError, match='integers'):
    emb.init(jax.random.key(0), jnp.zeros((1, 3), jnp.float32))


def seed_positional_encoding(max_len, d_model):
  """The course's PositionalEncoding, transcribed to numpy."""
  pe = np.zeros((max_len, d_model))
  position = np.arange(max_len)[:, None]
  div_term = np.exp(np.arange(0, d_model, 2) * -(math.log(10000.0) / d_model))
  pe[:, 0::2] = np.sin(position * div_term)
  pe[:, 1::2] = np.cos(position * div_term)
  return pe


def test_sinusoidal_interleaved_matches_the_course_formula():
  np.testing.assert_allclose(sinusoidal_table(50, 14), seed_positional_encoding(50, 14), atol=1e-6)


def test_sinusoidal_concatenated_is_sines_then_cosines():
  inter = sinusoidal_table(9, 10, 'interleaved')
  concat = sinusoidal_table(9, 10, 'concatenated')
  np.testing.assert_array_equal(concat[:, :5], inter[:, 0::2])
  np.testing.assert_array_equal(concat[:, 5:], inter[:, 1::2])


def test_sinusoidal_needs_even_width_and_known_layout():
  with pytest.raises(ValueError, match='even'):
    sinusoidal_table(4, 7)
  with pytest.raises(ValueError, match='layout'):
    sinusoidal_table(4, 8, 'spiral')


@pytest.mark.parametrize(
  'module',
  [SinusoidalPositionalEncoding(11, D), LearnedPositionalEmbedding(11, D)],
  ids=['sinusoidal', 'learned'],
)
def test_position_encodings_lookup_and_length_check(module):
  positions = jnp.array([[0, 1, 2, 3, 4], [3, 4, 5, 6, 10]])
  variables = module.init(jax.random.key(0), positions)
  out = module.apply(variables, positions)
  assert out.shape == (B, T, D)
  np.testing.assert_allclose(out[1, 0], out[0, 3])  # same position, same encoding
  with pytest.raises(ValueError, match='exceeds the model maximum max_len=11'):
    module.apply(variables, jnp.zeros((1, 12), jnp.int32))
  with pytest.raises(ValueError, match='positions out of range'):
    module.apply(variables, jnp.array([[0, 11]]))
