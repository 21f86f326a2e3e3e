"""PyTorch reference models: the course's encoder-decoder (seed 002) and nanoGPT-style GPT (seed 004), masks fixed.

They keep the seeds' architectures and parameter names (so the course's own checkpoints load through
:mod:`transformer_jax.convert`) and differ only where the seeds were wrong: one boolean mask convention everywhere
(``True`` = may attend), a look-ahead mask that hides the future (not the past), and a cross-attention that masks
source padding. The course LayerNorm is kept as taught (unbiased std, ``eps`` outside the square root), since that is
the architecture the course trains. Used by the parity tests, benchmarks and notebooks; the library never imports it.

    ref = Seq2SeqTransformer(src_vocab_size=37, tgt_vocab_size=41, d_model=12, num_layers=2, num_heads=3, d_ff=20)
    logits = ref(src, tgt)  # (B, T, V); padding (id 0) masked in every attention
"""

from __future__ import annotations

import math

import torch
from torch import nn

# ------------------------------------------------------------------------------------------------ shared pieces


def attend(q, k, v, mask=None):
  """Scaled dot-product attention: ``(B, H, T, K)``, ``(B, H, S, K)`` x2, bool mask broadcastable to ``(B, H, T, S)``
  (``True`` = may attend) -> ``(B, H, T, K)``. A row with no visible key gets zeros, not NaN."""
  logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, T, S)
  if mask is not None:
    logits = logits.masked_fill(~mask, float('-inf'))
  weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # fully masked rows: softmax of all -inf is NaN
  return weights @ v


def key_mask(valid):
  """``(B, S)`` "token is real" -> ``(B, 1, 1, S)`` mask."""
  return valid[:, None, None, :]


def causal_mask(length: int, device=None):
  """``(1, 1, T, T)``: query ``t`` may see keys ``s <= t``."""
  return torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]


# ---------------------------------------------------------------------------------- seed 002: encoder-decoder


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
    div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64) * -(math.log(10000.0) / d_model))
    pe = torch.zeros(max_seq_length, d_model, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term)
    self.register_buffer('pe', pe.float()[None], persistent=False)  # (1, max_len, D), derived: not a weight

  def forward(self, x):
    return x + self.pe[:, :x.size(1)]


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
    q, k, v = self.split_heads(self.W_q(query)), self.split_heads(self.W_k(key)), self.split_heads(self.W_v(value))
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
    self.mha, self.ffn = MultiHeadAttention(d_model, num_heads), PositionWiseFeedForward(d_model, d_ff)
    self.layernorm1, self.layernorm2 = LayerNorm(d_model), LayerNorm(d_model)
    self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)

  def forward(self, x, mask=None):
    x = self.layernorm1(x + self.dropout1(self.mha(x, x, x, mask)))
    return self.layernorm2(x + self.dropout2(self.ffn(x)))


class DecoderLayer(nn.Module):
  """Post-norm masked self-attention (``mha1``), cross-attention (``mha2``), FFN."""

  def __init__(self, d_model, num_heads, d_ff, dropout=0.1):
    super().__init__()
    self.mha1, self.mha2 = MultiHeadAttention(d_model, num_heads), MultiHeadAttention(d_model, num_heads)
    self.ffn = PositionWiseFeedForward(d_model, d_ff)
    self.layernorm1, self.layernorm2, self.layernorm3 = LayerNorm(d_model), LayerNorm(d_model), LayerNorm(d_model)
    self.dropout1, self.dropout2, self.dropout3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

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
    setattr(self, self.layers_name,
            nn.ModuleList([self.layer_cls(d_model, num_heads, d_ff, dropout) for _ in range(num_layers)]))
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
  """The course's encoder-decoder (seed 002, its ``Transformer``), masks fixed. Token ``pad_id`` is padding."""

  def __init__(self, src_vocab_size, tgt_vocab_size, d_model=512, num_layers=6, num_heads=8, d_ff=2048,
               max_seq_length=5000, dropout=0.1, pad_id=0):
    super().__init__()
    self.pad_id = pad_id
    self.encoder = Encoder(src_vocab_size, d_model, num_layers, num_heads, d_ff, max_seq_length, dropout)
    self.decoder = Decoder(tgt_vocab_size, d_model, num_layers, num_heads, d_ff, max_seq_length, dropout)
    self.final_layer = nn.Linear(d_model, tgt_vocab_size)

  def forward(self, src, tgt):
    """``(B, S)`` source and ``(B, T)`` target ids -> ``(B, T, V)`` logits."""
    src_mask = key_mask(src != self.pad_id)  # (B, 1, 1, S): encoder keys and decoder cross-attention keys
    tgt_mask = causal_mask(tgt.shape[1], tgt.device) & key_mask(tgt != self.pad_id)  # (B, 1, T, T)
    return self.final_layer(self.decoder(tgt, self.encoder(src, src_mask), tgt_mask, src_mask))


# ---------------------------------------------------------------------------------------- seed 004: nanoGPT


class Head(nn.Module):
  """One causal attention head with bias-free ``key``/``query``/``value``: ``(B, T, D)`` -> ``(B, T, K)``."""

  def __init__(self, n_embd: int, head_size: int):
    super().__init__()
    self.key = nn.Linear(n_embd, head_size, bias=False)
    self.query = nn.Linear(n_embd, head_size, bias=False)
    self.value = nn.Linear(n_embd, head_size, bias=False)

  def forward(self, x, mask):
    q, k, v = self.query(x), self.key(x), self.value(x)  # (B, T, K) each
    return attend(q[:, None], k[:, None], v[:, None], mask)[:, 0]


class MultiHead(nn.Module):
  """Heads run side by side, concatenated, projected by a biased ``proj``."""

  def __init__(self, n_embd: int, n_head: int, dropout: float):
    super().__init__()
    self.heads = nn.ModuleList([Head(n_embd, n_embd // n_head) for _ in range(n_head)])
    self.proj = nn.Linear(n_embd, n_embd)
    self.dropout = nn.Dropout(dropout)

  def forward(self, x, mask):
    return self.dropout(self.proj(torch.cat([h(x, mask) for h in self.heads], dim=-1)))


class FeedForward(nn.Module):
  def __init__(self, n_embd: int, dropout: float):
    super().__init__()
    self.net = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.ReLU(), nn.Linear(4 * n_embd, n_embd),
                             nn.Dropout(dropout))

  def forward(self, x):
    return self.net(x)


class Block(nn.Module):
  """Pre-norm: ``x = x + sa(ln1(x))``, ``x = x + ffwd(ln2(x))``."""

  def __init__(self, n_embd: int, n_head: int, dropout: float):
    super().__init__()
    self.sa, self.ffwd = MultiHead(n_embd, n_head, dropout), FeedForward(n_embd, dropout)
    self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)

  def forward(self, x, mask):
    x = x + self.sa(self.ln1(x), mask)
    return x + self.ffwd(self.ln2(x))


class NanoGPT(nn.Module):
  """The course's GPT (seed 004): token + learned position embeddings, pre-norm blocks, final LayerNorm, a biased
  untied ``lm_head``. ``(B, T)`` ids -> ``(B, T, V)`` logits."""

  def __init__(self, vocab_size=65, block_size=256, n_embd=384, n_head=6, n_layer=6, dropout=0.2):
    super().__init__()
    self.token_embedding_table = nn.Embedding(vocab_size, n_embd)
    self.position_embedding_table = nn.Embedding(block_size, n_embd)
    self.blocks = nn.ModuleList([Block(n_embd, n_head, dropout) for _ in range(n_layer)])
    self.ln_f = nn.LayerNorm(n_embd)
    self.lm_head = nn.Linear(n_embd, vocab_size)
    self.dropout = nn.Dropout(dropout)

  def forward(self, idx, valid=None):
    """``valid``: optional ``(B, T)``, True for real tokens (padded keys are never attended)."""
    mask = causal_mask(idx.shape[1], idx.device)
    if valid is not None:
      mask = mask & key_mask(valid)
    x = self.token_embedding_table(idx) + self.position_embedding_table(torch.arange(idx.shape[1], device=idx.device))
    x = self.dropout(x)
    for block in self.blocks:
      x = block(x, mask)
    return self.lm_head(self.ln_f(x))
