"""A converter format as one declarative spec, and the engine that loads and saves any spec.

A :class:`Spec` says, for one Hugging Face ``model_type``: which architectures (heads) it has and which of our model
classes each becomes, how its ``config.json`` maps to our config and back, what it cannot express (``check``), and
the parameter name table for a given config. :func:`load` and :func:`export` then do the same steps for every
format: arrays out of torch, the dtype, the config, the model, every name and shape checked against the table, and
one :class:`~transformer_jax.convert.ConversionError` listing every offender. Adding a format is one spec file.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn

from transformer_jax.convert.engine import export_state, import_state, state_to_numpy, weight_dtype
from transformer_jax.convert.hf_options import hf_config_dict
from transformer_jax.convert.rules import ConversionError, Mapping


@dataclasses.dataclass(frozen=True)
class Spec:
  """One Hugging Face format. ``architecture`` below is a name of ``architectures`` (e.g. ``'GPT2LMHeadModel'``).

  Its config travels both ways through one table, ``fields``, for the fields that only change name; ``more_from_hf``
  and ``more_to_hf`` add what takes more than a rename (activation names, derived sizes, head labels).
  """

  model_type: str  # config.json's model_type
  # Hugging Face class name -> our model class; the first one per class is its default.
  architectures: dict[str, type]
  config_class: type
  # Our config field -> its config.json key. A key missing from config.json takes `hf_defaults[key]`, the Hugging
  # Face config class's default; a key without a default must be there.
  fields: dict[str, str]
  hf_defaults: dict[str, Any]
  # config.json dict -> our other fields; (our config, architecture) -> the other config.json keys.
  more_from_hf: Callable[[dict], dict]
  more_to_hf: Callable[[Any, str], dict]
  check: Callable[[Any], None]  # raises ConversionError for a config the format cannot express
  mapping: Callable[[Any, str], Mapping]  # (our config, architecture) -> the name table
  # Which architecture a state dict's weights are (its head).
  architecture_of_state: Callable[[dict], str]
  # Whether one of our configs is this format's (several formats share a model class: BART, Marian, T5)
  describes: Callable[[Any], bool] = lambda config: True
  # The architecture one of our configs is saved as; None: the first one naming the model's class
  architecture_for: Callable[[Any], str] | None = None
  # (config.json dict, state) -> the dict with what only the weights say (T5: whether lm_head is the shared table)
  with_weights: Callable[[dict, dict], dict] = lambda hf, state: hf

  def config_from_hf(self, hf: dict, dtype: str = 'float32'):
    """A ``config.json`` dict -> our config, with parameters and compute in ``dtype``."""
    missing = sorted(k for k in self.fields.values() if k not in hf and k not in self.hf_defaults)
    if missing:
      raise ConversionError(f'the {self.model_type} config lacks {", ".join(missing)}')
    renamed = {ours: hf.get(key, self.hf_defaults.get(key)) for ours, key in self.fields.items()}
    return self.config_class(**renamed, **self.more_from_hf(hf), dtype=dtype, param_dtype=dtype)

  def architecture_of(self, model: nn.Module) -> str:
    """The default Hugging Face architecture of one of our models."""
    if self.architecture_for is not None:
      return self.architecture_for(model.config)
    for name, cls in self.architectures.items():
      if type(model) is cls:
        return name
    raise ConversionError(f'{self.model_type} has no architecture for {type(model).__name__}')

  def hf_config(self, config, architecture: str) -> dict:
    """Our config -> the ``config.json`` dict of ``architecture``."""
    self.check(config)
    return dict(
      model_type=self.model_type,
      architectures=[architecture],
      **{key: getattr(config, ours) for ours, key in self.fields.items()},
      **self.more_to_hf(config, architecture),
      dtype=config.param_dtype,
    )

  def table(self, config, architecture: str) -> Mapping:
    self.check(config)
    return self.mapping(config, architecture)


def convert_in(state, make_config: Callable[[str], Any], model_cls: type, make_mapping, dtype=None):
  """The import recipe: ``state`` (torch module, state dict or numpy arrays) -> ``(model, params)``.

  ``make_config(dtype)`` builds our config in the params' dtype (``dtype``, default the checkpoint's);
  ``make_mapping(config)`` the name table that checks and places every weight."""
  state = state_to_numpy(state)
  dtype = weight_dtype(state, dtype)
  model = model_cls(make_config(dtype))
  return model, import_state(state, model, make_mapping(model.config), dtype)


def load(spec: Spec, model_or_state, config=None, *, dtype=None) -> tuple[nn.Module, dict]:
  """A ``transformers`` model (or a state dict plus its config: a config object or ``config.json`` dict) ->
  ``(model, params)``. The architecture, hence our model class, is read off the weights."""
  state = state_to_numpy(model_or_state)
  architecture = spec.architecture_of_state(state)
  # the architecture the weights carry, which may differ from the one config.json names
  hf = {
    **hf_config_dict(model_or_state if config is None else config),
    'architectures': [architecture],
  }
  hf = spec.with_weights(hf, state)
  return convert_in(
    state,
    lambda dtype: spec.config_from_hf(hf, dtype),
    spec.architectures[architecture],
    lambda ours: spec.table(ours, architecture),
    dtype,
  )


def export(
  spec: Spec,
  model: nn.Module,
  params: dict,
  architecture: str | None = None,
  as_torch: bool = False,
) -> dict:
  """Our params -> the state dict of ``architecture`` (default: the model's own), numpy arrays or torch tensors."""
  architecture = architecture or spec.architecture_of(model)
  return export_state(model, params, spec.table(model.config, architecture), as_torch)
