"""The three model families."""

from transformer_jax.models.bert import (
  BERT,
  BERTConfig,
  BERTForMaskedLM,
  BERTForSequenceClassification,
)
from transformer_jax.models.gpt import GPT, GPTConfig
from transformer_jax.models.transformer import Transformer, TransformerConfig

__all__ = [
  'BERT',
  'BERTConfig',
  'BERTForMaskedLM',
  'BERTForSequenceClassification',
  'GPT',
  'GPTConfig',
  'Transformer',
  'TransformerConfig',
]
