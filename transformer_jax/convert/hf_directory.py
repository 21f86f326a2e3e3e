"""Hugging Face model directories on disk: ``load_hf`` (GPT-2, BERT, BART, Marian, T5, Llama, Qwen2) and
``save_hf``.

A directory holds ``config.json`` and the weights as ``model.safetensors`` or ``pytorch_model.bin``, either one file
or shards listed in ``*.index.json``. Safetensors are read with ``safetensors.numpy`` (no torch); ``.bin`` files need
torch and are read with ``torch.load(..., weights_only=True)``, which unpickles nothing but tensors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import safetensors.numpy

from transformer_jax.convert.bart import BART, MARIAN
from transformer_jax.convert.bert import BERT_SPEC
from transformer_jax.convert.engine import export_state, to_numpy
from transformer_jax.convert.gpt2 import GPT2
from transformer_jax.convert.llama import LLAMA, QWEN2
from transformer_jax.convert.rules import ConversionError
from transformer_jax.convert.spec import load
from transformer_jax.convert.t5 import T5

WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin')  # in order of preference


# model_type -> the spec that converts it
SPECS = {spec.model_type: spec for spec in (GPT2, BERT_SPEC, BART, MARIAN, T5, LLAMA, QWEN2)}


def read_config(path: Path) -> dict:
  file = path / 'config.json'
  if not file.is_file():
    raise ConversionError(f'{path} is not a Hugging Face model directory: config.json is missing')
  try:
    return json.loads(file.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConversionError(f'{file} is not valid JSON: {e}') from e


def _read_file(file: Path) -> dict[str, np.ndarray]:
  """One weights file -> ``{name: array}``; unreadable content is a :class:`ConversionError` naming the file."""
  try:
    if file.suffix == '.safetensors':
      return safetensors.numpy.load_file(file)
    import torch  # .bin checkpoints are torch pickles

    return {
      k: to_numpy(v) for k, v in torch.load(file, map_location='cpu', weights_only=True).items()
    }
  # safetensors and torch raise many types for a damaged file; report them all alike
  except Exception as e:
    raise ConversionError(f'cannot read weights file {file}: {type(e).__name__}: {e}') from e


def read_weights(path: Path) -> dict[str, np.ndarray]:
  """All tensors of the directory: a single weights file, or every shard its ``*.index.json`` names."""
  for name in WEIGHT_FILES:
    if (path / name).is_file():
      return _read_file(path / name)
    index = path / f'{name}.index.json'
    if index.is_file():
      try:
        shards = sorted(set(json.loads(index.read_text())['weight_map'].values()))
      except (json.JSONDecodeError, KeyError, AttributeError) as e:
        raise ConversionError(f'{index} is not a valid shard index: {e}') from e
      missing = [s for s in shards if not (path / s).is_file()]
      if missing:
        raise ConversionError(f'{index} lists shards that are missing: {missing}')
      return {k: v for s in shards for k, v in _read_file(path / s).items()}
  raise ConversionError(
    f'no weights in {path}: expected one of {list(WEIGHT_FILES)} or a sharded *.index.json'
  )


def _check_architecture(config: dict, supported) -> None:
  """Refuses a ``config.json`` whose ``architectures`` (when given) name no class we convert; which head the
  weights carry is then read off the weights themselves, as ``from_pretrained`` does."""
  names = config.get('architectures') or []
  if names and not any(n in supported for n in names):
    raise ConversionError(
      f'unsupported architectures {names} for model_type {config["model_type"]!r}; '
      f'supported: {sorted(supported)}'
    )


def load_hf(path: str | os.PathLike, dtype=None) -> tuple:
  """Loads a Hugging Face model directory of any format in :data:`SPECS`: ``(model, params)``.

  ``model_type`` ``'gpt2'`` gives a :class:`~transformer_jax.GPT` (``GPT2LMHeadModel`` or ``GPT2Model``), and so do
  ``'llama'`` and ``'qwen2'`` (``LlamaForCausalLM``, ``Qwen2ForCausalLM``: rotary, RMSNorm, SwiGLU); ``'bert'``
  gives :class:`~transformer_jax.BERT`, :class:`~transformer_jax.BERTForMaskedLM` or
  :class:`~transformer_jax.BERTForSequenceClassification` after the head the weights carry. ``dtype``: the params' dtype
  (default: the checkpoint's; float32, float16 and bfloat16 load). Raises :class:`ConversionError` for a missing or
  corrupt file, an unsupported ``model_type`` or architecture, and any weight that does not fit.

      model, params = load_hf('path/to/gpt2')
      logits = model.apply({'params': params}, ids)
  """
  path = Path(path)
  config = read_config(path)
  model_type = config.get('model_type')
  if model_type not in SPECS:
    raise ConversionError(
      f'unsupported model_type {model_type!r} in {path / "config.json"}; supported: {", ".join(sorted(SPECS))}'
    )
  spec = SPECS[model_type]
  _check_architecture(config, spec.architectures)
  return load(spec, read_weights(path), config, dtype=dtype)


def save_hf(model, params: dict, path: str | os.PathLike) -> None:
  """Writes ``config.json`` and ``model.safetensors`` that ``transformers``' ``from_pretrained`` loads.

  A :class:`~transformer_jax.GPT` is saved as ``GPT2LMHeadModel`` (learned positions), else as ``LlamaForCausalLM``
  or, with Q/K/V biases, ``Qwen2ForCausalLM``; the BERT classes as their Hugging Face twins.
  Tied copies (``lm_head.weight``, the MLM decoder) are left out, as ``save_pretrained`` does.
  """
  spec = next(
    (
      s
      for s in SPECS.values()
      if type(model) in s.architectures.values() and s.describes(model.config)
    ),
    None,
  )
  if spec is None:
    raise ConversionError(
      f'save_hf has no Hugging Face format for this {type(model).__name__} (supported: '
      + ', '.join(sorted(SPECS))
      + ')'
    )
  architecture = spec.architecture_of(model)
  config = spec.hf_config(model.config, architecture)
  mapping = spec.table(model.config, architecture)
  state = export_state(model, params, mapping)
  for alias in mapping.aliases:
    del state[alias]
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  (path / 'config.json').write_text(json.dumps(config, indent=2))
  safetensors.numpy.save_file(state, path / 'model.safetensors', metadata={'format': 'pt'})
