"""Rotary position embeddings (RoPE, Su et al. 2021, "RoFormer"), in the layout of Hugging Face's Llama.

Each head's query and key vector is rotated by an angle proportional to its position, pair by pair, so the dot
product of a query at position ``t`` with a key at ``s`` depends only on their contents and on ``t - s``. There are
no parameters. The pairs are ``(x[i], x[i + R/2])`` ("rotate half"), as in ``transformers``'
``apply_rotary_pos_emb``, not adjacent elements (the RoFormer paper's interleaved form): checkpoints of the Llama
family store their Q/K projections for this layout.

:class:`Rotary` adds what the families vary: a partial rotation (only the first ``fraction`` of each head, as
GPT-NeoX and Phi), and the frequency scalings of Hugging Face's ``rope_type`` ``'linear'`` (positions divided by
``factor``) and ``'llama3'`` (Llama 3.1: low frequencies divided by ``factor``, high ones kept, a smooth ramp between).
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Rotary:
  """How queries and keys are rotated. Hashable, so it can be a module field."""

  theta: float = 10000.0
  fraction: float = 1.0  # the first fraction of each head is rotated, the rest passes through (partial_rotary_factor)
  scaling: str | None = None  # None | 'linear' | 'llama3'
  factor: float = 1.0  # 'linear' and 'llama3': the context extension factor
  low_freq_factor: float = 1.0  # 'llama3'
  high_freq_factor: float = 4.0  # 'llama3'
  original_max_len: int = 8192  # 'llama3': the context the frequencies were trained for

  def rotary_dim(self, head_dim: int) -> int:
    return int(head_dim * self.fraction)

  def frequencies(self, head_dim: int) -> np.ndarray:
    """``(R/2,)`` float32 inverse frequencies for the rotated ``R = rotary_dim(head_dim)`` features."""
    dim = self.rotary_dim(head_dim)
    if dim % 2 or dim < 2:
      raise ValueError(
        f'rotary positions need an even, positive rotated dimension, got {dim} of {head_dim}'
      )
    inv_freq = 1.0 / self.theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    if self.scaling == 'linear':
      return (inv_freq / self.factor).astype(np.float32)
    if self.scaling == 'llama3':
      wavelength = 2 * math.pi / inv_freq
      scaled = np.where(
        wavelength > self.original_max_len / self.low_freq_factor, inv_freq / self.factor, inv_freq
      )
      smooth = (self.original_max_len / wavelength - self.low_freq_factor) / (
        self.high_freq_factor - self.low_freq_factor
      )
      smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
      medium = (wavelength >= self.original_max_len / self.high_freq_factor) & (
        wavelength <= self.original_max_len / self.low_freq_factor
      )
      return np.where(medium, smoothed, scaled).astype(np.float32)
    if self.scaling is not None:
      raise ValueError(
        f"unknown rope scaling {self.scaling!r}; expected None, 'linear' or 'llama3'"
      )
    return inv_freq

  def apply(self, x, positions):
    """Rotates ``(B, T, H, K)`` queries or keys by their ``(B, T)`` integer positions; same shape and dtype.

    The angles and the rotation are computed in float32 (a bf16 angle at position 1000 is off by whole radians).
    """
    inv_freq = jnp.asarray(self.frequencies(x.shape[-1]))
    dim = 2 * inv_freq.shape[0]
    angles = positions.astype(jnp.float32)[:, :, None, None] * inv_freq  # (B, T, 1, R/2)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32[..., :dim], 2, axis=-1)  # (B, T, H, R/2) each
    rotated = [first * cos - second * sin, second * cos + first * sin, x32[..., dim:]]
    return jnp.concatenate(rotated, axis=-1).astype(x.dtype)


def rotary_frequencies(head_dim: int, theta: float = 10000.0):
  """``(K/2,)`` float32 inverse frequencies ``theta ** (-2i / K)`` of the plain, full rotation."""
  return jnp.asarray(Rotary(theta).frequencies(head_dim))


def apply_rotary(x, positions, theta: float = 10000.0):
  """The plain, full rotation with base ``theta``: see :meth:`Rotary.apply`."""
  return Rotary(theta).apply(x, positions)
