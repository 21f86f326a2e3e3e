"""The encoder-decoder Transformer of "Attention Is All You Need"."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from transformer_jax import masks
from transformer_jax.config import BlockConfig
from transformer_jax.models.common import (POSITION_ENCODINGS, default_positions, key_mask_or_none,
                                           make_position_encoding, token_validity)
from transformer_jax.modules.blocks import DecoderLayer, EncoderLayer, Stack
from transformer_jax.modules.embeddings import TokenEmbedding
from transformer_jax.validation import check_shape


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
  position_encoding: str = 'sinusoidal'  # 'sinusoidal' (interleaved) | 'sinusoidal_concat' | 'learned' | 'none'

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
      problems.append(f'share_embeddings needs src_vocab_size == tgt_vocab_size, got {self.src_vocab_size} and '
                      f'{self.tgt_vocab_size}')
    if self.position_encoding not in POSITION_ENCODINGS:
      problems.append(f'position_encoding must be one of {POSITION_ENCODINGS}, got {self.position_encoding!r}')
    elif self.position_encoding.startswith('sinusoidal') and self.d_model % 2:
      problems.append(f'sinusoidal position encodings need an even d_model, got {self.d_model}')
    if self.pad_id is not None and not 0 <= self.pad_id < min(self.src_vocab_size, self.tgt_vocab_size):
      problems.append(f'pad_id={self.pad_id} is outside the vocabularies')
    return problems

  @property
  def decoder_layers(self) -> int:
    return self.num_layers if self.num_decoder_layers is None else self.num_decoder_layers

  @classmethod
  def base(cls, **overrides):
    """The paper's base model: 6+6 layers, d_model 512, 8 heads, d_ff 2048, shared 37k vocabulary, tied output."""
    return cls(**{**dict(src_vocab_size=37000, tgt_vocab_size=37000, share_embeddings=True, tie_output=True,
                         output_bias=False), **overrides})

  @classmethod
  def course(cls, **overrides):
    """The course's PyTorch model (seed 002): separate embeddings, the course LayerNorm (unbiased std, eps 1e-6
    outside the sqrt), 0.1 dropout, a biased output layer, no final norms."""
    return cls(**{**dict(src_vocab_size=10000, tgt_vocab_size=10000, d_model=512, num_heads=8, d_ff=2048,
                         num_layers=6, max_len=5000, norm_variant='seed', norm_eps=1e-6), **overrides})


class Transformer(nn.Module):
  """Encoder-decoder Transformer with :meth:`encode` and :meth:`decode`.

  Parameters: ``source_embed`` (also the target table with ``share_embeddings``), ``target_embed``, optional learned
  ``source_positions``/``target_positions``, ``encoder`` and ``decoder`` :class:`Stack`\\ s, and ``output`` (a Dense)
  or ``output_bias`` (with ``tie_output``).
  """

  config: TransformerConfig

  def setup(self):
    cfg = self.config
    embed = lambda vocab: TokenEmbedding(  # noqa: E731
        vocab, cfg.d_model, scale_by_sqrt_dim=cfg.scale_embeddings, dtype=cfg.compute_dtype,
        param_dtype=cfg.weight_dtype, embedding_init=nn.initializers.normal(cfg.init_std or cfg.d_model**-0.5))
    self.source_embed = embed(cfg.src_vocab_size)
    if not cfg.share_embeddings:
      self.target_embed = embed(cfg.tgt_vocab_size)
    self.source_positions = make_position_encoding(cfg, cfg.position_encoding)
    self.target_positions = make_position_encoding(cfg, cfg.position_encoding)
    self.dropout = nn.Dropout(cfg.dropout_rate)
    self.encoder = Stack(cfg, EncoderLayer, cfg.num_layers)
    self.decoder = Stack(cfg, DecoderLayer, cfg.decoder_layers)
    if cfg.tie_output:
      if cfg.output_bias:
        self.output_bias = self.param('output_bias', nn.initializers.zeros, (cfg.tgt_vocab_size,), cfg.weight_dtype)
    else:
      self.output = nn.Dense(cfg.tgt_vocab_size, use_bias=cfg.output_bias, dtype=jnp.float32,
                             param_dtype=cfg.weight_dtype, kernel_init=cfg.kernel_init)

  def _target_table(self) -> TokenEmbedding:
    return self.source_embed if self.config.share_embeddings else self.target_embed

  def _embed(self, ids, table, positions_module, deterministic, positions=None):
    x = table(ids)  # (B, T, D)
    if positions_module is not None:
      x = x + positions_module(default_positions(ids) if positions is None else positions)
    return self.dropout(x, deterministic=deterministic)

  def encode(self, src_ids, *, src_valid=None, deterministic: bool = True):
    """``(B, S)`` source ids -> ``(B, S, D)`` memory. ``src_valid``: ``(B, S)``, True for real tokens."""
    cfg = self.config
    src_valid = token_validity(src_ids, src_valid, cfg.pad_id, cfg.max_len, 'source')
    x = self._embed(src_ids, self.source_embed, self.source_positions, deterministic)
    return self.encoder(x, key_mask_or_none(src_valid), deterministic=deterministic)

  def decode(self, tgt_ids, memory, *, memory_valid=None, tgt_valid=None, deterministic: bool = True):
    """``(B, T)`` target ids attending to ``(B, S, D)`` memory -> ``(B, T, V)`` float32 logits.

    ``memory_valid``: ``(B, S)``, True for real source tokens (pass the source's validity; ``None`` = all real).
    ``tgt_valid``: ``(B, T)``; default from ``pad_id``.
    """
    cfg = self.config
    tgt_valid = token_validity(tgt_ids, tgt_valid, cfg.pad_id, cfg.max_len, 'target')
    if memory_valid is not None and memory_valid.shape != memory.shape[:2]:
      raise ValueError(f'memory_valid has shape {tuple(memory_valid.shape)}, expected {tuple(memory.shape[:2])}')
    self_mask = masks.combine_masks(masks.causal_mask(tgt_ids.shape[1]), key_mask_or_none(tgt_valid))
    x = self._embed(tgt_ids, self._target_table(), self.target_positions, deterministic)
    x = self.decoder(x, self_mask, memory, key_mask_or_none(memory_valid), deterministic=deterministic)
    return self.logits(x)

  def decode_step(self, tgt_ids, memory, *, positions, memory_valid=None):
    """Cached decoding (apply with ``mutable=['cache']``): ``(B, T)`` target ids continuing the cached prefix ->
    ``(B, T, V)`` float32 logits.

    ``memory``: the ``(B, S, D)`` encoder output on the first call, whose cross-attention keys/values are cached;
    ``None`` on later calls. ``positions``: ``(B, T)`` target positions. ``memory_valid``: ``(B, S)`` real source
    tokens, on every call. Every fed target token counts as real.
    """
    check_shape(positions, tgt_ids.shape, 'positions')
    x = self._embed(tgt_ids, self._target_table(), self.target_positions, True, positions)
    return self.logits(self.decoder(x, None, memory, key_mask_or_none(memory_valid), decode=True))

  def logits(self, x):
    """``(B, T, D)`` decoder output -> ``(B, T, V)`` float32 logits."""
    cfg = self.config
    if cfg.tie_output:
      out = self._target_table().attend(x)
      return out + self.output_bias.astype(jnp.float32) if cfg.output_bias else out
    return self.output(x.astype(jnp.float32))

  def __call__(self, src_ids, tgt_ids, *, src_valid=None, tgt_valid=None, deterministic: bool = True):
    """Teacher-forced forward pass: ``(B, S)`` source, ``(B, T)`` target input -> ``(B, T, V)`` float32 logits."""
    cfg = self.config
    src_valid = token_validity(src_ids, src_valid, cfg.pad_id, cfg.max_len, 'source')
    memory = self.encode(src_ids, src_valid=src_valid, deterministic=deterministic)
    return self.decode(tgt_ids, memory, memory_valid=src_valid, tgt_valid=tgt_valid, deterministic=deterministic)
