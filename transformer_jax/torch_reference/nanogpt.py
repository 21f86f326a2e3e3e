"""The course's nanoGPT-style GPT, with its parameter names; masks fixed (see the package docstring)."""

from __future__ import annotations

import torch
from torch import nn

from transformer_jax.torch_reference.masks import attend, causal_mask, key_mask


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
    self.net = nn.Sequential(
      nn.Linear(n_embd, 4 * n_embd), nn.ReLU(), nn.Linear(4 * n_embd, n_embd), nn.Dropout(dropout)
    )

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
  """The course's GPT: token + learned position embeddings, pre-norm blocks, final LayerNorm, a biased
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
    x = self.token_embedding_table(idx) + self.position_embedding_table(
      torch.arange(idx.shape[1], device=idx.device)
    )
    x = self.dropout(x)
    for block in self.blocks:
      x = block(x, mask)
    return self.lm_head(self.ln_f(x))
