"""Token-level cross-entropy with label smoothing, as sums so that padding and accumulation weigh tokens exactly."""

from __future__ import annotations

import jax.numpy as jnp

from transformer_jax.modules.cross_entropy import softmax_cross_entropy


def cross_entropy_sums(logits, targets, weights, label_smoothing: float = 0.0) -> dict:
  """Weighted sums over ``(..., V)`` float32 logits and ``(...)`` integer targets and float weights (0 = padding).

  Label smoothing spreads ``label_smoothing`` of the target mass uniformly over the vocabulary (the paper's
  ``eps_ls``): ``loss = (1 - eps) * nll + eps * mean_v(-log p_v)``. Returns ``loss`` (the smoothed objective), ``nll``
  (plain negative log-likelihood, for perplexity), ``correct`` (argmax hits) and ``weight``, each summed over
  positions with ``weights``, so a padded position contributes nothing.
  """
  terms = softmax_cross_entropy(logits, targets)
  loss = terms.nll
  if label_smoothing:
    loss = (1.0 - label_smoothing) * terms.nll + label_smoothing * terms.uniform
  correct = (terms.predicted == targets).astype(jnp.float32)
  return {
    'loss': (loss * weights).sum(),
    'nll': (terms.nll * weights).sum(),
    'correct': (correct * weights).sum(),
    'weight': weights.sum(),
  }
