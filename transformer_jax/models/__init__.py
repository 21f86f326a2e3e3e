"""The model families: encoder-decoder (and its encoder alone), GPT, BERT."""

from transformer_jax.models.bert import (
  BERT,
  BERTConfig,
  BERTForMaskedLM,
  BERTForSequenceClassification,
)
from transformer_jax.models.encoder import EncoderModel
from transformer_jax.models.gpt import GPT, GPTConfig
from transformer_jax.models.transformer import Transformer, TransformerConfig

__all__ = [
  'BERT',
  'BERTConfig',
  'BERTForMaskedLM',
  'BERTForSequenceClassification',
  'EncoderModel',
  'GPT',
  'GPTConfig',
  'Transformer',
  'TransformerConfig',
]
