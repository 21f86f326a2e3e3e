"""The encoder-decoder Transformer of "Attention Is All You Need", and T5 (Raffel et al. 2020) as a preset of it."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from transformer_jax import masks
from transformer_jax.config import BlockConfig
from transformer_jax.models.encoder import EncoderModel, token_table
from transformer_jax.modules import embeddings
from transformer_jax.modules.blocks import CrossAttentionBlock, Stack
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
  # 'sinusoidal' (interleaved) | 'sinusoidal_concat' | 'learned' | 'none' | 'relative' (T5's bias in self-attention:
  # bidirectional in the encoder, causal in the decoder; see relative_buckets and relative_max_distance)
  position_encoding: str = 'sinusoidal'
  # the token every target input starts with (Hugging Face's decoder_start_token_id). It counts as real even when it
  # is pad_id, as T5's and Marian's start tokens are; None: targets start with a token that is not padding
  decoder_start_id: int | None = None
  # multiply the decoder output by d_model ** -0.5 before the head (T5 v1.0, whose head is the shared table)
  scale_decoder_output: bool = False
  # no gradient reaches the pad_id rows through the token lookups (torch's padding_idx; transformers' BART, Marian)
  freeze_pad_embedding: bool = False

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
    if self.position_encoding not in POSITION_ENCODINGS:
      problems.append(
        f'position_encoding must be one of {POSITION_ENCODINGS}, got {self.position_encoding!r}'
      )
    elif self.position_encoding.startswith('sinusoidal') and self.d_model % 2:
      problems.append(f'sinusoidal position encodings need an even d_model, got {self.d_model}')
    if self.pad_id is not None and not 0 <= self.pad_id < min(
      self.src_vocab_size, self.tgt_vocab_size
    ):
      problems.append(f'pad_id={self.pad_id} is outside the vocabularies')
    if self.decoder_start_id is not None and not 0 <= self.decoder_start_id < self.tgt_vocab_size:
      problems.append(
        f'decoder_start_id={self.decoder_start_id} is outside the target vocabulary [0, {self.tgt_vocab_size})'
      )
    return problems

  @property
  def absolute_positions(self) -> str:
    """The position encoding added to the embeddings (``'none'`` with relative positions)."""
    return 'none' if self.position_encoding == 'relative' else self.position_encoding

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

  @classmethod
  def t5(cls, **overrides):
    """T5 v1.0, sized like ``t5-small``: 6+6 layers, d_model 512, 8 heads of 64, a ReLU FFN of 2048, and one
    32128-token table for the encoder, the decoder and the head, whose input is scaled by d_model ** -0.5."""
    head = dict(activation='relu', tie_output=True, scale_decoder_output=True)
    return cls(**{**T5_BLOCKS, **T5_SMALL, **head, **overrides})

  @classmethod
  def t5_v1_1(cls, **overrides):
    """T5 v1.1 and Flan-T5, sized like ``t5-small``: a gated-GELU FFN (the tanh approximation) and a head of its own
    without the rescale. (``flan-t5-small`` itself, 6 heads of 64 in d_model 512, has no head_dim = d_model //
    num_heads and does not convert; base and larger do.)"""
    head = dict(activation='gelu_tanh', gated_ffn=True, tie_output=False)
    return cls(**{**T5_BLOCKS, **T5_SMALL, **head, **overrides})


POSITION_ENCODINGS = (*embeddings.POSITION_ENCODINGS, 'relative')
# What makes a TransformerConfig a T5, whatever its size and FFN: the presets and the converter share these.
T5_BLOCKS = dict(
  position_encoding='relative',
  norm_type='rms_norm',
  pre_norm=True,
  final_norm=True,
  use_bias=False,
  qkv_bias=False,
  attention_scale=1.0,
  scale_embeddings=False,
  share_embeddings=True,
  output_bias=False,
)
T5_SMALL = dict(
  src_vocab_size=32128,
  tgt_vocab_size=32128,
  num_layers=6,
  d_model=512,
  num_heads=8,
  d_ff=2048,
  norm_eps=1e-6,
  pad_id=0,
  decoder_start_id=0,  # T5 starts decoding from its padding token
)


class Transformer(Module):
  """Encoder-decoder Transformer with :meth:`encode` and :meth:`decode`.

  Parameters: those of its :class:`~transformer_jax.EncoderModel` (``source_embed``, also the target table with
  ``share_embeddings``, optional learned ``source_positions``, ``source_embed_norm`` and the ``encoder``
  :class:`Stack`), ``target_embed``, optional ``target_positions`` and ``target_embed_norm``, the ``decoder`` Stack,
  and ``output`` (a Dense) or ``output_bias`` (with ``tie_output``). With relative positions each stack holds its
  ``relative_position_bias`` table.
  """

  config: TransformerConfig

  def setup(self):
    cfg = self.config
    self.source = EncoderModel(cfg)
    nn.share_scope(self, self.source)  # the encoder's parameters live at the top of the tree
    if not cfg.share_embeddings:
      self.target_embed = token_table(cfg, cfg.tgt_vocab_size)
    target_table = self.source.source_embed if cfg.share_embeddings else self.target_embed
    self.target_positions = embeddings.make_position_encoding(cfg, cfg.absolute_positions)
    self.target_embed_norm = make_norm(cfg) if cfg.embed_norm else None
    self.embed_target = embeddings.InputEmbedding(
      target_table, self.target_positions, cfg.dropout_rate, norm=self.target_embed_norm
    )
    relative = 'causal' if cfg.position_encoding == 'relative' else None
    self.decoder = Stack(cfg, CrossAttentionBlock, cfg.decoder_layers, relative_positions=relative)
    self.head = embeddings.OutputHead(
      cfg.tgt_vocab_size,
      cfg.tie_output,
      cfg.output_bias,
      cfg.weight_dtype,
      cfg.kernel_init,
      dtype=cfg.compute_dtype,
    )
    nn.share_scope(self, self.head)  # `output` / `output_bias` live at the top of the tree

  def encode(self, src_ids, *, src_valid=None, deterministic: bool = True):
    """``(B, S)`` source ids -> ``(B, S, D)`` memory. ``src_valid``: ``(B, S)``, True for real tokens."""
    return self.source(src_ids, src_valid=src_valid, deterministic=deterministic)

  def decode(
    self, tgt_ids, memory, *, memory_valid=None, tgt_valid=None, deterministic: bool = True
  ):
    """``(B, T)`` target ids attending to ``(B, S, D)`` memory -> ``(B, T, V)`` float32 logits.

    ``memory_valid``: ``(B, S)``, True for real source tokens (pass the source's validity; ``None`` = all real).
    ``tgt_valid``: ``(B, T)``; default from ``pad_id``, where a first token equal to ``decoder_start_id`` is real.
    """
    cfg = self.config
    derived = tgt_valid is None
    tgt_valid = token_validity(tgt_ids, tgt_valid, cfg.pad_id, cfg.max_len, 'target')
    if derived and tgt_valid is not None and cfg.decoder_start_id is not None:
      # (B, T): the start token is real though it may be pad_id
      tgt_valid = tgt_valid | (
        (jnp.arange(tgt_ids.shape[1]) == 0) & (tgt_ids == cfg.decoder_start_id)
      )
    if memory_valid is not None:
      check_shape(memory_valid, memory.shape[:2], 'memory_valid')
    self_mask = masks.combine_masks(
      masks.causal_mask(tgt_ids.shape[1], window=cfg.sliding_window), masks.key_mask(tgt_valid)
    )
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
    tokens, on every call. Every fed target token counts as real. With relative positions the queries continue at the
    decoder's cache index, whatever ``positions`` says.
    """
    check_shape(positions, tgt_ids.shape, 'positions')
    x = self.embed_target(tgt_ids, positions)
    return self.logits(self.decoder(x, None, memory, masks.key_mask(memory_valid), decode=True))

  def logits(self, x):
    """``(B, T, D)`` decoder output -> ``(B, T, V)`` float32 logits."""
    cfg = self.config
    if cfg.scale_decoder_output:
      x = x.astype(jnp.float32) * cfg.d_model**-0.5
    table = self.source.source_embed if cfg.share_embeddings else self.target_embed
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
