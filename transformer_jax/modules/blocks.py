"""Encoder and decoder layers, and the stack that repeats them.

A layer is a few residual sublayers. With ``pre_norm`` each is ``x + dropout(f(norm(x)))`` (GPT-2); without it,
``norm(x + dropout(f(x)))`` (the original Transformer, BERT).
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer_jax.config import REMAT_POLICIES, BlockConfig
from transformer_jax.modules.attention import MultiHeadAttention
from transformer_jax.modules.feedforward import FeedForward
from transformer_jax.modules.normalization import LayerNorm
from transformer_jax.sharding import shard_activation


def make_norm(config: BlockConfig, name: str) -> LayerNorm:
  return LayerNorm(epsilon=config.norm_eps, variant=config.norm_variant, dtype=config.compute_dtype,
                   param_dtype=config.weight_dtype, name=name)


def make_attention(config: BlockConfig, name: str, *, cross: bool = False) -> MultiHeadAttention:
  """Self-attention (Q/K/V fused when the config says so) or, with ``cross``, attention over the encoder memory."""
  return MultiHeadAttention(
      num_heads=config.num_heads, qkv_bias=config.qkv_bias, fused_qkv=config.fused_qkv and not cross, cross=cross,
      dropout_rate=config.attention_dropout_rate, implementation=config.attention_implementation,
      rope_theta=None if cross else config.rope_theta, dtype=config.compute_dtype, param_dtype=config.weight_dtype, kernel_init=config.kernel_init, name=name)


def residual(config: BlockConfig, x, sublayer: Callable, norm: LayerNorm, deterministic: bool):
  """One residual sublayer, pre- or post-norm. Call inside a compact method (it creates a Dropout)."""
  drop = nn.Dropout(config.dropout_rate)
  if config.pre_norm:
    return x + drop(sublayer(norm(x)), deterministic=deterministic)
  return norm(x + drop(sublayer(x), deterministic=deterministic))


class EncoderLayer(nn.Module):
  """Self-attention then FFN. With a causal mask it is also the GPT block."""

  config: BlockConfig
  deterministic: bool = True
  decode: bool = False  # cached decoding: see MultiHeadAttention

  @nn.compact
  def __call__(self, x, mask=None, positions=None):
    """``(B, T, D)``, mask broadcastable to ``(B, H, T, T)`` -> ``(B, T, D)``. ``positions``: ``(B, T)``, for rotary
    attention (``config.rope_theta``)."""
    cfg = self.config
    attn = make_attention(cfg, 'self_attention')
    x = residual(cfg, x, lambda h: attn(h, mask=mask, positions=positions, deterministic=self.deterministic,
                                        decode=self.decode),
                 make_norm(cfg, 'self_attention_norm'), self.deterministic)
    ffn = FeedForward(cfg.d_ff, cfg.activation, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
                      kernel_init=cfg.kernel_init, name='ffn')
    return residual(cfg, x, ffn, make_norm(cfg, 'ffn_norm'), self.deterministic)


class DecoderLayer(nn.Module):
  """Masked self-attention, cross-attention over the encoder output, then FFN."""

  config: BlockConfig
  deterministic: bool = True
  decode: bool = False  # cached decoding: memory=None after the first step reuses the cached memory keys/values

  @nn.compact
  def __call__(self, x, self_mask, memory, cross_mask=None):
    """``(B, T, D)`` targets, ``(B, S, D)`` memory; masks ``(B, H, T, T)`` and ``(B, H, T, S)`` -> ``(B, T, D)``."""
    cfg = self.config
    self_attn = make_attention(cfg, 'self_attention')
    x = residual(cfg, x, lambda h: self_attn(h, mask=self_mask, deterministic=self.deterministic, decode=self.decode),
                 make_norm(cfg, 'self_attention_norm'), self.deterministic)
    cross_attn = make_attention(cfg, 'cross_attention', cross=True)
    x = residual(cfg, x, lambda h: cross_attn(h, memory, mask=cross_mask, deterministic=self.deterministic,
                                              decode=self.decode),
                 make_norm(cfg, 'cross_attention_norm'), self.deterministic)
    ffn = FeedForward(cfg.d_ff, cfg.activation, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
                      kernel_init=cfg.kernel_init, name='ffn')
    return residual(cfg, x, ffn, make_norm(cfg, 'ffn_norm'), self.deterministic)


def _residual_stream(x):
  """``(B, T, D)`` kept split by batch under a mesh, whatever the parameters' layout: XLA then gathers FSDP-sharded
  weights instead of resharding activations."""
  return shard_activation(x, 'batch', None, None)


def _scan_body(layer, carry, *args):
  return _residual_stream(layer(carry, *args)), None


class Stack(nn.Module):
  """``num_layers`` copies of ``layer_cls`` and an optional final norm.

  Plain loop: parameters ``layers_0 ... layers_{L-1}``. With ``config.scan_layers``: one ``layers`` subtree whose
  leaves carry a leading ``L`` axis (see :func:`stack_layers` / :func:`unstack_layers` to move between the two).
  ``config.remat_policy`` wraps each layer in ``nn.remat``. All variants compute the same numbers.
  """

  config: BlockConfig
  layer_cls: type
  num_layers: int

  @nn.compact
  def __call__(self, x, *args, deterministic: bool = True, decode: bool = False):
    """``(B, T, D)`` and the layer's extra arguments (masks, memory) -> ``(B, T, D)``.

    ``decode``: cached decoding (apply with ``mutable=['cache']``); under scan each cache leaf gains a leading ``L``.
    """
    cfg = self.config
    layer_cls = self.layer_cls
    x = _residual_stream(x)
    if cfg.remat_policy != 'none':
      # prevent_cse only matters outside scan; inside scan it just blocks optimisations.
      layer_cls = nn.remat(layer_cls, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      scan = nn.scan(_scan_body, variable_axes={'params': 0, 'intermediates': 0, 'cache': 0},
                     split_rngs={'params': True, 'dropout': True}, in_axes=(nn.broadcast,) * len(args),
                     length=self.num_layers)
      x, _ = scan(layer_cls(cfg, deterministic, decode, name='layers'), x, *args)
    else:
      for i in range(self.num_layers):
        x = _residual_stream(layer_cls(cfg, deterministic, decode, name=f'layers_{i}')(x, *args))
    if cfg.final_norm:
      x = make_norm(cfg, 'final_norm')(x)
    return x


def stack_layers(stack_params: dict, num_layers: int) -> dict:
  """Loop layout (``layers_0``...) -> scan layout (``layers`` with a leading ``L`` axis). Other keys are kept."""
  rest = {k: v for k, v in stack_params.items() if not k.startswith('layers_')}
  per_layer = [stack_params[f'layers_{i}'] for i in range(num_layers)]
  return {**rest, 'layers': jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)}


def unstack_layers(stack_params: dict, num_layers: int) -> dict:
  """Scan layout -> loop layout; the inverse of :func:`stack_layers`."""
  rest = {k: v for k, v in stack_params.items() if k != 'layers'}
  layers = {f'layers_{i}': jax.tree.map(lambda x, i=i: x[i], stack_params['layers']) for i in range(num_layers)}
  return {**rest, **layers}
