"""The architecture fields every model family shares.

Each model has one frozen config (:class:`~transformer_jax.TransformerConfig`, :class:`~transformer_jax.GPTConfig`,
:class:`~transformer_jax.BERTConfig`) that extends :class:`BlockConfig`, is validated on construction, and is passed
whole to the layers. Runtime modes (``deterministic``) are call arguments, never config fields.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer_jax.activations import ACTIVATIONS

NORM_TYPES = ('layer_norm', 'rms_norm')
# Hugging Face's rope_type values we implement ('default' is None)
ROPE_SCALINGS = (
  None,
  'linear',
  'llama3',
)

REMAT_POLICIES = {
  'none': None,
  'full': jax.checkpoint_policies.nothing_saveable,  # recompute everything in the backward pass
  'dots': jax.checkpoint_policies.dots_saveable,  # keep matmul outputs, recompute the cheap elementwise work
  'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """Fields of the attention/FFN layer stack."""

  num_layers: int = 6
  d_model: int = 512
  num_heads: int = 8
  # key/value heads (grouped-query attention; 1: multi-query); None: num_heads
  num_kv_heads: int | None = None
  d_ff: int = 2048
  max_len: int = 512  # longest sequence the position encoding covers
  position_offset: int = 0  # learned positions read row p + offset (BART: 2)
  embed_norm: bool = False  # a norm on the summed embeddings, before dropout (BART)
  dropout_rate: float = 0.1  # embeddings and residual branches
  attention_dropout_rate: float = 0.1  # attention weights
  # 'relu' | 'gelu' (exact erf) | 'gelu_tanh' (GPT-2's approximation) | 'silu'
  activation: str = 'relu'
  # act(x W_gate) * (x W_in), then W_out: SwiGLU with 'silu' (Llama), GeGLU with 'gelu*'
  gated_ffn: bool = False
  norm_type: str = 'layer_norm'  # 'layer_norm' | 'rms_norm' (T5, Llama)
  # LayerNorm: 'standard' | 'unbiased_std' ((x - mean) / (std + eps), the course's)
  norm_variant: str = 'standard'
  # RMSNorm applies (1 + scale), the scale stored as an offset (Gemma)
  norm_scale_plus_one: bool = False
  norm_eps: float = 1e-5  # PyTorch's default; BERT uses 1e-12, the course's LayerNorm 1e-6
  pre_norm: bool = False  # False: x = norm(x + f(x)) (original); True: x = x + f(norm(x)) (GPT-2)
  final_norm: bool = False  # a LayerNorm after the last layer of each stack
  # biases in the attention output, the FFN and the norms; False: none (T5, Llama)
  use_bias: bool = True
  qkv_bias: bool = True  # biases of the query/key/value projections (Qwen2 keeps these alone)
  fused_qkv: bool = False  # one (D, 3, H, K) projection for self-attention
  # normal(init_std) kernels; None: Xavier uniform (the original Transformer)
  init_std: float | None = None
  # rotary positions in self-attention with this base (10000: RoFormer, Llama 2)
  rope_theta: float | None = None
  rotary_fraction: float = (
    1.0  # rotate this fraction of each head (GPT-NeoX, Phi: partial_rotary_factor)
  )
  rope_scaling: str | None = None  # None | 'linear' | 'llama3' (Hugging Face's rope_type), with:
  rope_scaling_factor: float = 1.0
  rope_low_freq_factor: float = 1.0  # 'llama3'
  rope_high_freq_factor: float = 4.0  # 'llama3'
  rope_original_max_len: int = 8192  # 'llama3': the context the unscaled frequencies were made for
  # causal self-attention sees only the newest this many positions, itself included (Mistral); None: all
  sliding_window: int | None = None
  # None: the fused CPU kernel where it applies, else ours in einsums; 'einsum': always ours in einsums;
  # 'xla' or 'cudnn': jax.nn.dot_product_attention (GPUs, bf16)
  attention_implementation: str | None = None
  # multiplies q k^T; None: 1 / sqrt(head_dim). T5: 1.0 (its init folds the scale into the queries)
  attention_scale: float | None = None
  # T5's relative position bias, where a model asks for it (TransformerConfig(position_encoding='relative')): the
  # buckets of key - query distances, exact below relative_buckets // 2 (per direction) and logarithmic up to
  # relative_max_distance
  relative_buckets: int = 32
  relative_max_distance: int = 128
  dtype: str = 'float32'  # compute dtype; norm statistics, softmax and logits stay float32
  param_dtype: str = 'float32'  # storage dtype of the parameters
  scan_layers: bool = False  # run the stack under nn.scan: compile time flat in depth
  remat_policy: str = 'none'  # 'none' | 'full' | 'dots' | 'dots_no_batch': see REMAT_POLICIES

  def __post_init__(self):
    problems = []
    for name in ('num_layers', 'd_model', 'num_heads', 'd_ff', 'max_len'):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        problems.append(f'{name} must be a positive integer, got {getattr(self, name)!r}')
    if not problems and self.d_model % self.num_heads:
      problems.append(f'd_model={self.d_model} is not divisible by num_heads={self.num_heads}')
    for name in ('dropout_rate', 'attention_dropout_rate'):
      if not 0.0 <= getattr(self, name) < 1.0:
        problems.append(f'{name} must lie in [0, 1), got {getattr(self, name)}')
    if self.activation not in ACTIVATIONS:
      problems.append(f'activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}')
    if self.norm_variant == 'seed':  # its name before 0.2, in saved configs
      object.__setattr__(self, 'norm_variant', 'unbiased_std')
    if self.norm_variant not in ('standard', 'unbiased_std'):
      problems.append(
        f"norm_variant must be 'standard' or 'unbiased_std', got {self.norm_variant!r}"
      )
    if self.norm_type not in NORM_TYPES:
      problems.append(f'norm_type must be one of {NORM_TYPES}, got {self.norm_type!r}')
    if self.num_kv_heads is not None and (
      not isinstance(self.num_kv_heads, int)
      or self.num_kv_heads < 1
      or self.num_heads % self.num_kv_heads
    ):
      problems.append(
        f'num_kv_heads must be a positive divisor of num_heads={self.num_heads}, got '
        f'{self.num_kv_heads!r}'
      )
    elif self.fused_qkv and self.kv_heads != self.num_heads:
      problems.append(
        'fused_qkv holds as many key/value heads as query heads; grouped-query attention '
        f'(num_kv_heads={self.num_kv_heads}) needs fused_qkv=False'
      )
    if self.rope_theta is not None:
      rotated = int(self.head_dim * self.rotary_fraction)
      if self.rope_theta <= 1 or not 0 < self.rotary_fraction <= 1 or rotated % 2 or rotated < 2:
        problems.append(
          f'rotary positions need rope_theta > 1 and an even, positive number of rotated features, got rope_theta='
          f'{self.rope_theta} and {rotated} of head dimension {self.head_dim} (rotary_fraction {self.rotary_fraction})'
        )
      if self.rope_scaling not in ROPE_SCALINGS or self.rope_scaling_factor <= 0:
        problems.append(
          f'rope_scaling must be one of {ROPE_SCALINGS} with a positive rope_scaling_factor, got '
          f'{self.rope_scaling!r} and {self.rope_scaling_factor}'
        )
      elif (
        self.rope_scaling == 'llama3'
        and not self.rope_high_freq_factor > self.rope_low_freq_factor > 0
      ):
        problems.append(
          'llama3 rope scaling needs rope_high_freq_factor > rope_low_freq_factor > 0'
        )
    if not isinstance(self.position_offset, int) or self.position_offset < 0:
      problems.append(
        f'position_offset must be a non-negative integer, got {self.position_offset!r}'
      )
    if self.sliding_window is not None and (
      not isinstance(self.sliding_window, int) or self.sliding_window < 1
    ):
      problems.append(
        f'sliding_window must be a positive integer or None, got {self.sliding_window!r}'
      )
    if self.norm_eps <= 0:
      problems.append(f'norm_eps must be positive, got {self.norm_eps}')
    if self.attention_scale is not None and not self.attention_scale > 0:
      problems.append(
        f'attention_scale must be positive (None: 1 / sqrt(head_dim)), got {self.attention_scale}'
      )
    problems += self._check_relative_buckets()
    if self.remat_policy not in REMAT_POLICIES:
      problems.append(
        f'remat_policy must be one of {sorted(REMAT_POLICIES)}, got {self.remat_policy!r}'
      )
    if self.attention_implementation not in (None, 'einsum', 'xla', 'cudnn'):
      problems.append(
        "attention_implementation must be None, 'einsum', 'xla' or 'cudnn', got "
        f'{self.attention_implementation!r}'
      )
    for name in ('dtype', 'param_dtype'):
      try:
        jnp.dtype(getattr(self, name))
      except TypeError:
        problems.append(f'{name} {getattr(self, name)!r} is not a dtype name')
    problems += self._check()
    if problems:
      raise ValueError(f'invalid {type(self).__name__}: ' + '; '.join(problems))

  def _check(self) -> list[str]:
    """Model-specific checks; subclasses return their problems."""
    return []

  def _check_relative_buckets(self) -> list[str]:
    buckets, distance = self.relative_buckets, self.relative_max_distance
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (buckets, distance)):
      return [
        f'relative_buckets and relative_max_distance must be integers, got {buckets!r}, {distance!r}'
      ]
    # A bidirectional table splits the buckets by direction, and half of each share are exact distances: the
    # logarithmic buckets then need an exact one below them and a range above it.
    if buckets < 4:
      return [f'relative_buckets must be at least 4 (an exact bucket per direction), got {buckets}']
    if distance <= buckets // 2:
      return [
        f'relative_max_distance must exceed the exact distances (relative_buckets // 2 = {buckets // 2}), got '
        f'{distance}'
      ]
    return []

  @property
  def rotary(self):
    """How self-attention rotates queries and keys (a :class:`~transformer_jax.modules.rotary.Rotary`); ``None``
    without rotary positions."""
    # the modules import this file: a top-level import would cycle
    from transformer_jax.modules.rotary import Rotary

    if self.rope_theta is None:
      return None
    return Rotary(
      self.rope_theta,
      self.rotary_fraction,
      self.rope_scaling,
      self.rope_scaling_factor,
      self.rope_low_freq_factor,
      self.rope_high_freq_factor,
      self.rope_original_max_len,
    )

  @property
  def kv_heads(self) -> int:
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  @property
  def grouped_query(self) -> bool:
    """Fewer key/value heads than query heads (``num_kv_heads=num_heads`` is plain multi-head attention)."""
    return self.kv_heads < self.num_heads

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def compute_dtype(self) -> Any:
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self) -> Any:
    return jnp.dtype(self.param_dtype)

  @property
  def kernel_init(self):
    return (
      nn.initializers.xavier_uniform()
      if self.init_std is None
      else nn.initializers.normal(self.init_std)
    )

  def replace(self, **changes):
    """A copy with ``changes`` applied (and validated)."""
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: dict):
    """Builds a config from :meth:`to_dict` output; unknown keys are an error."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f'unknown {cls.__name__} fields: {unknown}')
    return cls(**values)
