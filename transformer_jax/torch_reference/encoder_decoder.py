"""The course's encoder-decoder, with its parameter names; masks fixed (see the package docstring)."""

from __future__ import annotations

import math

import torch
from torch import nn

from transformer_jax.torch_reference.masks import attend, causal_mask, key_mask


class LayerNorm(nn.Module):
  """The course's LayerNorm: ``gamma * (x - mean) / (std + eps) + beta`` with the unbiased std."""

  def __init__(self, features: int, eps: float = 1e-6):
    super().__init__()
    self.gamma = nn.Parameter(torch.ones(features))
    self.beta = nn.Parameter(torch.zeros(features))
    self.eps = eps

  def forward(self, x):
    mean = x.mean(-1, keepdim=True)
    std = x.std(-1, keepdim=True)  # unbiased (divides by D - 1)
    return self.gamma * (x - mean) / (std + self.eps) + self.beta


class PositionalEncoding(nn.Module):
  """Interleaved sinusoids: ``pe[p, 2i] = sin(p / 10000^(2i/D))``, ``pe[p, 2i+1] = cos(...)``."""

  def __init__(self, d_model: int, max_seq_length: int = 5000):
    super().__init__()
    position = torch.arange(max_seq_length, dtype=torch.float64)[:, None]
    div_term = torch.exp(
      torch.arange(0, d_model, 2, dtype=torch.float64) * -(math.log(10000.0) / d_model)
    )
    pe = torch.zeros(max_seq_length, d_model, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term)
    # (1, max_len, D), derived: not a weight
    self.register_buffer('pe', pe.float()[None], persistent=False)

  def forward(self, x):
    return x + self.pe[:, : x.size(1)]


class MultiHeadAttention(nn.Module):
  """``W_q``, ``W_k``, ``W_v``, ``W_o``: biased ``nn.Linear(D, D)``; heads split as ``(B, T, H, K)``."""

  def __init__(self, d_model: int, num_heads: int):
    super().__init__()
    assert d_model % num_heads == 0, 'd_model must be divisible by num_heads'
    self.num_heads, self.d_k = num_heads, d_model // num_heads
    self.W_q, self.W_k, self.W_v, self.W_o = (nn.Linear(d_model, d_model) for _ in range(4))

  def split_heads(self, x):
    return x.view(x.shape[0], -1, self.num_heads, self.d_k).transpose(1, 2)  # (B, H, T, K)

  def forward(self, query, key, value, mask=None):
    q, k, v = (
      self.split_heads(self.W_q(query)),
      self.split_heads(self.W_k(key)),
      self.split_heads(self.W_v(value)),
    )
    out = attend(q, k, v, mask).transpose(1, 2)  # (B, T, H, K)
    return self.W_o(out.reshape(out.shape[0], out.shape[1], -1))


class PositionWiseFeedForward(nn.Module):
  def __init__(self, d_model: int, d_ff: int):
    super().__init__()
    self.fc1, self.fc2 = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model)

  def forward(self, x):
    return self.fc2(torch.relu(self.fc1(x)))


class EncoderLayer(nn.Module):
  """Post-norm: ``x = norm(x + drop(attn(x)))``, then the same around the FFN."""

  def __init__(self, d_model, num_heads, d_ff, dropout=0.1):
    super().__init__()
    self.mha, self.ffn = (
      MultiHeadAttention(d_model, num_heads),
      PositionWiseFeedForward(d_model, d_ff),
    )
    self.layernorm1, self.layernorm2 = LayerNorm(d_model), LayerNorm(d_model)
    self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)

  def forward(self, x, mask=None):
    x = self.layernorm1(x + self.dropout1(self.mha(x, x, x, mask)))
    return self.layernorm2(x + self.dropout2(self.ffn(x)))


class DecoderLayer(nn.Module):
  """Post-norm masked self-attention (``mha1``), cross-attention (``mha2``), FFN."""

  def __init__(self, d_model, num_heads, d_ff, dropout=0.1):
    super().__init__()
    self.mha1, self.mha2 = (
      MultiHeadAttention(d_model, num_heads),
      MultiHeadAttention(d_model, num_heads),
    )
    self.ffn = PositionWiseFeedForward(d_model, d_ff)
    self.layernorm1, self.layernorm2, self.layernorm3 = (
      LayerNorm(d_model),
      LayerNorm(d_model),
      LayerNorm(d_model),
    )
    self.dropout1, self.dropout2, self.dropout3 = (
      nn.Dropout(dropout),
      nn.Dropout(dropout),
      nn.Dropout(dropout),
    )

  def forward(self, x, enc_output, self_mask=None, cross_mask=None):
    x = self.layernorm1(x + self.dropout1(self.mha1(x, x, x, self_mask)))
    x = self.layernorm2(x + self.dropout2(self.mha2(x, enc_output, enc_output, cross_mask)))
    return self.layernorm3(x + self.dropout3(self.ffn(x)))


class _EmbeddedStack(nn.Module):
  """The course's encoder and decoder: scaled embeddings plus sinusoids, dropout, then ``num_layers`` layers. The
  layer list keeps the course's attribute name (``encoder_layers`` / ``decoder_layers``), so state dicts match."""

  layer_cls: type
  layers_name: str

  def __init__(self, vocab_size, d_model, num_layers, num_heads, d_ff, max_seq_length, dropout=0.1):
    super().__init__()
    self.d_model = d_model
    self.embedding = nn.Embedding(vocab_size, d_model)
    self.pos_encoding = PositionalEncoding(d_model, max_seq_length)
    setattr(
      self,
      self.layers_name,
      nn.ModuleList([self.layer_cls(d_model, num_heads, d_ff, dropout) for _ in range(num_layers)]),
    )
    self.dropout = nn.Dropout(dropout)

  def forward(self, x, *context):
    """``(B, L)`` ids and the layers' other arguments (masks; the encoder output for the decoder) -> ``(B, L, D)``."""
    x = self.dropout(self.pos_encoding(self.embedding(x) * math.sqrt(self.d_model)))
    for layer in getattr(self, self.layers_name):
      x = layer(x, *context)
    return x


class Encoder(_EmbeddedStack):
  """``forward(ids, mask)``: ``(B, S)`` ids -> ``(B, S, D)``."""

  layer_cls, layers_name = EncoderLayer, 'encoder_layers'


class Decoder(_EmbeddedStack):
  """``forward(ids, enc_output, self_mask, cross_mask)``: ``(B, T)`` ids, ``(B, S, D)`` memory -> ``(B, T, D)``."""

  layer_cls, layers_name = DecoderLayer, 'decoder_layers'


class Seq2SeqTransformer(nn.Module):
  """The course's encoder-decoder (its ``Transformer``), masks fixed. Token ``pad_id`` is padding."""

  def __init__(
    self,
    src_vocab_size,
    tgt_vocab_size,
    d_model=512,
    num_layers=6,
    num_heads=8,
    d_ff=2048,
    max_seq_length=5000,
    dropout=0.1,
    pad_id=0,
  ):
    super().__init__()
    self.pad_id = pad_id
    self.encoder = Encoder(
      src_vocab_size, d_model, num_layers, num_heads, d_ff, max_seq_length, dropout
    )
    self.decoder = Decoder(
      tgt_vocab_size, d_model, num_layers, num_heads, d_ff, max_seq_length, dropout
    )
    self.final_layer = nn.Linear(d_model, tgt_vocab_size)

  def forward(self, src, tgt):
    """``(B, S)`` source and ``(B, T)`` target ids -> ``(B, T, V)`` logits."""
    # (B, 1, 1, S): encoder keys and decoder cross-attention keys
    src_mask = key_mask(src != self.pad_id)
    tgt_mask = causal_mask(tgt.shape[1], tgt.device) & key_mask(tgt != self.pad_id)  # (B, 1, T, T)
    return self.final_layer(self.decoder(tgt, self.encoder(src, src_mask), tgt_mask, src_mask))
