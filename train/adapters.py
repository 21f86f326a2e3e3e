"""LoRA fine-tuning in a training run (``--config.lora.rank=8``): which weights train, and the model's full params.

With LoRA the train state's ``params`` are what trains, ``{'lora': adapters, 'params': fully trained modules}`` (the
second holds the modules of ``lora.train_also`` and those a pretrained start leaves new, e.g. a classifier head),
and ``frozen`` holds every other parameter. Only the first get gradients and optimizer moments. Checkpoints keep
``params`` and not ``frozen``, which is rebuilt from its source on a resume: the run's ``init_from`` (or its seed).
"""

from __future__ import annotations

import dataclasses
import re

from flax import traverse_util

from train.steps import TrainState
from transformer_jax import lora
from transformer_jax.lora import LoraConfig


def settings(config) -> LoraConfig | None:
  """The run's LoRA settings; ``None`` with ``lora.rank = 0`` (every weight trains). Raises ``ValueError`` for
  settings that cannot work."""
  fields = config.get('lora')
  if fields is None or not fields.rank:
    return None
  return LoraConfig(
    rank=fields.rank,
    alpha=float(fields.alpha),
    dropout=float(fields.dropout),
    targets=fields.targets,
  )


def _matches(pattern: str, path: tuple) -> bool:
  return bool(pattern) and re.match(f'(?:{pattern})(?:/|$)', '/'.join(path)) is not None


def split(params: dict, train_also: str) -> tuple[dict, dict]:
  """``(frozen, trained)``: the parameters whose path starts with a match of ``train_also`` (whole parts) train."""
  flat = traverse_util.flatten_dict(params)
  trained = {k: v for k, v in flat.items() if _matches(train_also, k)}
  frozen = {k: v for k, v in flat.items() if k not in trained}
  return traverse_util.unflatten_dict(frozen), traverse_util.unflatten_dict(trained)


def join(frozen: dict, trained: dict) -> dict:
  """The model's parameter tree again, from :func:`split`'s two parts."""
  return traverse_util.unflatten_dict(
    {**traverse_util.flatten_dict(frozen), **traverse_util.flatten_dict(trained)}
  )


def base_params(state) -> dict:
  """The model's parameters without the adapters (``frozen`` with the fully trained modules put back)."""
  return join(state.frozen, state.params['params'])


def full_params(state, config: LoraConfig | None) -> dict:
  """The plain parameters of the model the state describes: with LoRA, the adapters merged into their kernels."""
  if config is None:
    return state.params
  return lora.merge(base_params(state), state.params[lora.COLLECTION], config)


def with_base(state, base: dict):
  """``state`` with its frozen and fully trained parameters taken from ``base`` (the model's whole tree, e.g. the
  pretrained weights); the adapters stay."""
  flat = traverse_util.flatten_dict(base)

  def take(like):
    return traverse_util.unflatten_dict({k: flat[k] for k in traverse_util.flatten_dict(like)})

  trained = {**state.params, 'params': take(state.params['params'])}
  return state.replace(frozen=take(state.frozen), params=trained)


def saved_part(state) -> dict:
  """What a checkpoint holds, as a dict of the state's fields: all but the frozen parameters, which their source
  rebuilds (and which checkpoints from before LoRA have no entry for)."""
  return {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.name != 'frozen'}


def restored(saved: dict, frozen) -> TrainState:
  """The train state from :func:`saved_part`'s fields and the frozen parameters (``{}`` without LoRA)."""
  return TrainState(**saved, frozen=frozen)
