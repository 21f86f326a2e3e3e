"""GPT: a decoder-only Transformer (learned or rotary positions, pre-norm, final norm, tied head)."""

from __future__ import annotations

import dataclasses

import flax.linen as nn

from transformer_jax import masks
from transformer_jax.config import BlockConfig
from transformer_jax.modules import embeddings
from transformer_jax.modules.blocks import Block, Stack
from transformer_jax.modules.normalization import make_norm
from transformer_jax.sharding import Module
from transformer_jax.validation import check_shape, token_validity

# The block fields every Llama-family GPT has (Llama, Mistral, Qwen2): pre-norm RMSNorm layers, a gated FFN, separate
# Q/K/V projections (grouped-query attention), no biases, rotary positions only, no dropout.
LLAMA_BLOCKS = dict(
  norm_type='rms_norm',
  gated_ffn=True,
  use_bias=False,
  fused_qkv=False,
  pre_norm=True,
  final_norm=True,
  position_encoding='none',
  dropout_rate=0.0,  # on embeddings and residual branches; attention dropout is a config.json key
)


@dataclasses.dataclass(frozen=True)
class GPTConfig(BlockConfig):
  """Decoder-only architecture. Defaults are GPT-2 small; see :meth:`gpt2` and :meth:`course` for presets."""

  vocab_size: int = 50257
  max_len: int = 1024  # block size
  num_layers: int = 12
  d_model: int = 768
  num_heads: int = 12
  d_ff: int = 3072
  activation: str = 'gelu_tanh'
  pre_norm: bool = True
  final_norm: bool = True
  init_std: float | None = 0.02
  fused_qkv: bool = True  # GPT-2 stores one c_attn projection
  tie_output: bool = True  # logits = final hidden @ token embedding^T
  output_bias: bool = False
  position_encoding: str = 'learned'
  pad_id: int | None = None  # GPT-2 has no padding token: pass `valid` for padded batches

  def _check(self):
    problems = []
    if self.vocab_size < 1:
      problems.append('vocab_size must be positive')
    if self.position_encoding not in embeddings.POSITION_ENCODINGS:
      problems.append(
        f'position_encoding must be one of {embeddings.POSITION_ENCODINGS}, got {self.position_encoding!r}'
      )
    if self.pad_id is not None and not 0 <= self.pad_id < self.vocab_size:
      problems.append(f'pad_id={self.pad_id} is outside the vocabulary [0, {self.vocab_size})')
    return problems

  @classmethod
  def gpt2(cls, size: str = 'small', **overrides):
    """GPT-2 ``'small'`` (124M), ``'medium'``, ``'large'`` or ``'xl'``."""
    shapes = {
      'small': (12, 768, 12),
      'medium': (24, 1024, 16),
      'large': (36, 1280, 20),
      'xl': (48, 1600, 25),
    }
    if size not in shapes:
      raise ValueError(f'unknown GPT-2 size {size!r}; expected one of {sorted(shapes)}')
    layers, width, heads = shapes[size]
    return cls(
      **{**dict(num_layers=layers, d_model=width, num_heads=heads, d_ff=4 * width), **overrides}
    )

  @classmethod
  def llama(cls, **overrides):
    """A Llama-family decoder (:data:`LLAMA_BLOCKS`, SwiGLU, rotary positions), Llama 3.2 1B's shape by default;
    ``qkv_bias=True`` is Qwen2's attention, ``sliding_window`` Mistral's."""
    shape = dict(vocab_size=128256, max_len=131072, num_layers=16, d_model=2048, num_heads=32)
    shape.update(num_kv_heads=8, d_ff=8192, tie_output=True)
    rope = dict(rope_theta=500000.0, rope_scaling='llama3', rope_scaling_factor=32.0)
    layers = dict(activation='silu', qkv_bias=False, attention_dropout_rate=0.0)
    return cls(**{**LLAMA_BLOCKS, **shape, **rope, **layers, **overrides})

  @classmethod
  def course(cls, **overrides):
    """The course's nanoGPT-style model (see the README): bias-free Q/K/V, ReLU FFN, a separate biased output
    layer."""
    shape = dict(vocab_size=65, max_len=256, num_layers=6, d_model=384, num_heads=6, d_ff=1536)
    head = dict(tie_output=False, output_bias=True)
    dropout = dict(dropout_rate=0.2, attention_dropout_rate=0.2)
    layers = dict(activation='relu', qkv_bias=False, fused_qkv=False)
    return cls(**{**shape, **layers, **head, **dropout, **overrides})


class GPT(Module):
  """Causal language model: ``(B, T)`` ids -> ``(B, T, V)`` float32 next-token logits.

  Parameters: ``token_embed``, ``positions`` (learned), ``decoder`` (a :class:`Stack` of causal :class:`Block`\\ s
  with a final norm), and ``output`` (or ``output_bias``) as the head needs.
  """

  config: GPTConfig

  def setup(self):
    cfg = self.config
    self.token_embed = embeddings.TokenEmbedding(
      cfg.vocab_size,
      cfg.d_model,
      dtype=cfg.compute_dtype,
      param_dtype=cfg.weight_dtype,
      embedding_init=cfg.kernel_init,
    )
    self.positions = embeddings.make_position_encoding(cfg, cfg.position_encoding)
    self.embed_norm = make_norm(cfg) if cfg.embed_norm else None
    self.embed = embeddings.InputEmbedding(
      self.token_embed, self.positions, cfg.dropout_rate, norm=self.embed_norm
    )
    self.decoder = Stack(cfg, Block, cfg.num_layers)
    self.head = embeddings.OutputHead(
      cfg.vocab_size,
      cfg.tie_output,
      cfg.output_bias,
      cfg.weight_dtype,
      cfg.kernel_init,
      dtype=cfg.compute_dtype,
    )
    nn.share_scope(self, self.head)  # `output` / `output_bias` live at the top of the tree

  def hidden_states(self, ids, *, valid=None, positions=None, deterministic: bool = True):
    """``(B, T)`` ids -> ``(B, T, D)`` final (normed) hidden states.

    ``valid``: ``(B, T)``, True for real tokens (Hugging Face's ``attention_mask``); padded keys are never attended.
    ``positions``: ``(B, T)`` position ids, default ``0..T-1`` (left-padded prompts pass their own).
    """
    cfg = self.config
    valid = token_validity(ids, valid, cfg.pad_id, cfg.max_len, 'input')
    positions = embeddings.default_positions(ids) if positions is None else positions
    # (B|1, 1, T, T)
    mask = masks.combine_masks(
      masks.causal_mask(ids.shape[1], window=cfg.sliding_window), masks.key_mask(valid)
    )
    x = self.embed(ids, positions, deterministic=deterministic)  # (B, T, D)
    return self.decoder(x, mask, positions, deterministic=deterministic)

  def decode_step(self, ids, *, positions, cache_valid=None, last_only: bool = False):
    """Cached decoding (apply with ``mutable=['cache']``): ``(B, T)`` ids continuing the cached sequence ->
    ``(B, T, V)`` float32 logits. The first call prefills the prompt, later ones feed one token each.

    ``positions``: ``(B, T)`` position ids of the new tokens. ``cache_valid``: ``(B, S)`` over every cache slot, True
    for real tokens (False for left padding); slots not yet written are hidden by causality whatever it says.
    ``last_only``: ``(B, 1, V)`` logits of the last position, all a prefill needs (the head is the largest product of
    a short prompt, and its ``(B, T, V)`` logits the largest array).
    """
    check_shape(positions, ids.shape, 'positions')
    x = self.embed(ids, positions)
    h = self.decoder(x, masks.key_mask(cache_valid), positions, decode=True)  # (B, T, D)
    return self.logits(h[:, -1:] if last_only else h)

  def logits(self, x):
    """``(B, T, D)`` -> ``(B, T, V)`` float32 logits."""
    return self.head(x, self.token_embed.embedding)

  def __call__(self, ids, *, valid=None, positions=None, deterministic: bool = True):
    return self.logits(
      self.hidden_states(ids, valid=valid, positions=positions, deterministic=deterministic)
    )
