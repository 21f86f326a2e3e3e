"""Hugging Face checkpoints and NNX models: :func:`load_hf` and :func:`save_hf` through
:mod:`transformer_jax.convert`, and the jobs of :func:`transformer_jax.pretrained.load` on an NNX model.

    model = load_hf('path/to/gpt2')                   # any directory convert.load_hf reads
    job = pretrained.load('path/to/gpt2')             # or the model with its tokenizer and jobs
    model = model_of(job)                             # fine-tune it the NNX way, then
    with_model(job, model).generate_text(['Hello'])   # generate, classify, translate, save with its arrays

Every ``convert.from_*`` returns ``(linen_model, params)``: ``from_linen(*convert.from_gpt2(hf_model))`` is its NNX
model, and ``convert.to_gpt2(*to_linen(model))`` goes back.
"""

from __future__ import annotations

import dataclasses
import os

from flax import nnx

from transformer_jax import convert
from transformer_jax.nnx.models import Model, from_linen, to_linen


def load_hf(path: str | os.PathLike, dtype=None, *, rngs: nnx.Rngs | None = None) -> Model:
  """The NNX model of a Hugging Face directory (any format :func:`transformer_jax.convert.load_hf` reads; ``dtype``
  as there), holding the converted arrays. ``rngs``: dropout streams for training.

      model = load_hf('path/to/gpt2')
      logits = model(ids)   # (B, T, V)
  """
  return from_linen(*convert.load_hf(path, dtype=dtype), rngs=rngs)


def save_hf(model: Model, path: str | os.PathLike) -> None:
  """Writes ``model`` as a Hugging Face directory (:func:`transformer_jax.convert.save_hf`: ``config.json`` and
  ``model.safetensors``) that ``transformers``' ``from_pretrained`` loads."""
  convert.save_hf(*to_linen(model), path)


def model_of(job, *, rngs: nnx.Rngs | None = None) -> Model:
  """The NNX model of a :func:`transformer_jax.pretrained.load` result, holding its arrays (no copy). ``rngs``:
  dropout streams for training."""
  return from_linen(job.model, job.params, rngs=rngs)


def with_model(job, model: Model):
  """``job`` (a :func:`transformer_jax.pretrained.load` result) with ``model``'s arrays, e.g. after fine-tuning:
  its ``generate_text``, ``classify``, ``fill_mask``, ``embed``, ``translate`` and ``save`` use them. The tokenizer
  and the checkpoint's settings are kept; ``model`` must be of the job's architecture."""
  linen_model, params = to_linen(model)
  if linen_model.config != job.model.config or type(linen_model) is not type(job.model):
    raise ValueError(
      f'the model is a {type(linen_model).__name__} of another config than the '
      f'{type(job.model).__name__} this pretrained job holds'
    )
  return dataclasses.replace(job, model=linen_model, params=params)
