"""The encoder-decoder Transformer of "Attention Is All You Need"."""

from __future__ import annotations

import dataclasses

import flax.linen as nn

from transformer_jax import masks
from transformer_jax.config import BlockConfig
from transformer_jax.modules import embeddings
from transformer_jax.modules.blocks import Block, CrossAttentionBlock, Stack
from transformer_jax.modules.normalization import make_norm
from transformer_jax.sharding import Module
from transformer_jax.validation import check_shape, token_validity


@dataclasses.dataclass(frozen=True)
class TransformerConfig(BlockConfig):
  """Encoder-decoder architecture. Defaults are the paper's base model (post-norm, sinusoidal, sqrt(D) scaling)."""

  src_vocab_size: int = 32000
  tgt_vocab_size: int = 32000
  num_decoder_layers: int | None = None  # None: same as num_layers
  pad_id: int | None = 0  # padding id of both vocabularies; None: no padding unless masks are given
  share_embeddings: bool = False  # one table for source and target (needs equal vocabularies)
  tie_output: bool = False  # output projection = target embedding transposed
  output_bias: bool = True
  scale_embeddings: bool = True  # multiply embeddings by sqrt(d_model)
  # 'sinusoidal' (interleaved) | 'sinusoidal_concat' | 'learned' | 'none'
  position_encoding: str = 'sinusoidal'

  def _check(self):
    problems = []
    for name in ('src_vocab_size', 'tgt_vocab_size'):
      if getattr(self, name) < 1:
        problems.append(f'{name} must be positive')
    if self.rope_theta is not None:
      problems.append('rotary positions (rope_theta) are a decoder-only (GPT) option so far')
    if self.num_decoder_layers is not None and self.num_decoder_layers < 1:
      problems.append(f'num_decoder_layers must be positive, got {self.num_decoder_layers}')
    if self.share_embeddings and self.src_vocab_size != self.tgt_vocab_size:
      problems.append(
        f'share_embeddings needs src_vocab_size == tgt_vocab_size, got {self.src_vocab_size} and '
        f'{self.tgt_vocab_size}'
      )
    if self.position_encoding not in embeddings.POSITION_ENCODINGS:
      problems.append(
        f'position_encoding must be one of {embeddings.POSITION_ENCODINGS}, got {self.position_encoding!r}'
      )
    elif self.position_encoding.startswith('sinusoidal') and self.d_model % 2:
      problems.append(f'sinusoidal position encodings need an even d_model, got {self.d_model}')
    if self.pad_id is not None and not 0 <= self.pad_id < min(
      self.src_vocab_size, self.tgt_vocab_size
    ):
      problems.append(f'pad_id={self.pad_id} is outside the vocabularies')
    return problems

  @property
  def decoder_layers(self) -> int:
    return self.num_layers if self.num_decoder_layers is None else self.num_decoder_layers

  @classmethod
  def base(cls, **overrides):
    """The paper's base model: 6+6 layers, d_model 512, 8 heads, d_ff 2048, shared 37k vocabulary, tied output."""
    vocab = dict(src_vocab_size=37000, tgt_vocab_size=37000, share_embeddings=True)
    return cls(**{**vocab, 'tie_output': True, 'output_bias': False, **overrides})

  @classmethod
  def course(cls, **overrides):
    """The course's PyTorch encoder-decoder (see the README): separate embeddings, the course's LayerNorm
    (unbiased std, eps 1e-6 outside the sqrt), 0.1 dropout, a biased output layer, no final norms."""
    shape = dict(src_vocab_size=10000, tgt_vocab_size=10000, d_model=512, num_heads=8, d_ff=2048)
    layers = dict(num_layers=6, max_len=5000, norm_variant='unbiased_std', norm_eps=1e-6)
    return cls(**{**shape, **layers, **overrides})


class Transformer(Module):
  """Encoder-decoder Transformer with :meth:`encode` and :meth:`decode`.

  Parameters: ``source_embed`` (also the target table with ``share_embeddings``), ``target_embed``, optional learned
  ``source_positions``/``target_positions``, ``encoder`` and ``decoder`` :class:`Stack`\\ s, and ``output`` (a Dense)
  or ``output_bias`` (with ``tie_output``).
  """

  config: TransformerConfig

  def setup(self):
    cfg = self.config
    table = lambda vocab: embeddings.TokenEmbedding(  # noqa: E731
      vocab,
      cfg.d_model,
      scale_by_sqrt_dim=cfg.scale_embeddings,
      dtype=cfg.compute_dtype,
      param_dtype=cfg.weight_dtype,
      embedding_init=nn.initializers.normal(cfg.init_std or cfg.d_model**-0.5),
    )
    self.source_embed = table(cfg.src_vocab_size)
    if not cfg.share_embeddings:
      self.target_embed = table(cfg.tgt_vocab_size)
    target_table = self.source_embed if cfg.share_embeddings else self.target_embed
    self.source_positions = embeddings.make_position_encoding(cfg, cfg.position_encoding)
    self.target_positions = embeddings.make_position_encoding(cfg, cfg.position_encoding)
    self.source_embed_norm = make_norm(cfg) if cfg.embed_norm else None
    self.target_embed_norm = make_norm(cfg) if cfg.embed_norm else None
    self.embed_source = embeddings.InputEmbedding(
      self.source_embed, self.source_positions, cfg.dropout_rate, norm=self.source_embed_norm
    )
    self.embed_target = embeddings.InputEmbedding(
      target_table, self.target_positions, cfg.dropout_rate, norm=self.target_embed_norm
    )
    self.encoder = Stack(cfg, Block, cfg.num_layers)
    self.decoder = Stack(cfg, CrossAttentionBlock, cfg.decoder_layers)
    self.head = embeddings.OutputHead(
      cfg.tgt_vocab_size, cfg.tie_output, cfg.output_bias, cfg.weight_dtype, cfg.kernel_init
    )
    nn.share_scope(self, self.head)  # `output` / `output_bias` live at the top of the tree

  def encode(self, src_ids, *, src_valid=None, deterministic: bool = True):
    """``(B, S)`` source ids -> ``(B, S, D)`` memory. ``src_valid``: ``(B, S)``, True for real tokens."""
    cfg = self.config
    src_valid = token_validity(src_ids, src_valid, cfg.pad_id, cfg.max_len, 'source')
    x = self.embed_source(src_ids, deterministic=deterministic)  # (B, S, D)
    return self.encoder(x, masks.key_mask(src_valid), deterministic=deterministic)

  def decode(
    self, tgt_ids, memory, *, memory_valid=None, tgt_valid=None, deterministic: bool = True
  ):
    """``(B, T)`` target ids attending to ``(B, S, D)`` memory -> ``(B, T, V)`` float32 logits.

    ``memory_valid``: ``(B, S)``, True for real source tokens (pass the source's validity; ``None`` = all real).
    ``tgt_valid``: ``(B, T)``; default from ``pad_id``.
    """
    cfg = self.config
    tgt_valid = token_validity(tgt_ids, tgt_valid, cfg.pad_id, cfg.max_len, 'target')
    if memory_valid is not None:
      check_shape(memory_valid, memory.shape[:2], 'memory_valid')
    self_mask = masks.combine_masks(masks.causal_mask(tgt_ids.shape[1]), masks.key_mask(tgt_valid))
    x = self.embed_target(tgt_ids, deterministic=deterministic)  # (B, T, D)
    x = self.decoder(
      x, self_mask, memory, masks.key_mask(memory_valid), deterministic=deterministic
    )
    return self.logits(x)

  def decode_step(self, tgt_ids, memory, *, positions, memory_valid=None):
    """Cached decoding (apply with ``mutable=['cache']``): ``(B, T)`` target ids continuing the cached prefix ->
    ``(B, T, V)`` float32 logits.

    ``memory``: the ``(B, S, D)`` encoder output on the first call, whose cross-attention keys/values are cached;
    ``None`` on later calls. ``positions``: ``(B, T)`` target positions. ``memory_valid``: ``(B, S)`` real source
    tokens, on every call. Every fed target token counts as real.
    """
    check_shape(positions, tgt_ids.shape, 'positions')
    x = self.embed_target(tgt_ids, positions)
    return self.logits(self.decoder(x, None, memory, masks.key_mask(memory_valid), decode=True))

  def logits(self, x):
    """``(B, T, D)`` decoder output -> ``(B, T, V)`` float32 logits."""
    table = self.source_embed if self.config.share_embeddings else self.target_embed
    return self.head(x, table.embedding)

  def __call__(
    self, src_ids, tgt_ids, *, src_valid=None, tgt_valid=None, deterministic: bool = True
  ):
    """Teacher-forced forward pass: ``(B, S)`` source, ``(B, T)`` target input -> ``(B, T, V)`` float32 logits."""
    cfg = self.config
    src_valid = token_validity(src_ids, src_valid, cfg.pad_id, cfg.max_len, 'source')
    memory = self.encode(src_ids, src_valid=src_valid, deterministic=deterministic)
    return self.decode(
      tgt_ids, memory, memory_valid=src_valid, tgt_valid=tgt_valid, deterministic=deterministic
    )
