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
  d_ff: int = 2048
  max_len: int = 512  # longest sequence the position encoding covers
  dropout_rate: float = 0.1  # embeddings and residual branches
  attention_dropout_rate: float = 0.1  # attention weights
  activation: str = 'relu'  # 'relu' | 'gelu' (exact erf) | 'gelu_tanh' (GPT-2's approximation)
  norm_variant: str = 'standard'  # 'standard' | 'seed' (unbiased std, (x - mean) / (std + eps))
  norm_eps: float = 1e-5  # PyTorch's default; BERT uses 1e-12, the course's LayerNorm 1e-6
  pre_norm: bool = False  # False: x = norm(x + f(x)) (original); True: x = x + f(norm(x)) (GPT-2)
  final_norm: bool = False  # a LayerNorm after the last layer of each stack
  qkv_bias: bool = True
  fused_qkv: bool = False  # one (D, 3, H, K) projection for self-attention
  init_std: float | None = None  # normal(init_std) kernels; None: Xavier uniform (the original Transformer)
  rope_theta: float | None = None  # rotary positions in self-attention with this base (10000: RoFormer, Llama 2)
  attention_implementation: str | None = None  # None/'einsum' (ours, fastest on CPU); 'xla' or 'cudnn' (GPUs, bf16)
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
    if self.norm_variant not in ('standard', 'seed'):
      problems.append(f"norm_variant must be 'standard' or 'seed', got {self.norm_variant!r}")
    if self.rope_theta is not None and (self.rope_theta <= 1 or self.head_dim % 2):
      problems.append(f'rotary positions need rope_theta > 1 and an even head dimension, got rope_theta='
                      f'{self.rope_theta} and head dimension {self.head_dim}')
    if self.norm_eps <= 0:
      problems.append(f'norm_eps must be positive, got {self.norm_eps}')
    if self.remat_policy not in REMAT_POLICIES:
      problems.append(f'remat_policy must be one of {sorted(REMAT_POLICIES)}, got {self.remat_policy!r}')
    if self.attention_implementation not in (None, 'einsum', 'xla', 'cudnn'):
      problems.append("attention_implementation must be None, 'einsum', 'xla' or 'cudnn', got "
                      f'{self.attention_implementation!r}')
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
    return nn.initializers.xavier_uniform() if self.init_std is None else nn.initializers.normal(self.init_std)

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
