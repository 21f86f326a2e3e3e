"""What both reference models share: scaled dot-product attention and the boolean masks (``True`` = may attend)."""

from __future__ import annotations

import math

import torch


def attend(q, k, v, mask=None):
  """Scaled dot-product attention: ``(B, H, T, K)``, ``(B, H, S, K)`` x2, bool mask broadcastable to ``(B, H, T, S)``
  (``True`` = may attend) -> ``(B, H, T, K)``. A row with no visible key gets zeros, not NaN."""
  logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, T, S)
  if mask is not None:
    logits = logits.masked_fill(~mask, float('-inf'))
  # fully masked rows: softmax of all -inf is NaN
  weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)
  return weights @ v


def key_mask(valid):
  """``(B, S)`` "token is real" -> ``(B, 1, 1, S)`` mask."""
  return valid[:, None, None, :]


def causal_mask(length: int, device=None):
  """``(1, 1, T, T)``: query ``t`` may see keys ``s <= t``."""
  return torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]
