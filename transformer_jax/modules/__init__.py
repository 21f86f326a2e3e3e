"""Building blocks, each a Flax Linen module usable on its own through ``init``/``apply``."""

from transformer_jax.modules.attention import MultiHeadAttention, dot_product_attention
from transformer_jax.modules.blocks import DecoderLayer, EncoderLayer, Stack, stack_layers, unstack_layers
from transformer_jax.modules.embeddings import (LearnedPositionalEmbedding, SinusoidalPositionalEncoding,
                                                TokenEmbedding, sinusoidal_table)
from transformer_jax.modules.feedforward import FeedForward
from transformer_jax.modules.normalization import LayerNorm

__all__ = [
    'DecoderLayer', 'EncoderLayer', 'FeedForward', 'LayerNorm', 'LearnedPositionalEmbedding', 'MultiHeadAttention',
    'SinusoidalPositionalEncoding', 'Stack', 'TokenEmbedding', 'dot_product_attention', 'sinusoidal_table',
    'stack_layers', 'unstack_layers',
]
