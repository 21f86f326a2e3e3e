"""LoRA (Hu et al. 2021, "Low-Rank Adaptation of Large Language Models") for every model of the library.

A targeted projection ``y = x W`` becomes ``y = x W + (alpha / rank) * dropout(x) A B``, with ``A`` of shape
``(*in, rank)`` (uniform in ``+-1 / sqrt(fan_in)``, PEFT's Kaiming init) and ``B`` of shape ``(rank, *out)``
(zeros, so training starts at the base model). ``W`` stays frozen; only ``A`` and ``B`` are trained.

The models are not touched. The adapters are a second variable collection, ``'lora'``, beside ``'params'``, with the
same paths (``decoder/layers_0/self_attention/query/lora_a``); while :func:`adapted` is active, every ``nn.Dense`` /
``nn.DenseGeneral`` of the model that has adapters adds their product (a Flax method interceptor). The low-rank path
is computed as ``(x A) B``: no ``W``-sized product is ever formed, in the forward or the backward pass, so a step's
memory is the frozen weights, the small adapters and their optimizer state.

    settings = LoraConfig(rank=8, alpha=16, targets='query|value')
    adapters = lora.init(model, params, settings, jax.random.key(0), ids)
    logits = lora.apply(model, params, adapters, settings, ids)          # differentiate with respect to adapters
    merged = lora.merge(params, adapters, settings)                      # plain params of the same model
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

COLLECTION = 'lora'
A, B = 'lora_a', 'lora_b'


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Which projections get adapters, and how large.

  ``targets``: a regular expression over module paths such as ``decoder/layers_0/self_attention/query``, matched
  against whole path parts (``query`` is every module named ``query``; ``ffn/fc_.*`` the FFN's three), as PEFT's
  ``target_modules``. The names are ours: ``query``, ``key``, ``value``, ``out`` (attention), ``qkv`` (a fused
  projection, GPT-2), ``fc_in``, ``fc_gate``, ``fc_out`` (the FFN), ``output`` (an untied head).
  """

  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0  # on the adapter's input, in training only
  targets: str = 'query|value|qkv'

  def __post_init__(self):
    problems = []
    if not isinstance(self.rank, int) or self.rank < 1:
      problems.append(f'rank must be a positive integer, got {self.rank!r}')
    if not self.alpha > 0:
      problems.append(f'alpha must be positive, got {self.alpha}')
    if not 0 <= self.dropout < 1:
      problems.append(f'dropout must lie in [0, 1), got {self.dropout}')
    try:
      re.compile(self.targets)
    except re.error as e:
      problems.append(f'targets {self.targets!r} is not a regular expression: {e}')
    if not self.targets:
      problems.append('targets is empty: name the projections to adapt, e.g. "query|value"')
    if problems:
      raise ValueError('invalid LoRA config: ' + '; '.join(problems))

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def matches(self, path: tuple[str, ...]) -> bool:
    return re.search(f'(?:^|/)(?:{self.targets})(?:/|$)', '/'.join(path)) is not None


def _input_axes(module: nn.Module) -> int:
  """How many trailing input axes a Dense contracts."""
  if isinstance(module, nn.DenseGeneral):
    return len(module.axis) if isinstance(module.axis, (tuple, list)) else 1
  return 1


def _features(module: nn.Module) -> tuple[int, ...]:
  features = module.features
  return tuple(features) if isinstance(features, (tuple, list)) else (features,)


def _interceptor(config: LoraConfig, deterministic: bool, initializing: bool):
  def intercept(next_fun, args, kwargs, context):
    module = context.module
    y = next_fun(*args, **kwargs)
    if context.method_name != '__call__' or not isinstance(module, (nn.Dense, nn.DenseGeneral)):
      return y
    # `targets` picks the projections when adapters are made; after that, those that have adapters add them
    if not (config.matches(module.path) if initializing else module.has_variable(COLLECTION, A)):
      return y
    x = args[0] if args else kwargs['inputs']
    n_in = _input_axes(module)
    fan_in = math.prod(x.shape[-n_in:])
    bound = 1 / math.sqrt(fan_in)
    init_a = (
      lambda: jax.random.uniform(  # noqa: E731
        module.make_rng(COLLECTION),
        x.shape[-n_in:] + (config.rank,),
        module.param_dtype,
        -bound,
        bound,
      )
    )
    a = module.variable(COLLECTION, A, init_a).value  # (*in, r)
    shape_b = (config.rank,) + _features(module)
    b = module.variable(COLLECTION, B, jnp.zeros, shape_b, module.param_dtype).value  # (r, *out)
    dtype = module.dtype or x.dtype
    if config.dropout > 0 and not deterministic:
      keep = jax.random.bernoulli(module.make_rng('dropout'), 1 - config.dropout, x.shape)
      x = jnp.where(keep, x / (1 - config.dropout), 0)
    axes = tuple(range(x.ndim - n_in, x.ndim))
    low = jax.lax.dot_general(
      x.astype(dtype), a.astype(dtype), ((axes, tuple(range(n_in))), ((), ()))
    )  # (..., r)
    delta = jnp.tensordot(low, b.astype(dtype), axes=1)  # (..., *out)
    return y + (config.scale * delta).astype(y.dtype)

  return intercept


@contextlib.contextmanager
def adapted(config: LoraConfig, *, deterministic: bool = True, initializing: bool = False):
  """Within this context every targeted Dense of a model applied with a ``'lora'`` collection adds its adapter."""
  with nn.intercept_methods(_interceptor(config, deterministic, initializing)):
    yield


def init(model: nn.Module, params, config: LoraConfig, key, *inputs, **kwargs) -> dict:
  """Fresh adapters (the ``'lora'`` collection) for ``model``'s targeted projections, from one forward pass on
  ``inputs`` (shapes matter, values do not). Raises ``ValueError`` when ``targets`` names no projection."""

  def make(params, key):
    with adapted(config, initializing=True):
      _, variables = model.apply(
        {'params': params}, *inputs, **kwargs, rngs={COLLECTION: key}, mutable=[COLLECTION]
      )
    return variables.get(COLLECTION, {})

  adapters = jax.jit(make)(params, key)
  if not adapters:
    names = sorted({'/'.join(p[:-1]) for p in traverse_util.flatten_dict(params)})[:4]
    raise ValueError(
      f'LoRA targets {config.targets!r} match no projection of {type(model).__name__}; its modules look like '
      + ', '.join(names)
    )
  return adapters


def apply(model: nn.Module, params, adapters, config: LoraConfig, *args, deterministic=True, **kw):
  """``model.apply`` with the adapters added: ``params`` frozen, ``adapters`` as :func:`init` made them."""
  with adapted(config, deterministic=deterministic):
    return model.apply(
      {'params': params, COLLECTION: adapters}, *args, deterministic=deterministic, **kw
    )


def delta(a, b, kernel_shape: tuple[int, ...]):
  """``A B`` in a kernel's shape: ``a`` ``(*L, *in, r)``, ``b`` ``(*L, r, *out)`` (``L``: a scanned stack's layer
  axis, if any) -> ``(*L, *in, *out)``."""
  lead = a.ndim + b.ndim - 2 - len(kernel_shape)
  rank = a.shape[-1]
  a2 = a.reshape(a.shape[:lead] + (-1, rank))
  b2 = b.reshape(b.shape[:lead] + (rank, -1))
  return jnp.matmul(a2, b2).reshape(kernel_shape)


def merge(params, adapters, config: LoraConfig):
  """``params`` with each adapted kernel replaced by ``W + scale * A B``: the same model without adapters."""
  flat, pairs = traverse_util.flatten_dict(params), traverse_util.flatten_dict(adapters)
  for path in [p[:-1] for p in pairs if p[-1] == A]:
    kernel = flat[path + ('kernel',)]
    a, b = (pairs[path + (name,)].astype(jnp.float32) for name in (A, B))
    update = config.scale * delta(a, b, kernel.shape)
    flat[path + ('kernel',)] = (kernel.astype(jnp.float32) + update).astype(kernel.dtype)
  return traverse_util.unflatten_dict(flat)


def count(adapters) -> int:
  """Trainable numbers in ``adapters``."""
  return sum(x.size for x in jax.tree.leaves(adapters))
