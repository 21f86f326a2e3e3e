"""The Transformer layers, and the stack that repeats them.

A layer is a few residual sublayers, one line each in ``__call__``. With ``pre_norm`` a sublayer is
``x + dropout(f(norm(x)))`` (GPT-2, Llama); without it, ``norm(x + dropout(f(x)))`` (the original Transformer, BERT).
Runtime modes (``deterministic``, ``decode``) are call arguments at every level.
"""

from __future__ import annotations

import functools
from typing import Callable, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer_jax.config import REMAT_POLICIES, BlockConfig
from transformer_jax.kernels.materialize import hold_gradient
from transformer_jax.modules.attention import CACHE_INDEX, MultiHeadAttention
from transformer_jax.modules.feedforward import FeedForward
from transformer_jax.modules.normalization import make_norm
from transformer_jax.modules.relative_position import RelativePositionBias
from transformer_jax.sharding import Module, shard_activation


def make_attention(config: BlockConfig, *, cross: bool = False) -> MultiHeadAttention:
  """Self-attention (Q/K/V fused when the config says so) or, with ``cross``, attention over the encoder memory."""
  return MultiHeadAttention(
    num_heads=config.num_heads,
    num_kv_heads=config.kv_heads,
    qkv_bias=config.qkv_bias,
    out_bias=config.use_bias,
    fused_qkv=config.fused_qkv and not cross,
    cross=cross,
    dropout_rate=config.attention_dropout_rate,
    implementation=config.attention_implementation,
    scale=config.attention_scale,
    rotary=None if cross else config.rotary,
    sliding_window=None if cross else config.sliding_window,
    check_mask=False,  # the models build their masks from inputs checked where they enter
    dtype=config.compute_dtype,
    param_dtype=config.weight_dtype,
    kernel_init=config.kernel_init,
  )


def make_ffn(config: BlockConfig) -> FeedForward:
  return FeedForward(
    config.d_ff,
    config.activation,
    gated=config.gated_ffn,
    use_bias=config.use_bias,
    dtype=config.compute_dtype,
    param_dtype=config.weight_dtype,
    kernel_init=config.kernel_init,
  )


class _Residual(Module):
  """Shared by the layers: ``add(x, norm, f)`` is one residual sublayer, pre- or post-norm as the config says."""

  config: BlockConfig

  def setup(self):
    self.dropout = nn.Dropout(self.config.dropout_rate)

  def add(self, x, norm: nn.Module, sublayer: Callable, deterministic: bool):
    if self.config.pre_norm:
      return x + self.dropout(sublayer(norm(x)), deterministic=deterministic)
    return norm(x + self.dropout(sublayer(x), deterministic=deterministic))


class Block(_Residual):
  """Self-attention then FFN: the layer of BERT and of the Transformer's encoder, and with a causal mask the GPT block.

  Parameters: ``self_attention``, ``self_attention_norm``, ``ffn``, ``ffn_norm``.
  """

  def setup(self):
    super().setup()
    self.self_attention_norm = make_norm(self.config)
    self.self_attention = make_attention(self.config)
    self.ffn_norm = make_norm(self.config)
    self.ffn = make_ffn(self.config)

  def __call__(
    self,
    x,
    mask=None,
    positions=None,
    *,
    bias=None,
    deterministic: bool = True,
    decode: bool = False,
  ):
    """``(B, T, D)`` -> ``(B, T, D)``. ``mask``: broadcastable to ``(B, H, T, T)``, True = may attend.
    ``positions``: ``(B, T)`` position ids, used by rotary attention (``config.rope_theta``). ``bias``: a float logit
    bias of the self-attention, broadcastable to ``(B, H, T, S)`` (T5's relative positions, from the :class:`Stack`)."""
    modes = dict(deterministic=deterministic, decode=decode)
    attend = functools.partial(
      self.self_attention, mask=mask, positions=positions, bias=bias, **modes
    )
    x = self.add(x, self.self_attention_norm, attend, deterministic)
    return self.add(x, self.ffn_norm, self.ffn, deterministic)


class CrossAttentionBlock(_Residual):
  """Masked self-attention, attention over the encoder output, then FFN: the Transformer's decoder layer.

  Parameters: those of :class:`Block` and ``cross_attention``, ``cross_attention_norm``.
  """

  def setup(self):
    super().setup()
    self.self_attention_norm = make_norm(self.config)
    self.self_attention = make_attention(self.config)
    self.cross_attention_norm = make_norm(self.config)
    self.cross_attention = make_attention(self.config, cross=True)
    self.ffn_norm = make_norm(self.config)
    self.ffn = make_ffn(self.config)

  def __call__(
    self,
    x,
    self_mask,
    memory,
    memory_mask=None,
    *,
    bias=None,
    deterministic: bool = True,
    decode: bool = False,
  ):
    """``(B, T, D)`` targets, ``(B, S, D)`` memory; masks ``(B, H, T, T)`` and ``(B, H, T, S)`` -> ``(B, T, D)``.
    ``bias``: a logit bias of the self-attention only, as in :class:`Block`; attention over the memory has none.

    In cached decoding, ``memory=None`` after the first step attends to the cached memory keys and values."""
    modes = dict(deterministic=deterministic, decode=decode)
    attend = functools.partial(self.self_attention, mask=self_mask, bias=bias, **modes)
    attend_memory = functools.partial(
      self.cross_attention, inputs_kv=memory, mask=memory_mask, **modes
    )
    x = self.add(x, self.self_attention_norm, attend, deterministic)
    x = self.add(x, self.cross_attention_norm, attend_memory, deterministic)
    return self.add(x, self.ffn_norm, self.ffn, deterministic)


EncoderLayer = Block  # deprecated names (0.1): kept so that existing imports keep working
DecoderLayer = CrossAttentionBlock


def _residual_stream(x):
  """``(B, T, D)`` kept split by batch under a mesh, whatever the parameters' layout: XLA then gathers FSDP-sharded
  weights instead of resharding activations."""
  return shard_activation(x, 'batch', None, None)


class Stack(Module):
  """``num_layers`` copies of ``layer_cls`` and an optional final norm.

  Plain loop: parameters ``layers_0 ... layers_{L-1}``. With ``config.scan_layers``: one ``layers`` subtree whose
  leaves carry a leading ``L`` axis (see :func:`stack_layers` / :func:`unstack_layers` to move between the two).
  ``config.remat_policy`` recomputes each layer's activations in the backward pass. All variants compute the same
  numbers.

  ``relative_positions`` (``'bidirectional'``: an encoder; ``'causal'``: a decoder) adds T5's relative position bias
  to every layer's self-attention. The stack holds its one table, ``relative_position_bias`` (T5 keeps it in the
  first layer), outside any scan, and computes the bias once per call for all layers.
  """

  config: BlockConfig
  layer_cls: type
  num_layers: int
  relative_positions: Literal['bidirectional', 'causal'] | None = None

  @nn.compact
  def __call__(self, x, *layer_args, deterministic: bool = True, decode: bool = False):
    """``(B, T, D)`` and the layer's other arguments (masks, positions, memory) -> ``(B, T, D)``.

    ``decode``: cached decoding (apply with ``mutable=['cache']``); under scan each cache leaf gains a leading ``L``.
    """
    cfg = self.config
    bias = self._position_bias(x.shape[1], decode)  # (1, H, T, S) or None

    def apply_layer(layer, x, bias, *args):
      # layers that take no bias need not know of it
      extra = {} if bias is None else {'bias': bias}
      out = layer(x, *args, **extra, deterministic=deterministic, decode=decode)
      # the gradient of each layer's output written out once, not re-added in every op that reads it (on the CPU)
      return _residual_stream(hold_gradient(out))

    if cfg.remat_policy != 'none':
      # prevent_cse only matters outside scan; inside scan it just blocks optimisations.
      apply_layer = nn.remat(
        apply_layer, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers
      )
    x = _residual_stream(x)
    if cfg.scan_layers:
      scan = nn.scan(
        lambda layer, carry, *args: (apply_layer(layer, carry, *args), None),
        variable_axes={'params': 0, 'intermediates': 0, 'cache': 0, 'lora': 0},
        split_rngs={'params': True, 'dropout': True, 'lora': True},
        in_axes=(nn.broadcast,) * (1 + len(layer_args)),
        length=self.num_layers,
        # each parameter's logical axes gain the leading layer axis
        metadata_params={nn.PARTITION_NAME: 'layers'},
      )
      x, _ = scan(self.layer_cls(cfg, name='layers'), x, bias, *layer_args)
    else:
      for i in range(self.num_layers):
        x = apply_layer(self.layer_cls(cfg, name=f'layers_{i}'), x, bias, *layer_args)
    if cfg.final_norm:
      x = make_norm(cfg, name='final_norm')(x)
    return x

  @nn.nowrap
  def _position_bias(self, length: int, decode: bool):
    """The ``(1, H, T, S)`` relative position bias of ``T = length`` queries; ``None`` without relative positions.

    In cached decoding the queries continue at the stack's ``cache_index`` and the keys are the cache slots. The
    layers size their caches by the first call's length, and so does ``key_slots`` here: only its length is read.
    """
    if self.relative_positions is None:
      return None
    cfg = self.config
    table = RelativePositionBias(
      cfg.num_heads,
      bidirectional=self.relative_positions == 'bidirectional',
      num_buckets=cfg.relative_buckets,
      max_distance=cfg.relative_max_distance,
      param_dtype=cfg.weight_dtype,
      name='relative_position_bias',
    )
    if not decode:
      return table(length, length)
    index = self.variable('cache', CACHE_INDEX, lambda: jnp.zeros((), jnp.int32))
    slots = self.variable('cache', 'key_slots', jnp.zeros, (length,), jnp.bool_)
    offset = index.value
    index.value = offset + length
    return table(length, slots.value.shape[0], offset)


def stack_layers(stack_params: dict, num_layers: int) -> dict:
  """Loop layout (``layers_0``...) -> scan layout (``layers`` with a leading ``L`` axis). Other keys are kept."""
  rest = {k: v for k, v in stack_params.items() if not k.startswith('layers_')}
  per_layer = [stack_params[f'layers_{i}'] for i in range(num_layers)]
  return {**rest, 'layers': jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)}


def unstack_layers(stack_params: dict, num_layers: int) -> dict:
  """Scan layout -> loop layout; the inverse of :func:`stack_layers`."""
  rest = {k: v for k, v in stack_params.items() if k != 'layers'}
  layers = {
    f'layers_{i}': jax.tree.map(lambda x, i=i: x[i], stack_params['layers'])
    for i in range(num_layers)
  }
  return {**rest, **layers}
