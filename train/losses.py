"""Token-level cross-entropy with label smoothing, as sums so that padding and accumulation weigh tokens exactly."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy_sums(logits, targets, weights, label_smoothing: float = 0.0) -> dict:
  """Weighted sums over ``(..., V)`` float32 logits and ``(...)`` integer targets and float weights (0 = padding).

  Label smoothing spreads ``label_smoothing`` of the target mass uniformly over the vocabulary (the paper's
  ``eps_ls``): ``loss = (1 - eps) * nll + eps * mean_v(-log p_v)``. Returns ``loss`` (the smoothed objective), ``nll``
  (plain negative log-likelihood, for perplexity), ``correct`` (argmax hits) and ``weight``, each summed over
  positions with ``weights``, so a padded position contributes nothing.
  """
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  loss = nll
  # the uniform term is one more pass over the (..., V) log-probabilities, which a zero weight would still pay for
  if label_smoothing:
    uniform = -log_probs.mean(axis=-1)
    loss = (1.0 - label_smoothing) * nll + label_smoothing * uniform
  correct = (logits.argmax(-1) == targets).astype(jnp.float32)
  return {
    'loss': (loss * weights).sum(),
    'nll': (nll * weights).sum(),
    'correct': (correct * weights).sum(),
    'weight': weights.sum(),
  }
