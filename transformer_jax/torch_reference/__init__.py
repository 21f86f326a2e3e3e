"""PyTorch reference models: the course's encoder-decoder and nanoGPT-style GPT (see the README), masks fixed.

They keep the seeds' architectures and parameter names (so the course's own checkpoints load through
:mod:`transformer_jax.convert`) and differ only where the seeds were wrong: one boolean mask convention everywhere
(``True`` = may attend), a look-ahead mask that hides the future (not the past), and a cross-attention that masks
source padding. The course LayerNorm is kept as taught (unbiased std, ``eps`` outside the square root), since that is
the architecture the course trains. Used by the parity tests, benchmarks and notebooks; the library never imports it.

    ref = Seq2SeqTransformer(src_vocab_size=37, tgt_vocab_size=41, d_model=12, num_layers=2, num_heads=3, d_ff=20)
    logits = ref(src, tgt)  # (B, T, V); padding (id 0) masked in every attention
"""

from transformer_jax.torch_reference.encoder_decoder import (
  Decoder,
  DecoderLayer,
  Encoder,
  EncoderLayer,
  LayerNorm,
  MultiHeadAttention,
  PositionalEncoding,
  PositionWiseFeedForward,
  Seq2SeqTransformer,
)
from transformer_jax.torch_reference.masks import attend, causal_mask, key_mask
from transformer_jax.torch_reference.nanogpt import Block, FeedForward, Head, MultiHead, NanoGPT

__all__ = [
  'Block',
  'Decoder',
  'DecoderLayer',
  'Encoder',
  'EncoderLayer',
  'FeedForward',
  'Head',
  'LayerNorm',
  'MultiHead',
  'MultiHeadAttention',
  'NanoGPT',
  'PositionWiseFeedForward',
  'PositionalEncoding',
  'Seq2SeqTransformer',
  'attend',
  'causal_mask',
  'key_mask',
]
