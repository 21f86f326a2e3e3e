"""Attention masks as pure functions.

One convention everywhere: a mask is boolean, ``True`` means "this query may attend to this key", and it is
broadcastable to ``[B, H, T, S]`` (batch, heads, queries, keys). Masks combine with logical AND.
"""

from __future__ import annotations

import jax.numpy as jnp


def padding_mask(token_ids, pad_id: int):
  """Keys that are real tokens. ``[B, S]`` ids -> ``[B, 1, 1, S]`` (True where ``id != pad_id``)."""
  return key_mask(token_ids != pad_id)


def key_mask(valid):
  """Lifts a ``[B, S]`` "token is real" array to an attention mask ``[B, 1, 1, S]``; ``None`` (all real) stays
  ``None``."""
  return None if valid is None else valid.astype(jnp.bool_)[:, None, None, :]


def causal_mask(
  length: int, kv_length: int | None = None, offset: int = 0, window: int | None = None
):
  """Look-ahead mask ``[1, 1, T, S]``: query ``t`` sees key ``s`` iff ``s <= t + offset``, and with a sliding
  ``window`` (Mistral) only the ``window`` newest of those: ``t + offset - s < window``.

  With ``kv_length`` and ``offset`` it covers queries that continue a longer key sequence (cached decoding). The
  window counts sequence slots, left padding included, as Hugging Face's ``sliding_window_overlay`` does.
  """
  kv_length = length if kv_length is None else kv_length
  q_pos = jnp.arange(length)[:, None] + offset
  k_pos = jnp.arange(kv_length)[None, :]
  visible = k_pos <= q_pos
  if window is not None:
    visible &= q_pos - k_pos < window
  return visible[None, None]


def cross_attention_mask(source_ids, pad_id: int):
  """Target queries against source keys: every query may see every real source token. ``[B, 1, 1, S]``."""
  return padding_mask(source_ids, pad_id)


def combine_masks(*masks):
  """Logical AND of masks (``None`` entries are skipped); ``None`` if every entry is ``None``."""
  present = [m for m in masks if m is not None]
  if not present:
    return None
  out = present[0].astype(jnp.bool_)
  for m in present[1:]:
    out = jnp.logical_and(out, m)
  return out
