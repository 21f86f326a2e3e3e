"""Every model of transformer_jax as a Flax NNX module, computing what its Linen self computes.

    from flax import nnx
    import transformer_jax.nnx as tnnx

    model = tnnx.GPT(GPTConfig.gpt2(), rngs=nnx.Rngs(0))      # or tnnx.from_linen(linen_model, params)
    logits = model(ids, valid=valid)                          # (B, T, V): the Linen __call__'s arguments
    optimizer = nnx.Optimizer(model, optax.adamw(3e-4), wrt=nnx.Param)
    linen_model, params = tnnx.to_linen(model)                # the same arrays, no copy
    tokens = tnnx.generate(model, prompt_ids, max_new_tokens=32)

Each model is the Linen module inside ``flax.nnx.bridge.ToNNX`` (:mod:`transformer_jax.nnx.models`); decoding
reuses :mod:`transformer_jax.generation` (:mod:`transformer_jax.nnx.generation`); :mod:`transformer_jax.nnx.hf` reads
and writes Hugging Face directories and runs :func:`transformer_jax.pretrained.load`'s jobs on NNX models;
:mod:`transformer_jax.nnx.train_step` is a small NNX training loop (``python -m train --config.api=nnx`` is the
full one).
"""

from transformer_jax.nnx.generation import beam_search, generate, translate, translate_beams
from transformer_jax.nnx.hf import load_hf, model_of, save_hf, with_model
from transformer_jax.nnx.models import (
  BERT,
  GPT,
  BERTForMaskedLM,
  BERTForSequenceClassification,
  EncoderModel,
  Model,
  Transformer,
  from_linen,
  load_params,
  logical_axes,
  shard,
  to_linen,
)

__all__ = [
  'BERT',
  'BERTForMaskedLM',
  'BERTForSequenceClassification',
  'EncoderModel',
  'GPT',
  'Model',
  'Transformer',
  'beam_search',
  'from_linen',
  'generate',
  'load_hf',
  'load_params',
  'logical_axes',
  'model_of',
  'save_hf',
  'shard',
  'to_linen',
  'translate',
  'translate_beams',
  'with_model',
]
