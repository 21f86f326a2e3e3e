"""Checks at the model boundary.

JAX never raises on a bad index: plain indexing clamps and ``nn.Embed`` returns NaN rows. Everything a caller can get
wrong is therefore checked where it enters. Shapes are static, so they are checked at trace time, inside ``jit`` too.
Token values are checked whenever they are concrete (eager calls, the trainer's data pipeline, the converters,
generation); under ``jit`` they are traced, and an out-of-range id reaches :class:`TokenEmbedding`, which turns it into
a NaN row rather than a plausible wrong one.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np


def is_concrete(x) -> bool:
  """True when ``x`` holds values now (not a tracer inside ``jit``/``grad``/``vmap``)."""
  return not isinstance(x, jax.core.Tracer)


def check_token_ids(
  ids, vocab_size: int, name: str = 'token ids', range_name: str = 'the vocabulary'
) -> None:
  """Raises ``ValueError`` if a concrete id lies outside ``[0, vocab_size)``; traced ids pass through. Indices into
  anything else (positions of a sequence) are checked the same way, with ``range_name`` naming what they index."""
  dtype = np.asarray(ids).dtype if is_concrete(ids) else ids.dtype
  if not np.issubdtype(dtype, np.integer):
    raise TypeError(f'{name} must be integers, got dtype {dtype}')
  if not is_concrete(ids):
    return
  values = np.asarray(ids)
  if values.size == 0:
    return
  low, high = int(values.min()), int(values.max())
  if low < 0 or high >= vocab_size:
    bad = values[(values < 0) | (values >= vocab_size)]
    raise ValueError(
      f'{name} out of range: found {sorted(set(bad.tolist()))[:8]} but {range_name} is [0, {vocab_size})'
    )


def token_validity(ids, valid, pad_id: int | None, max_len: int, name: str):
  """Checks a model input: ``(B, T)`` ids, at most ``max_len``, and their validity mask. Returns the ``(B, T)`` bool
  "real token" array, or ``None`` when every token is real.

  ``valid`` (True/1 for real tokens, like Hugging Face's ``attention_mask``) wins over ``pad_id``; with neither,
  every token is real.
  """
  if ids.ndim != 2:
    raise ValueError(f'{name} must have shape (B, T), got {tuple(ids.shape)}')
  check_length(ids.shape[1], max_len, name)
  if valid is not None:
    check_shape(valid, ids.shape, f'{name} validity mask')
    return valid.astype(np.bool_)
  if pad_id is not None:
    return ids != pad_id
  return None


def check_length(length: int, max_len: int, name: str = 'sequence') -> None:
  """Raises ``ValueError`` if a sequence is longer than the model's positions allow."""
  if length > max_len:
    raise ValueError(f'{name} length {length} exceeds the model maximum max_len={max_len}')


def check_shape(x, expected: Sequence[int], name: str) -> None:
  """Raises ``ValueError`` unless ``x.shape == expected`` exactly."""
  if tuple(x.shape) != tuple(expected):
    raise ValueError(f'{name} has shape {tuple(x.shape)}, expected {tuple(expected)}')


def check_attention_mask(mask, batch: int, heads: int, q_len: int, kv_len: int) -> None:
  """Raises unless ``mask`` is boolean, 4-D and broadcastable to ``[B, H, T, S]``."""
  if mask.dtype != np.bool_:
    raise TypeError(f'attention mask must be boolean (True = may attend), got dtype {mask.dtype}')
  target = (batch, heads, q_len, kv_len)
  if mask.ndim != 4 or any(m not in (1, t) for m, t in zip(mask.shape, target)):
    raise ValueError(
      f'attention mask of shape {tuple(mask.shape)} is not broadcastable to [B, H, T, S] = {target}'
    )
