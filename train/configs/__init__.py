"""Training configs: ``default.py`` (the ``lm`` job ``python -m train`` runs) and one preset per other task.

Pick one with ``--config=train/configs/translation.py`` and override any field with ``--config.<field>=<value>``.
"""

from __future__ import annotations

import dataclasses
import importlib

import ml_collections
from ml_collections import config_dict

# Model fields set from the vocabulary, not the config.
DATA_DERIVED = (
  'vocab_size',
  'src_vocab_size',
  'tgt_vocab_size',
  'pad_id',
)
_TYPES = {'int | None': int, 'float | None': float, 'str | None': str}


def model_fields(config_cls, **preset) -> ml_collections.ConfigDict:
  """``preset`` plus every other field of ``config_cls`` at the library's default, so each one shows in ``--help``
  and can be overridden from the command line. ``None`` defaults become typed placeholders (overridable)."""
  fields = {}
  for f in dataclasses.fields(config_cls):
    if f.name in DATA_DERIVED:
      continue
    value = preset.get(f.name, f.default)
    fields[f.name] = config_dict.placeholder(_TYPES[f.type]) if value is None else value
  unknown = sorted(set(preset) - set(fields))
  if unknown:
    raise ValueError(f'{config_cls.__name__} has no fields {unknown}')
  return ml_collections.ConfigDict(fields)


def preset(task: str) -> ml_collections.ConfigDict:
  """The preset config of ``task``: ``default.py`` for ``lm``, ``<task>.py`` for the others."""
  return importlib.import_module(
    f'train.configs.{"default" if task == "lm" else task}'
  ).get_config()
