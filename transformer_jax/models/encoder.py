"""The encoder of the encoder-decoder :class:`~transformer_jax.Transformer` as a model of its own (T5's
``T5EncoderModel``): ``(B, S)`` source ids -> ``(B, S, D)`` hidden states."""

from __future__ import annotations

from typing import TYPE_CHECKING

import flax.linen as nn

from transformer_jax import masks
from transformer_jax.modules import embeddings
from transformer_jax.modules.blocks import Block, Stack
from transformer_jax.modules.normalization import make_norm
from transformer_jax.sharding import Module
from transformer_jax.validation import token_validity

if TYPE_CHECKING:  # transformer.py builds its source side from this file
  from transformer_jax.models.transformer import TransformerConfig


def token_table(config, vocab_size: int) -> embeddings.TokenEmbedding:
  """A ``(V, D)`` token table of an encoder-decoder config (either side's)."""
  return embeddings.TokenEmbedding(
    vocab_size,
    config.d_model,
    scale_by_sqrt_dim=config.scale_embeddings,
    dtype=config.compute_dtype,
    param_dtype=config.weight_dtype,
    embedding_init=nn.initializers.normal(config.init_std or config.d_model**-0.5),
    frozen_row=config.pad_id if config.freeze_pad_embedding else None,
  )


class EncoderModel(Module):
  """The source side of a :class:`~transformer_jax.Transformer` alone, with the same
  :class:`~transformer_jax.TransformerConfig` (its target and head fields unused).

  Parameters: ``source_embed``, optional learned ``source_positions`` and ``source_embed_norm``, and the ``encoder``
  :class:`Stack`: the names they have in a :class:`~transformer_jax.Transformer`, which holds this module in its own
  scope, so the encoder of a full model is those entries of its params.
  """

  config: TransformerConfig

  def setup(self):
    cfg = self.config
    self.source_embed = token_table(cfg, cfg.src_vocab_size)
    self.source_positions = embeddings.make_position_encoding(cfg, cfg.absolute_positions)
    self.source_embed_norm = make_norm(cfg) if cfg.embed_norm else None
    self.embed_source = embeddings.InputEmbedding(
      self.source_embed, self.source_positions, cfg.dropout_rate, norm=self.source_embed_norm
    )
    relative = 'bidirectional' if cfg.position_encoding == 'relative' else None
    self.encoder = Stack(cfg, Block, cfg.num_layers, relative_positions=relative)

  def __call__(self, src_ids, *, src_valid=None, deterministic: bool = True):
    """``(B, S)`` source ids -> ``(B, S, D)`` hidden states (after the final norm, when the config has one).

    ``src_valid``: ``(B, S)``, True for real tokens (Hugging Face's ``attention_mask``); default from ``pad_id``.
    """
    cfg = self.config
    src_valid = token_validity(src_ids, src_valid, cfg.pad_id, cfg.max_len, 'source')
    x = self.embed_source(src_ids, deterministic=deterministic)  # (B, S, D)
    return self.encoder(x, masks.key_mask(src_valid), deterministic=deterministic)
