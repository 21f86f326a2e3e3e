"""Pieces the three model families share: position encodings by name, boundary checks, key masks."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from transformer_jax import masks
from transformer_jax.config import BlockConfig
from transformer_jax.modules.embeddings import LearnedPositionalEmbedding, SinusoidalPositionalEncoding
from transformer_jax.validation import check_length, check_shape

POSITION_ENCODINGS = ('sinusoidal', 'sinusoidal_concat', 'learned', 'none')


def make_position_encoding(config: BlockConfig, kind: str, name: str | None = None) -> nn.Module | None:
  """The position module ``kind`` names (see :data:`POSITION_ENCODINGS`), or ``None`` for ``'none'``."""
  if kind in ('sinusoidal', 'sinusoidal_concat'):
    layout = 'interleaved' if kind == 'sinusoidal' else 'concatenated'
    return SinusoidalPositionalEncoding(config.max_len, config.d_model, layout, dtype=config.compute_dtype, name=name)
  if kind == 'learned':
    return LearnedPositionalEmbedding(config.max_len, config.d_model, dtype=config.compute_dtype,
                                      param_dtype=config.weight_dtype,
                                      embedding_init=nn.initializers.normal(config.init_std or 0.02), name=name)
  if kind == 'none':
    return None
  raise ValueError(f'unknown position encoding {kind!r}; expected one of {POSITION_ENCODINGS}')


def token_validity(ids, valid, pad_id: int | None, max_len: int, name: str):
  """Checks ``ids`` (``(B, T)``, at most ``max_len``) and returns the ``(B, T)`` "real token" array, or ``None``.

  ``valid`` (True/1 for real tokens, like Hugging Face's ``attention_mask``) wins over ``pad_id``; with neither,
  every token is real and ``None`` is returned.
  """
  if ids.ndim != 2:
    raise ValueError(f'{name} must have shape (B, T), got {tuple(ids.shape)}')
  check_length(ids.shape[1], max_len, name)
  if valid is not None:
    check_shape(valid, ids.shape, f'{name} validity mask')
    return valid.astype(jnp.bool_)
  if pad_id is not None:
    return ids != pad_id
  return None


def key_mask_or_none(valid):
  return None if valid is None else masks.key_mask(valid)


def default_positions(ids):
  """``(B, T)`` positions ``0 .. T-1``."""
  return jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
