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
  positions = np.array([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])  # the second row continues a cached prefix
  config = LlamaConfig(hidden_size=H * K, num_attention_heads=H, head_dim=K, rope_theta=theta,
                       max_position_embeddings=64)
  cos, sin = LlamaRotaryEmbedding(config)(torch.zeros(1), torch.tensor(positions))
  # transformers rotates (B, H, T, K); we keep (B, T, H, K).
  expected = apply_rotary_pos_emb(torch.tensor(query).transpose(1, 2), torch.tensor(key).transpose(1, 2), cos, sin)
  for ours, theirs in zip((apply_rotary(query, positions, theta), apply_rotary(key, positions, theta)), expected):
    np.testing.assert_allclose(ours, theirs.transpose(1, 2).numpy(), atol=1e-6)


def test_scores_depend_only_on_the_distance(rng):
  query, key = rng.standard_normal((2, 1, T, H, K)).astype(np.float32)
  positions = np.arange(T)[None]
  scores = lambda shift: jnp.einsum('BTHK,BSHK->BHTS', apply_rotary(query, positions + shift),  # noqa: E731
                                    apply_rotary(key, positions + shift))
  np.testing.assert_allclose(scores(0), scores(37), atol=2e-5)
  assert not np.allclose(scores(0), jnp.einsum('BTHK,BSHK->BHTS', query, key), atol=1e-3)  # it does rotate


def test_bf16_inputs_keep_their_dtype_with_float32_angles(rng):
  x = jnp.asarray(rng.standard_normal((B, T, H, K)), jnp.bfloat16)
  positions = np.full((B, T), 1000) + np.arange(T)
  out = apply_rotary(x, positions)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(np.float32), apply_rotary(x.astype(jnp.float32), positions), atol=3e-2)


@pytest.fixture(scope='module')
def rotary_gpt():
  config = GPTConfig(vocab_size=29, max_len=16, num_layers=2, d_model=24, num_heads=3, d_ff=40, dropout_rate=0.0,
                     attention_dropout_rate=0.0, position_encoding='none', rope_theta=10000.0)
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
  steps, (logits, variables) = [], model.apply({'params': params, 'cache': cache}, ids[:, :prompt],
                                                positions=positions[:, :prompt], method=GPT.decode_step,
                                                mutable=['cache'])
  steps.append(logits)
  for t in range(prompt, ids.shape[1]):
    logits, variables = model.apply({'params': params, **variables}, ids[:, t:t + 1], positions=positions[:, t:t + 1],
                                    method=GPT.decode_step, mutable=['cache'])
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5)


def test_rotary_gpt_ignores_a_shift_of_every_position_and_the_rotation_changes_its_output(rotary_gpt):
  model, params, ids = rotary_gpt
  shifted = model.apply({'params': params}, ids, positions=jnp.arange(ids.shape[1])[None] + 5)
  np.testing.assert_allclose(shifted, model.apply({'params': params}, ids), atol=1e-5)
  plain = GPT(model.config.replace(rope_theta=None))
  # At init (std 0.02) attention moves the logits little, but far above the 1e-5 of the equalities above.
  assert np.abs(plain.apply({'params': params}, ids) - model.apply({'params': params}, ids)).max() > 1e-4


@pytest.mark.parametrize('overrides, message', [
    ({'d_model': 18, 'num_heads': 6}, 'even head dimension'),
    ({'rope_theta': 1.0}, 'rope_theta > 1'),
])
def test_impossible_rotary_config_is_a_clear_error(overrides, message):
  with pytest.raises(ValueError, match=message):
    GPTConfig(**{**dict(vocab_size=29, max_len=16, num_layers=1, d_model=24, num_heads=3, d_ff=40, rope_theta=1e4),
                 **overrides})
