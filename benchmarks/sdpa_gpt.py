"""The GPT a PyTorch user writes today, as a benchmark peer: nanoGPT's ``model.py`` layout (one fused ``c_attn``
projection, ``F.scaled_dot_product_attention(is_causal=True)``, pre-LN) with the course GPT's choices (no Q/K/V bias,
ReLU FFN, an untied biased head), so it has our ``GPTConfig.course()`` parameters and FLOPs. The course's own
reference (``torch_reference.NanoGPT``) loops over small heads; this one does not."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
  def __init__(self, d: int, heads: int, dropout: float):
    super().__init__()
    self.c_attn, self.c_proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d)
    self.heads, self.dropout = heads, dropout

  def forward(self, x):  # (B, T, D)
    b, t, d = x.shape
    q, k, v = self.c_attn(x).split(d, dim=2)
    q, k, v = (
      z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v)
    )  # (B, H, T, K)
    y = F.scaled_dot_product_attention(
      q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
    )
    return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, d))


class Block(nn.Module):
  def __init__(self, d: int, heads: int, d_ff: int, dropout: float):
    super().__init__()
    self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
    self.attn = CausalSelfAttention(d, heads, dropout)
    self.mlp = nn.Sequential(nn.Linear(d, d_ff), nn.ReLU(), nn.Linear(d_ff, d), nn.Dropout(dropout))

  def forward(self, x):
    x = x + self.attn(self.ln_1(x))
    return x + self.mlp(self.ln_2(x))


class SdpaGPT(nn.Module):
  """``(B, T)`` ids -> ``(B, T, V)`` logits; learned positions."""

  def __init__(
    self, vocab: int, max_len: int, d: int, heads: int, layers: int, d_ff: int, dropout=0.0
  ):
    super().__init__()
    self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(max_len, d)
    self.drop = nn.Dropout(dropout)
    self.blocks = nn.ModuleList([Block(d, heads, d_ff, dropout) for _ in range(layers)])
    self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

  def forward(self, ids):
    x = self.drop(self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device)))
    for block in self.blocks:
      x = block(x)
    return self.head(self.ln_f(x))
