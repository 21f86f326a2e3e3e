"""Token, position and segment embeddings; the input embedding and the output head every model shares."""

from __future__ import annotations

import math
from typing import Any, Callable, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.dtypes import promote_dtype

from transformer_jax.modules.dense import Dense
from transformer_jax.modules.dot import cpu_product
from transformer_jax.modules.take import take
from transformer_jax.sharding import Module, dense_inits
from transformer_jax.validation import check_length, check_token_ids

SinusoidLayout = Literal['interleaved', 'concatenated']
POSITION_ENCODINGS = ('sinusoidal', 'sinusoidal_concat', 'learned', 'none')


class TokenEmbedding(Module):
  """A ``[V, D]`` lookup table with a tied-output ``attend`` path.

  Ids outside ``[0, V)`` raise when they are concrete; under ``jit`` they give NaN rows (never a clamped, plausible
  row), so a bad id shows up in the loss instead of training silently on the wrong token.
  """

  vocab_size: int
  features: int
  scale_by_sqrt_dim: bool = False  # the original Transformer multiplies embeddings by sqrt(d_model)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  embedding_init: Callable = nn.initializers.normal(stddev=1.0)
  # Logical axes of the (V, D) table: a token vocabulary splits over the tensor axis; a small table (BERT's segment
  # types) passes None and stays whole on axis 0.
  vocab_axis: str | None = 'vocab'
  # A row the lookup passes no gradient to, as torch's nn.Embedding(padding_idx=...) does (the tied output head still
  # trains it): transformers' BART and Marian, where the padding token can be a real decoder input (Marian starts
  # decoding from it).
  frozen_row: int | None = None

  def setup(self):
    init = nn.with_logical_partitioning(self.embedding_init, (self.vocab_axis, 'embed'))
    self.embedding = self.param(
      'embedding', init, (self.vocab_size, self.features), self.param_dtype
    )

  def __call__(self, ids):
    """``(B, T)`` int -> ``(B, T, D)`` in ``dtype``."""
    check_token_ids(ids, self.vocab_size)
    valid = (ids >= 0) & (ids < self.vocab_size)
    rows = take(self.embedding, jnp.where(valid, ids, 0))
    if self.frozen_row is not None:
      rows = jnp.where((ids == self.frozen_row)[..., None], jax.lax.stop_gradient(rows), rows)
    out = jnp.where(valid[..., None], rows, jnp.nan).astype(self.dtype)
    if self.scale_by_sqrt_dim:
      out = out * jnp.asarray(math.sqrt(self.features), self.dtype)
    return out

  def attend(self, query):
    """Tied output projection: ``(..., D) -> (..., V)`` logits, computed in float32."""
    return tied_logits(query, self.embedding)


def tied_logits(query, table, dtype=jnp.float32, bias=None):
  """``(..., D)`` by a ``(V, D)`` table (plus a ``(V,)`` ``bias``) -> ``(..., V)`` float32 logits from operands in
  ``dtype`` (a bf16 model's head multiplies in bf16, accumulating in float32, and adds the bias to that float32
  result). In float32 the table is read as stored, so a decoding step's few rows read bf16 weights as bf16
  (:mod:`transformer_jax.kernels.skinny_matmul`)."""
  query = query.astype(dtype)
  if jnp.dtype(dtype) != jnp.float32:
    table = table.astype(dtype)

  def plain(q, t):
    q, t = promote_dtype(q, t)
    return jnp.einsum('...d,vd->...v', q, t, preferred_element_type=jnp.float32)

  if bias is not None:
    bias = bias.astype(jnp.float32)
  return cpu_product(plain, query, table, (((query.ndim - 1,), (1,)), ((), ())), bias)


def sinusoidal_table(
  max_len: int, features: int, layout: SinusoidLayout = 'interleaved', base: float = 10000.0
) -> np.ndarray:
  """The fixed encoding of "Attention Is All You Need": ``[max_len, D]`` float32.

  ``PE[p, 2i] = sin(p / base^(2i/D))``, ``PE[p, 2i+1] = cos(...)``. ``'interleaved'`` puts sin and cos in alternate
  columns (the paper, the course, PyTorch tutorials); ``'concatenated'`` puts all sines first, then all cosines
  (Flax's ``sinusoidal_init``, tensor2tensor).
  """
  if features % 2:
    raise ValueError(f'sinusoidal encodings need an even d_model, got {features}')
  position = np.arange(max_len, dtype=np.float64)[:, None]
  inv_freq = np.exp(np.arange(0, features, 2, dtype=np.float64) * -(math.log(base) / features))
  angles = position * inv_freq  # (max_len, D/2)
  table = np.empty((max_len, features), np.float64)
  if layout == 'interleaved':
    table[:, 0::2], table[:, 1::2] = np.sin(angles), np.cos(angles)
  elif layout == 'concatenated':
    half = features // 2
    table[:, :half], table[:, half:] = np.sin(angles), np.cos(angles)
  else:
    raise ValueError(
      f"unknown sinusoid layout {layout!r}; expected 'interleaved' or 'concatenated'"
    )
  return table.astype(np.float32)


class SinusoidalPositionalEncoding(Module):
  """Fixed sinusoidal encodings (no parameters) looked up by position."""

  max_len: int
  features: int
  layout: SinusoidLayout = 'interleaved'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, positions):
    """``(B, T)`` positions -> ``(B, T, D)`` encodings."""
    check_length(positions.shape[-1], self.max_len)
    check_token_ids(positions, self.max_len, 'positions')
    table = jnp.asarray(sinusoidal_table(self.max_len, self.features, self.layout))
    return jnp.take(table, positions, axis=0).astype(self.dtype)


class LearnedPositionalEmbedding(Module):
  """Learned absolute positions (GPT, BERT): a ``[max_len + offset, D]`` table; position ``p`` reads row
  ``p + offset``. BART's ``offset=2`` keeps two rows its checkpoints carry and never read."""

  max_len: int
  features: int
  offset: int = 0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  embedding_init: Callable = nn.initializers.normal(stddev=0.02)

  @nn.compact
  def __call__(self, positions):
    """``(B, T)`` positions -> ``(B, T, D)`` embeddings."""
    check_length(positions.shape[-1], self.max_len)
    check_token_ids(positions, self.max_len, 'positions')
    rows = (self.max_len + self.offset, self.features)
    # position tables are small: whole on axis 0
    init = nn.with_logical_partitioning(self.embedding_init, (None, 'embed'))
    table = self.param('embedding', init, rows, self.param_dtype)
    return take(table, positions + self.offset).astype(self.dtype)


def make_position_encoding(config, kind: str, name: str | None = None) -> nn.Module | None:
  """The position module ``kind`` names (see :data:`POSITION_ENCODINGS`), or ``None`` for ``'none'`` (no absolute
  positions: rotary attention, or none at all)."""
  if kind in ('sinusoidal', 'sinusoidal_concat'):
    layout = 'interleaved' if kind == 'sinusoidal' else 'concatenated'
    return SinusoidalPositionalEncoding(
      config.max_len, config.d_model, layout, dtype=config.compute_dtype, name=name
    )
  if kind == 'learned':
    return LearnedPositionalEmbedding(
      config.max_len,
      config.d_model,
      config.position_offset,
      dtype=config.compute_dtype,
      param_dtype=config.weight_dtype,
      embedding_init=nn.initializers.normal(config.init_std or 0.02),
      name=name,
    )
  if kind == 'none':
    return None
  raise ValueError(f'unknown position encoding {kind!r}; expected one of {POSITION_ENCODINGS}')


def default_positions(ids):
  """``(B, T)`` positions ``0 .. T-1``."""
  return jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)


class InputEmbedding(Module):
  """``x = dropout(norm(tokens(ids) + positions(p) + segments(s)))``, each part optional but the tokens.

  It owns no parameters: the tables are its owner's (so a model's parameter tree names them, and two embeddings can
  share one token table).
  """

  tokens: TokenEmbedding
  positions: nn.Module | None = None
  dropout_rate: float = 0.0
  segments: TokenEmbedding | None = None
  norm: nn.Module | None = None

  @nn.compact
  def __call__(self, ids, positions=None, segment_ids=None, *, deterministic: bool = True):
    """``(B, T)`` ids (and positions, default ``0..T-1``; segment ids) -> ``(B, T, D)``."""
    x = self.tokens(ids)  # (B, T, D)
    if self.positions is not None:
      x = x + self.positions(default_positions(ids) if positions is None else positions)
    if self.segments is not None:
      x = x + self.segments(jnp.zeros_like(ids) if segment_ids is None else segment_ids)
    if self.norm is not None:
      x = self.norm(x)
    return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)


class OutputHead(Module):
  """``(..., D)`` -> ``(..., V)`` float32 logits: tied to a token table (``x @ table^T``, plus ``bias_name`` when
  ``use_bias``) or a separate ``output`` Dense.

  Its owner shares its scope (``nn.share_scope``), so the parameters (``output`` or ``output_bias``) sit in the
  owner's tree as if the owner had made them.
  """

  vocab_size: int
  tied: bool
  use_bias: bool
  param_dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.xavier_uniform()
  bias_name: str = 'output_bias'
  dtype: Any = jnp.float32  # the product's operands; the logits are float32 whatever it is

  @nn.compact
  def __call__(self, x, table=None):
    """``table``: the ``(V, D)`` token embedding the head is tied to."""
    if not self.tied:
      return Dense(
        self.vocab_size,
        use_bias=self.use_bias,
        dtype=self.dtype,
        result_dtype=jnp.float32,
        param_dtype=self.param_dtype,
        name='output',
        **dense_inits(self.kernel_init, ('embed', 'vocab')),
      )(x)
    bias = None
    if self.use_bias:
      init = nn.with_logical_partitioning(nn.initializers.zeros, ('vocab',))
      bias = self.param(self.bias_name, init, (self.vocab_size,), self.param_dtype)
    return tied_logits(x, table, self.dtype, bias)
