"""The compiled program of greedy ``generate`` for a one-layer GPT, for tests that look at what it calls."""

import jax
import jax.numpy as jnp

from transformer_jax import GPT, GPTConfig, decoding, search_settings


def greedy_generate_hlo(batch: int = 1, **dtypes) -> str:
  """HLO text of greedy ``generate`` (4 new tokens after 5) for a GPT of vocabulary 37 and width 12 in ``dtypes``."""
  config = GPTConfig(
    vocab_size=37, max_len=16, num_layers=1, d_model=12, num_heads=3, d_ff=19, **dtypes
  )
  model = GPT(config)
  prompt = jnp.ones((batch, 5), jnp.int32)
  params = model.init(jax.random.key(0), prompt)['params']
  settings, floats = search_settings.make_settings(37, 4, None, 0, 0)
  valid = jnp.ones_like(prompt, bool)
  lowered = decoding.compiled_generate.lower(
    model, settings, params, floats, prompt, valid, jax.random.key(0)
  )
  return lowered.compile().as_text()
