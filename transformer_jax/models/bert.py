"""BERT: an encoder-only Transformer with a pooler, a masked-LM head and a classification head."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from transformer_jax import masks
from transformer_jax.activations import ACTIVATIONS
from transformer_jax.config import BlockConfig
from transformer_jax.modules import embeddings
from transformer_jax.modules.blocks import Block, Stack
from transformer_jax.modules.dense import Dense
from transformer_jax.modules.normalization import make_norm
from transformer_jax.sharding import Module, dense_inits
from transformer_jax.validation import check_shape, check_token_ids, token_validity


@dataclasses.dataclass(frozen=True)
class BERTConfig(BlockConfig):
  """Encoder-only architecture. Defaults are BERT-base (uncased)."""

  vocab_size: int = 30522
  type_vocab_size: int = 2  # segments A/B
  max_len: int = 512
  num_layers: int = 12
  d_model: int = 768
  num_heads: int = 12
  d_ff: int = 3072
  activation: str = 'gelu'  # exact erf GELU
  norm_eps: float = 1e-12
  init_std: float | None = 0.02
  pad_id: int | None = 0
  num_labels: int = 2  # classification head outputs
  classifier_dropout_rate: float | None = None  # None: dropout_rate

  def _check(self):
    problems = []
    for name in ('vocab_size', 'type_vocab_size', 'num_labels'):
      if getattr(self, name) < 1:
        problems.append(f'{name} must be positive, got {getattr(self, name)}')
    if self.pre_norm:
      problems.append('BERT is post-norm; pre_norm=True is not this architecture')
    if self.rope_theta is not None:
      problems.append('rotary positions (rope_theta) are a decoder-only (GPT) option so far')
    if self.sliding_window is not None:
      problems.append('sliding_window limits causal self-attention; BERT has none')
    if self.pad_id is not None and not 0 <= self.pad_id < self.vocab_size:
      problems.append(f'pad_id={self.pad_id} is outside the vocabulary [0, {self.vocab_size})')
    return problems

  @classmethod
  def base(cls, **overrides):
    """BERT-base: 12 layers, d_model 768, 12 heads (110M parameters)."""
    return cls(**overrides)

  @classmethod
  def large(cls, **overrides):
    """BERT-large: 24 layers, d_model 1024, 16 heads."""
    return cls(**{**dict(num_layers=24, d_model=1024, num_heads=16, d_ff=4096), **overrides})


def _head_inits(cfg) -> dict:
  """The pooler's, MLM transform's and classifier's ``(D, out)`` kernels: split on their input features (FSDP),
  like every kernel; their small outputs stay whole."""
  return dense_inits(cfg.kernel_init, ('embed', None))


class BERT(Module):
  """The encoder: ``(B, T)`` ids -> ``((B, T, D)`` sequence output, ``(B, D)`` pooled ``[CLS]`` or ``None``)."""

  config: BERTConfig
  add_pooler: bool = True

  @nn.compact
  def __call__(self, ids, *, token_type_ids=None, valid=None, deterministic: bool = True):
    """``valid``: ``(B, T)``, True for real tokens (default from ``pad_id``); ``token_type_ids`` default 0."""
    cfg = self.config
    valid = token_validity(ids, valid, cfg.pad_id, cfg.max_len, 'input')
    if token_type_ids is not None:
      check_shape(token_type_ids, ids.shape, 'token_type_ids')
    table = lambda vocab, name, vocab_axis='vocab': embeddings.TokenEmbedding(  # noqa: E731
      vocab,
      cfg.d_model,
      dtype=cfg.compute_dtype,
      param_dtype=cfg.weight_dtype,
      embedding_init=cfg.kernel_init,
      vocab_axis=vocab_axis,
      name=name,
    )
    positions = embeddings.LearnedPositionalEmbedding(
      cfg.max_len,
      cfg.d_model,
      dtype=cfg.compute_dtype,
      param_dtype=cfg.weight_dtype,
      embedding_init=cfg.kernel_init,
      name='positions',
    )
    embed = embeddings.InputEmbedding(
      table(cfg.vocab_size, 'token_embed'),
      positions,
      cfg.dropout_rate,
      segments=table(cfg.type_vocab_size, 'token_type_embed', None),
      norm=make_norm(cfg, 'embed_norm'),
    )
    x = embed(ids, segment_ids=token_type_ids, deterministic=deterministic)  # (B, T, D)
    x = Stack(cfg, Block, cfg.num_layers, name='encoder')(
      x, masks.key_mask(valid), deterministic=deterministic
    )
    pooled = None
    if self.add_pooler:
      # (B, D)
      pooled = jnp.tanh(
        Dense(
          cfg.d_model,
          dtype=cfg.compute_dtype,
          param_dtype=cfg.weight_dtype,
          **_head_inits(cfg),
          name='pooler',
        )(x[:, 0])
      )
    return x, pooled


class BERTForMaskedLM(Module):
  """BERT with the masked-LM head: ``(B, T)`` ids -> ``(B, T, V)`` float32 logits (decoder tied to the embedding).

  ``masked_positions``: ``(B, P)`` indices into ``T``; the head then runs at those positions only and returns
  ``(B, P, V)`` logits, as the original BERT's pretraining does. Training needs logits only where tokens were
  masked (15%), and the head's vocabulary-wide product is the largest one of a small BERT.
  """

  config: BERTConfig

  @nn.compact
  def __call__(
    self, ids, *, token_type_ids=None, valid=None, masked_positions=None, deterministic: bool = True
  ):
    cfg = self.config
    bert = BERT(cfg, add_pooler=False, name='bert')
    x, _ = bert(ids, token_type_ids=token_type_ids, valid=valid, deterministic=deterministic)
    if masked_positions is not None:
      if masked_positions.ndim != 2 or masked_positions.shape[0] != ids.shape[0]:
        raise ValueError(
          f'masked_positions must have shape (B, P) = ({ids.shape[0]}, P), got {tuple(masked_positions.shape)}'
        )
      check_token_ids(masked_positions, ids.shape[1], 'masked_positions', 'the sequence')
      # (B, P, D); a traced index out of range gives a NaN row ('fill'), never another position's
      x = jnp.take_along_axis(x, masked_positions[..., None], axis=1, mode='fill')
    x = Dense(
      cfg.d_model,
      dtype=cfg.compute_dtype,
      param_dtype=cfg.weight_dtype,
      **_head_inits(cfg),
      name='mlm_dense',
    )(x)
    x = make_norm(cfg, 'mlm_norm')(ACTIVATIONS[cfg.activation](x))
    head = embeddings.OutputHead(
      cfg.vocab_size,
      tied=True,
      use_bias=True,
      param_dtype=cfg.weight_dtype,
      bias_name='mlm_bias',
      dtype=cfg.compute_dtype,
    )
    nn.share_scope(self, head)  # the decoder bias is `mlm_bias` at the top of the tree
    # decoder tied to the (V, D) token table
    return head(x, nn.unbox(bert.variables['params']['token_embed']['embedding']))


class BERTForSequenceClassification(Module):
  """BERT with a classifier on the pooled ``[CLS]`` output: ``(B, T)`` ids -> ``(B, num_labels)`` float32 logits."""

  config: BERTConfig

  @nn.compact
  def __call__(self, ids, *, token_type_ids=None, valid=None, deterministic: bool = True):
    cfg = self.config
    _, pooled = BERT(cfg, name='bert')(
      ids, token_type_ids=token_type_ids, valid=valid, deterministic=deterministic
    )
    rate = cfg.dropout_rate if cfg.classifier_dropout_rate is None else cfg.classifier_dropout_rate
    pooled = nn.Dropout(rate)(pooled, deterministic=deterministic)
    return Dense(
      cfg.num_labels,
      dtype=jnp.float32,
      param_dtype=cfg.weight_dtype,
      **_head_inits(cfg),
      name='classifier',
    )(pooled.astype(jnp.float32))
