"""Rotary position embeddings (RoPE, Su et al. 2021, "RoFormer"), in the layout of Hugging Face's Llama.

Each head's query and key vector is rotated by an angle proportional to its position, pair by pair, so the dot
product of a query at position ``t`` with a key at ``s`` depends only on their contents and on ``t - s``. There are
no parameters. The pairs are ``(x[i], x[i + K/2])`` ("rotate half"), as in ``transformers``'
``apply_rotary_pos_emb``, not adjacent elements (the RoFormer paper's interleaved form): checkpoints of the Llama
family store their Q/K projections for this layout.
"""

from __future__ import annotations

import jax.numpy as jnp


def rotary_frequencies(head_dim: int, theta: float = 10000.0):
  """``(K/2,)`` float32 inverse frequencies ``theta ** (-2i / K)``."""
  if head_dim % 2:
    raise ValueError(f'rotary positions need an even head dimension, got {head_dim}')
  return 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)


def apply_rotary(x, positions, theta: float = 10000.0):
  """Rotates ``(B, T, H, K)`` queries or keys by their ``(B, T)`` integer positions; same shape and dtype.

  The angles and the rotation are computed in float32 (a bf16 angle at position 1000 is off by whole radians).
  """
  angles = positions.astype(jnp.float32)[:, :, None, None] * rotary_frequencies(x.shape[-1], theta)  # (B, T, 1, K/2)
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)  # (B, T, H, K/2) each
  rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
  return rotated.astype(x.dtype)
