"""Hugging Face model directories on disk: ``load_hf`` (GPT-2, BERT, BART, Marian, T5, Llama, Qwen2) and
``save_hf``.

A directory holds ``config.json`` and the weights as ``model.safetensors`` or ``pytorch_model.bin``, either one file
or shards listed in ``*.index.json``. Safetensors are read with ``safetensors.safe_open`` (no torch) one tensor at a
time, as the conversion asks for it (:class:`SafetensorsState`), so loading holds the params and one tensor in flight,
never a second copy of the checkpoint. ``.bin`` files need torch and are read whole with
``torch.load(..., weights_only=True)``, which unpickles nothing but tensors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from transformer_jax.convert.bart import BART, MARIAN
from transformer_jax.convert.bert import BERT_SPEC
from transformer_jax.convert.engine import export_state, to_numpy
from transformer_jax.convert.gpt2 import GPT2
from transformer_jax.convert.lazy_state import LazyState
from transformer_jax.convert.llama import LLAMA, MISTRAL, QWEN2
from transformer_jax.convert.rules import ConversionError
from transformer_jax.convert.spec import load
from transformer_jax.convert.t5 import T5

WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin')  # in order of preference


# model_type -> the spec that converts it
SPECS = {
  spec.model_type: spec for spec in (GPT2, BERT_SPEC, BART, MARIAN, T5, LLAMA, MISTRAL, QWEN2)
}


def read_config(path: Path) -> dict:
  file = path / 'config.json'
  if not file.is_file():
    raise ConversionError(f'{path} is not a Hugging Face model directory: config.json is missing')
  try:
    return json.loads(file.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConversionError(f'{file} is not valid JSON: {e}') from e


def _unreadable(file: Path, e: Exception) -> ConversionError:
  # safetensors and torch raise many types for a damaged file; report them all alike
  return ConversionError(f'cannot read weights file {file}: {type(e).__name__}: {e}')


# safetensors header dtype -> numpy's (bfloat16 and float8 are ml_dtypes', as jax names them)
_SAFETENSORS_DTYPES = {
  'BOOL': 'bool',
  'U8': 'uint8',
  'I8': 'int8',
  'U16': 'uint16',
  'I16': 'int16',
  'U32': 'uint32',
  'I32': 'int32',
  'U64': 'uint64',
  'I64': 'int64',
  'F16': 'float16',
  'BF16': 'bfloat16',
  'F32': 'float32',
  'F64': 'float64',
  'F8_E4M3': 'float8_e4m3fn',
  'F8_E5M2': 'float8_e5m2',
}


class SafetensorsState(LazyState):
  """The tensors of one or more ``.safetensors`` files (the shards of one checkpoint), read when looked up.

  Every header is read and checked here, one file open at a time, so a damaged or truncated file fails before any
  conversion starts; each lookup then opens the tensor's file, copies that one tensor out and closes the file again
  (``safe_open`` maps the file, and the pages it touches count as this process's memory while it stays open). A name
  in several files is the last file's, as when the shards are merged into one dict.
  """

  def __init__(self, files: list[Path]):
    self._file: dict[str, Path] = {}
    self._shapes: dict[str, tuple[int, ...]] = {}
    self._dtypes: dict[str, np.dtype] = {}
    for file in files:
      try:
        with safetensors.safe_open(file, 'numpy') as f:
          for key in f.keys():
            self._shapes[key], self._dtypes[key] = _describe(f.get_slice(key))
            self._file[key] = file
      except Exception as e:
        raise _unreadable(file, e) from e

  @property
  def shapes(self) -> dict[str, tuple[int, ...]]:
    return self._shapes

  @property
  def dtypes(self) -> dict[str, np.dtype]:
    return self._dtypes

  def __getitem__(self, key: str) -> np.ndarray:
    file = self._file[key]  # KeyError for a name no file holds, as a dict
    try:
      with safetensors.safe_open(file, 'numpy') as f:
        return f.get_tensor(key)
    except Exception as e:
      raise _unreadable(file, e) from e


def _describe(header) -> tuple[tuple[int, ...], np.dtype]:
  """A tensor's shape and dtype from its ``get_slice`` view, which reads no data (and is dropped at once, since it
  keeps the file mapped)."""
  name = header.get_dtype()
  return tuple(header.get_shape()), jnp.dtype(_SAFETENSORS_DTYPES.get(name, name.lower()))


def _read_bin(file: Path) -> dict[str, np.ndarray]:
  """One torch ``.bin`` file -> ``{name: array}``, whole; unreadable content is a :class:`ConversionError`."""
  try:
    import torch  # .bin checkpoints are torch pickles

    return {
      k: to_numpy(v) for k, v in torch.load(file, map_location='cpu', weights_only=True).items()
    }
  except Exception as e:
    raise _unreadable(file, e) from e


def _read_files(files: list[Path]) -> dict[str, np.ndarray] | SafetensorsState:
  if files[0].suffix == '.safetensors':
    return SafetensorsState(files)
  return {k: v for file in files for k, v in _read_bin(file).items()}


def read_weights(path: Path) -> dict[str, np.ndarray] | SafetensorsState:
  """The tensors of the directory: a single weights file, or every shard its ``*.index.json`` names. Safetensors
  come as a :class:`SafetensorsState` (headers read, data read per lookup), ``.bin`` files as a dict."""
  for name in WEIGHT_FILES:
    if (path / name).is_file():
      return _read_files([path / name])
    index = path / f'{name}.index.json'
    if index.is_file():
      try:
        shards = sorted(set(json.loads(index.read_text())['weight_map'].values()))
      except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
        raise ConversionError(f'{index} is not a valid shard index: {e}') from e
      if not shards:
        raise ConversionError(f'{index} is not a valid shard index: its weight_map is empty')
      missing = [s for s in shards if not (path / s).is_file()]
      if missing:
        raise ConversionError(f'{index} lists shards that are missing: {missing}')
      return _read_files([path / s for s in shards])
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
