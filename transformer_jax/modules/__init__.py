"""Building blocks, each a Flax Linen module usable on its own through ``init``/``apply``."""

from transformer_jax.modules.attention import MultiHeadAttention, dot_product_attention
from transformer_jax.modules.blocks import (
  Block,
  CrossAttentionBlock,
  DecoderLayer,
  EncoderLayer,
  Stack,
  stack_layers,
  unstack_layers,
)
from transformer_jax.modules.cross_entropy import CrossEntropy, softmax_cross_entropy
from transformer_jax.modules.embeddings import (
  InputEmbedding,
  LearnedPositionalEmbedding,
  OutputHead,
  SinusoidalPositionalEncoding,
  TokenEmbedding,
  sinusoidal_table,
)
from transformer_jax.modules.feedforward import FeedForward
from transformer_jax.modules.normalization import LayerNorm, RMSNorm
from transformer_jax.modules.rotary import apply_rotary

__all__ = [
  'Block',
  'CrossAttentionBlock',
  'CrossEntropy',
  'DecoderLayer',
  'EncoderLayer',
  'FeedForward',
  'InputEmbedding',
  'LayerNorm',
  'LearnedPositionalEmbedding',
  'MultiHeadAttention',
  'OutputHead',
  'RMSNorm',
  'SinusoidalPositionalEncoding',
  'Stack',
  'TokenEmbedding',
  'apply_rotary',
  'dot_product_attention',
  'sinusoidal_table',
  'softmax_cross_entropy',
  'stack_layers',
  'unstack_layers',
]
