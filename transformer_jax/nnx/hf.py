"""Hugging Face directories as NNX models, through :func:`transformer_jax.convert.load_hf`."""

from __future__ import annotations

import os

from flax import nnx

from transformer_jax import convert
from transformer_jax.nnx.models import Model, from_linen


def load_hf(path: str | os.PathLike, dtype=None, *, rngs: nnx.Rngs | None = None) -> Model:
  """The NNX model of a Hugging Face directory (any format :func:`transformer_jax.convert.load_hf` reads; ``dtype``
  as there), holding the converted arrays. ``rngs``: dropout streams for training.

      model = load_hf('path/to/gpt2')
      logits = model(ids)   # (B, T, V)
  """
  return from_linen(*convert.load_hf(path, dtype=dtype), rngs=rngs)
