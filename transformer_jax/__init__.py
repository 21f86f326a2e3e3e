"""transformer_jax: the Transformer family (encoder-decoder, GPT, BERT) as Flax Linen modules on one set of blocks.

import jax, jax.numpy as jnp
from transformer_jax import GPT, GPTConfig

model = GPT(GPTConfig.gpt2())
params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']
logits = model.apply({'params': params}, ids)  # (B, T, V) float32
"""

from transformer_jax import masks, modules
from transformer_jax.config import BlockConfig
from transformer_jax.generation import Beams, beam_search, generate, translate, translate_beams
from transformer_jax.masks import (
  causal_mask,
  combine_masks,
  cross_attention_mask,
  key_mask,
  padding_mask,
)
from transformer_jax.models import (
  BERT,
  GPT,
  BERTConfig,
  BERTForMaskedLM,
  BERTForSequenceClassification,
  EncoderModel,
  GPTConfig,
  Transformer,
  TransformerConfig,
)
from transformer_jax.modules import *  # noqa: F403  (every building block, also as transformer_jax.<name>)

__version__ = '0.2.0'

__all__ = [
  'BERT',
  'BERTConfig',
  'BERTForMaskedLM',
  'BERTForSequenceClassification',
  'BlockConfig',
  'EncoderModel',
  'GPT',
  'GPTConfig',
  'Transformer',
  'TransformerConfig',
  'causal_mask',
  'combine_masks',
  'cross_attention_mask',
  'key_mask',
  'masks',
  'padding_mask',
  'Beams',
  'beam_search',
  'generate',
  'translate',
  'translate_beams',
  *modules.__all__,
]
