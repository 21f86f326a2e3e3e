"""Softmax cross-entropy against integer targets, the argmax beside it: by a CPU kernel where XLA is slow.

XLA:CPU runs the loss as several passes over the ``(..., V)`` logits, writing ``exp(x - max)`` out in between; over
GPT-2's 50,257-way logits those passes cost more than a layer's products. On a lone CPU device float32 logits go to
:mod:`transformer_jax.kernels.cross_entropy`, which reads each row from memory once per pass direction; elsewhere
(GPUs, TPUs, meshes, other dtypes) the same numbers come from ``jax.nn.log_softmax``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from transformer_jax.kernels import cpu_build
from transformer_jax.kernels import cross_entropy as kernel


class CrossEntropy(NamedTuple):
  """Per position, each ``(...)``."""

  nll: jax.Array  # -log p(target), float32
  uniform: jax.Array  # mean over the vocabulary of -log p(v): label smoothing's term, float32
  predicted: jax.Array  # the most likely token (jnp.argmax's), int32; no gradient


def softmax_cross_entropy(logits: jax.Array, targets: jax.Array) -> CrossEntropy:
  """``(..., V)`` logits (computed in float32) against ``(...)`` integer targets in ``[0, V)``; a target outside it
  gives a NaN ``nll``. Differentiable in both modes; terms a caller does not use cost nothing on XLA's path and
  little on the kernel's."""
  logits = logits.astype(jnp.float32)
  targets = targets.astype(jnp.int32)
  if kernel.takes(logits) and cpu_build.sole_cpu_device() and kernel.available():
    nll, uniform, _, predicted = kernel.forward(logits, targets)
    return CrossEntropy(nll, uniform, predicted)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  predicted = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return CrossEntropy(nll, -log_probs.mean(axis=-1), predicted)
