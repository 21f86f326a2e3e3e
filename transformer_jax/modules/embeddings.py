"""Token, position and segment embeddings."""

from __future__ import annotations

import math
from typing import Any, Callable, Literal

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from transformer_jax.validation import check_length, check_token_ids

SinusoidLayout = Literal['interleaved', 'concatenated']


class TokenEmbedding(nn.Module):
  """A ``[V, D]`` lookup table with a tied-output ``attend`` path.

  Ids outside ``[0, V)`` raise when they are concrete; under ``jit`` they give NaN rows (never a clamped, plausible
  row), so a bad id shows up in the loss instead of training silently on the wrong token.
  """

  vocab_size: int
  features: int
  scale_by_sqrt_dim: bool = False  # the original Transformer multiplies embeddings by sqrt(d_model)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  embedding_init: Callable = nn.initializers.normal(stddev=1.0)

  def setup(self):
    self.embedding = self.param('embedding', self.embedding_init, (self.vocab_size, self.features), self.param_dtype)

  def __call__(self, ids):
    """``(B, T)`` int -> ``(B, T, D)`` in ``dtype``."""
    check_token_ids(ids, self.vocab_size)
    valid = (ids >= 0) & (ids < self.vocab_size)
    rows = jnp.take(self.embedding, jnp.where(valid, ids, 0), axis=0)
    out = jnp.where(valid[..., None], rows, jnp.nan).astype(self.dtype)
    if self.scale_by_sqrt_dim:
      out = out * jnp.asarray(math.sqrt(self.features), self.dtype)
    return out

  def attend(self, query):
    """Tied output projection: ``(..., D) -> (..., V)`` logits, computed in float32."""
    return jnp.einsum('...d,vd->...v', query.astype(jnp.float32), self.embedding.astype(jnp.float32))


def sinusoidal_table(max_len: int, features: int, layout: SinusoidLayout = 'interleaved',
                     base: float = 10000.0) -> np.ndarray:
  """The fixed encoding of "Attention Is All You Need": ``[max_len, D]`` float32.

  ``PE[p, 2i] = sin(p / base^(2i/D))``, ``PE[p, 2i+1] = cos(...)``. ``'interleaved'`` puts sin and cos in alternate
  columns (the paper, the course, PyTorch tutorials); ``'concatenated'`` puts all sines first, then all cosines
  (Flax's ``sinusoidal_init``, tensor2tensor).
  """
  if features % 2:
    raise ValueError(f'sinusoidal encodings need an even d_model, got {features}')
  position = np.arange(max_len, dtype=np.float64)[:, None]
  inv_freq = np.exp(np.arange(0, features, 2, dtype=np.float64) * -(math.log(base) / features))
  angles = position * inv_freq  # (max_len, D/2)
  table = np.empty((max_len, features), np.float64)
  if layout == 'interleaved':
    table[:, 0::2], table[:, 1::2] = np.sin(angles), np.cos(angles)
  elif layout == 'concatenated':
    half = features // 2
    table[:, :half], table[:, half:] = np.sin(angles), np.cos(angles)
  else:
    raise ValueError(f"unknown sinusoid layout {layout!r}; expected 'interleaved' or 'concatenated'")
  return table.astype(np.float32)


class SinusoidalPositionalEncoding(nn.Module):
  """Fixed sinusoidal encodings (no parameters) looked up by position."""

  max_len: int
  features: int
  layout: SinusoidLayout = 'interleaved'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, positions):
    """``(B, T)`` positions -> ``(B, T, D)`` encodings."""
    check_length(positions.shape[-1], self.max_len)
    check_token_ids(positions, self.max_len, 'positions')
    table = jnp.asarray(sinusoidal_table(self.max_len, self.features, self.layout))
    return jnp.take(table, positions, axis=0).astype(self.dtype)


class LearnedPositionalEmbedding(nn.Module):
  """Learned absolute positions (GPT, BERT): a ``[max_len, D]`` table looked up by position."""

  max_len: int
  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  embedding_init: Callable = nn.initializers.normal(stddev=0.02)

  @nn.compact
  def __call__(self, positions):
    """``(B, T)`` positions -> ``(B, T, D)`` embeddings."""
    check_length(positions.shape[-1], self.max_len)
    check_token_ids(positions, self.max_len, 'positions')
    table = self.param('embedding', self.embedding_init, (self.max_len, self.features), self.param_dtype)
    return jnp.take(table, positions, axis=0).astype(self.dtype)
