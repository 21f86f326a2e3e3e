"""Rotary positions: equal to Hugging Face Llama's rotation, relative by construction, and exact under the KV cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from transformer_jax import GPT, GPTConfig
from transformer_jax.modules.rotary import apply_rotary

B, T, H, K = 2, 5, 3, 8


@pytest.mark.parametrize('theta', [10000.0, 500000.0])
def test_rotation_equals_hugging_face_llama(theta, rng):
  query, key = rng.standard_normal((2, B, T, H, K)).astype(np.float32)
  # the second row continues a cached prefix
  positions = np.array([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
  config = LlamaConfig(
    hidden_size=H * K,
    num_attention_heads=H,
    head_dim=K,
    rope_theta=theta,
    max_position_embeddings=64,
  )
  cos, sin = LlamaRotaryEmbedding(config)(torch.zeros(1), torch.tensor(positions))
  # transformers rotates (B, H, T, K); we keep (B, T, H, K).
  expected = apply_rotary_pos_emb(
    torch.tensor(query).transpose(1, 2), torch.tensor(key).transpose(1, 2), cos, sin
  )
  for ours, theirs in zip(
    (apply_rotary(query, positions, theta), apply_rotary(key, positions, theta)), expected
  ):
    np.testing.assert_allclose(ours, theirs.transpose(1, 2).numpy(), atol=1e-6)


def test_scores_depend_only_on_the_distance(rng):
  query, key = rng.standard_normal((2, 1, T, H, K)).astype(np.float32)
  positions = np.arange(T)[None]
  scores = lambda shift: jnp.einsum(
    'BTHK,BSHK->BHTS',
    apply_rotary(query, positions + shift),  # noqa: E731
    apply_rotary(key, positions + shift),
  )
  np.testing.assert_allclose(scores(0), scores(37), atol=2e-5)
  # it does rotate
  assert not np.allclose(scores(0), jnp.einsum('BTHK,BSHK->BHTS', query, key), atol=1e-3)


def test_bf16_inputs_keep_their_dtype_with_float32_angles(rng):
  x = jnp.asarray(rng.standard_normal((B, T, H, K)), jnp.bfloat16)
  positions = np.full((B, T), 1000) + np.arange(T)
  out = apply_rotary(x, positions)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(
    out.astype(np.float32), apply_rotary(x.astype(jnp.float32), positions), atol=3e-2
  )


@pytest.fixture(scope='module')
def rotary_gpt():
  config = GPTConfig(
    vocab_size=29,
    max_len=16,
    num_layers=2,
    d_model=24,
    num_heads=3,
    d_ff=40,
    dropout_rate=0.0,
    attention_dropout_rate=0.0,
    position_encoding='none',
    rope_theta=10000.0,
  )
  model = GPT(config)
  ids = jax.random.randint(jax.random.key(1), (B, 9), 0, config.vocab_size)
  return model, model.init(jax.random.key(0), ids)['params'], ids


def test_cached_decoding_equals_the_full_pass(rotary_gpt):
  model, params, ids = rotary_gpt
  full = model.apply({'params': params}, ids)
  prompt = 4
  positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
  cache = model.init(jax.random.key(0), ids, method=GPT.decode_step, positions=positions)['cache']
  cache = jax.tree.map(jnp.zeros_like, cache)
  steps, (logits, variables) = (
    [],
    model.apply(
      {'params': params, 'cache': cache},
      ids[:, :prompt],
      positions=positions[:, :prompt],
      method=GPT.decode_step,
      mutable=['cache'],
    ),
  )
  steps.append(logits)
  for t in range(prompt, ids.shape[1]):
    logits, variables = model.apply(
      {'params': params, **variables},
      ids[:, t : t + 1],
      positions=positions[:, t : t + 1],
      method=GPT.decode_step,
      mutable=['cache'],
    )
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5)


def test_rotary_gpt_ignores_a_shift_of_every_position_and_the_rotation_changes_its_output(
  rotary_gpt,
):
  model, params, ids = rotary_gpt
  shifted = model.apply({'params': params}, ids, positions=jnp.arange(ids.shape[1])[None] + 5)
  np.testing.assert_allclose(shifted, model.apply({'params': params}, ids), atol=1e-5)
  plain = GPT(model.config.replace(rope_theta=None))
  # At init (std 0.02) attention moves the logits little, but far above the 1e-5 of the equalities above.
  assert (
    np.abs(plain.apply({'params': params}, ids) - model.apply({'params': params}, ids)).max() > 1e-4
  )


@pytest.mark.parametrize(
  'overrides, message',
  [
    (
      {'d_model': 18, 'num_heads': 6},
      'an even, positive number of rotated features, got .* 3 of head dimension 3',
    ),
    ({'rope_theta': 1.0}, 'rope_theta > 1'),
  ],
)
def test_impossible_rotary_config_is_a_clear_error(overrides, message):
  with pytest.raises(ValueError, match=message):
    GPTConfig(
      **{
        **dict(
          vocab_size=29, max_len=16, num_layers=1, d_model=24, num_heads=3, d_ff=40, rope_theta=1e4
        ),
        **overrides,
      }
    )


# ---------------------------------------------------------------- partial rotation and frequency scaling


@pytest.mark.parametrize(
  'rope_parameters',
  [
    {'rope_type': 'linear', 'factor': 4.0},
    {
      'rope_type': 'llama3',
      'factor': 8.0,
      'low_freq_factor': 1.0,
      'high_freq_factor': 4.0,
      'original_max_position_embeddings': 64,
    },
  ],
  ids=['linear', 'llama3'],
)
def test_scaled_frequencies_match_hugging_face(rope_parameters):
  from transformers import LlamaConfig
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

  from transformer_jax.modules.rotary import Rotary

  # head 16 at base 500000: the llama3 ramp's three regions (kept, interpolated, divided) all occur with a context of 64
  hf = LlamaConfig(
    hidden_size=48,
    num_attention_heads=3,
    rope_parameters={'rope_theta': 500000.0, **rope_parameters},
  )
  expected, attention_factor = ROPE_INIT_FUNCTIONS[rope_parameters['rope_type']](hf, None)
  ours = Rotary(
    500000.0,
    scaling=rope_parameters['rope_type'],
    factor=rope_parameters['factor'],
    low_freq_factor=rope_parameters.get('low_freq_factor', 1.0),
    high_freq_factor=rope_parameters.get('high_freq_factor', 4.0),
    original_max_len=rope_parameters.get('original_max_position_embeddings', 8192),
  )
  assert attention_factor == 1.0
  np.testing.assert_allclose(ours.frequencies(16), expected.numpy(), rtol=1e-6)
  # the scaling did something
  assert not np.allclose(ours.frequencies(16), Rotary(500000.0).frequencies(16))


def test_partial_rotation_matches_hugging_face_and_passes_the_rest_through():
  """GPT-NeoX and Phi rotate the first ``partial_rotary_factor`` of each head (``q[..., :rotary_dim]``)."""
  from transformer_jax.modules.rotary import Rotary

  B, T, H, K = 2, 5, 3, 8
  x = np.asarray(jax.random.normal(jax.random.key(0), (B, T, H, K)))
  positions = np.asarray(jax.random.randint(jax.random.key(1), (B, T), 0, 50))
  got = np.asarray(Rotary(10000.0, fraction=0.5).apply(jnp.asarray(x), jnp.asarray(positions)))
  np.testing.assert_array_equal(got[..., 4:], x[..., 4:])
  inv_freq = torch.tensor(Rotary(10000.0, fraction=0.5).frequencies(K))
  angles = torch.tensor(positions, dtype=torch.float32)[..., None] * inv_freq  # (B, T, 2)
  emb = torch.cat([angles, angles], dim=-1)
  rotated, _ = apply_rotary_pos_emb(
    torch.tensor(x[..., :4]).transpose(1, 2),
    torch.tensor(x[..., :4]).transpose(1, 2),
    emb.cos(),
    emb.sin(),
  )
  np.testing.assert_allclose(got[..., :4], rotated.transpose(1, 2).numpy(), atol=1e-5, rtol=1e-5)


def test_a_gpt_with_llama3_scaling_and_partial_rotation_builds_and_refuses_bad_values():
  from transformer_jax import GPT, GPTConfig

  cfg = GPTConfig(
    vocab_size=11,
    max_len=16,
    num_layers=1,
    d_model=24,
    num_heads=3,
    d_ff=20,
    position_encoding='none',
    rope_theta=10000.0,
    rotary_fraction=0.5,
    rope_scaling='llama3',
    rope_scaling_factor=8.0,
    rope_original_max_len=8,
  )
  assert cfg.rotary.rotary_dim(cfg.head_dim) == 4
  ids = jnp.zeros((2, 5), jnp.int32)
  logits = GPT(cfg).apply(GPT(cfg).init(jax.random.key(0), ids), ids)
  assert logits.shape == (2, 5, 11) and np.isfinite(np.asarray(logits)).all()
  with pytest.raises(ValueError, match='an even, positive number of rotated features'):
    cfg.replace(rotary_fraction=0.375)  # 3 of 8 features
  with pytest.raises(ValueError, match='rope_scaling must be one of'):
    cfg.replace(rope_scaling='yarn')
