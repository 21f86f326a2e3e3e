"""LoRA adapters <-> a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``), which
``peft.PeftModel.from_pretrained(base, path)`` loads onto the ``transformers`` base model.

Each adapted kernel of ours is one PyTorch module of the base (the spec's name table says which): our ``A`` of shape
``(*in, r)`` is its ``lora_A.weight`` ``(r, in)`` and our ``B`` ``(r, *out)`` its ``lora_B.weight`` ``(out, r)``, the
layout of PEFT's two ``nn.Linear`` layers whatever the base layer is (GPT-2's ``Conv1D`` is marked
``fan_in_fan_out``). A kernel that is a slice of a packed PyTorch weight, or that several tensors make, has no PEFT
module of its own and is refused.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from transformer_jax import lora
from transformer_jax.convert.engine import flatten, our_shapes, to_loop_layout, to_model_layout
from transformer_jax.convert.hf_directory import SPECS
from transformer_jax.convert.rules import ConversionError
from transformer_jax.models import GPT, BERTForMaskedLM, BERTForSequenceClassification, Transformer

CONFIG_FILE, WEIGHTS_FILE = 'adapter_config.json', 'adapter_model.safetensors'
_PREFIX = 'base_model.model.'
_TASK_TYPES = {
  GPT: 'CAUSAL_LM',
  Transformer: 'SEQ_2_SEQ_LM',
  BERTForSequenceClassification: 'SEQ_CLS',
  BERTForMaskedLM: None,
}


def _spec_of(model):
  for spec in SPECS.values():
    if type(model) in spec.architectures.values() and spec.describes(model.config):
      return spec
  raise ConversionError(f'no Hugging Face format describes this {type(model).__name__}')


def _kernel_rules(model) -> dict:
  """``{our module path: its kernel's Rule}`` for the model's Hugging Face format."""
  spec = _spec_of(model)
  mapping = spec.table(model.config, spec.architecture_of(model))
  return {r.ours[: -len('/kernel')]: r for r in mapping.rules if r.ours.endswith('/kernel')}


def _module_of(rule, path: str) -> str:
  if len(rule.torch) != 1 or rule.part is not None or not rule.torch[0].endswith('.weight'):
    raise ConversionError(
      f'{path} is not one PyTorch module ({", ".join(rule.torch)}): PEFT cannot adapt it alone'
    )
  return rule.torch[0][: -len('.weight')]


def save_peft(
  model, adapters, config: lora.LoraConfig, path: str | os.PathLike, base_model: str = ''
) -> None:
  """Writes ``adapters`` (made by :func:`transformer_jax.lora.init` for ``model``) as a PEFT adapter directory;
  ``base_model``: what ``base_model_name_or_path`` records (the base's directory or hub name)."""
  rules = _kernel_rules(model)
  flat = flatten(to_loop_layout(jax.device_get(adapters)))
  tensors, modules, conv1d = {}, [], False
  for key in sorted(k for k in flat if k.endswith(f'/{lora.A}')):
    ours = key[: -len(lora.A) - 1]
    if ours not in rules:
      raise ConversionError(f'{ours} has adapters but is no weight of the Hugging Face model')
    rule = rules[ours]
    module = _module_of(rule, ours)
    a, b = np.asarray(flat[key]), np.asarray(flat[f'{ours}/{lora.B}'])
    rank = a.shape[-1]
    tensors[f'{_PREFIX}{module}.lora_A.weight'] = np.ascontiguousarray(a.reshape(-1, rank).T)
    tensors[f'{_PREFIX}{module}.lora_B.weight'] = np.ascontiguousarray(b.reshape(rank, -1).T)
    modules.append(module)
    conv1d |= not rule.transpose
  settings = dict(
    peft_type='LORA',
    task_type=_TASK_TYPES.get(type(model)),
    base_model_name_or_path=base_model or None,
    r=config.rank,
    lora_alpha=config.alpha,
    lora_dropout=config.dropout,
    target_modules=modules,  # exact module names: PEFT matches a list entry against the end of each name
    bias='none',
    fan_in_fan_out=conv1d,
    use_rslora=False,
    use_dora=False,
    modules_to_save=None,
    init_lora_weights=True,
    inference_mode=True,
  )
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  (path / CONFIG_FILE).write_text(json.dumps(settings, indent=2))
  safetensors.numpy.save_file(tensors, path / WEIGHTS_FILE, metadata={'format': 'pt'})


def load_peft(model, path: str | os.PathLike) -> tuple[lora.LoraConfig, dict]:
  """A PEFT LoRA directory -> ``(LoraConfig, adapters)`` for ``model`` (in its layout), checked name by name and
  shape by shape."""
  path = Path(path)
  try:
    settings = json.loads((path / CONFIG_FILE).read_text())
    tensors = safetensors.numpy.load_file(path / WEIGHTS_FILE)
  # a missing file, bad JSON, or safetensors' own error type for a damaged file: all alike to the user
  except Exception as e:
    raise ConversionError(
      f'{path} is not a readable PEFT adapter directory: {type(e).__name__}: {e}'
    ) from e
  unsupported = {
    k: settings.get(k)
    for k in ('use_rslora', 'use_dora', 'modules_to_save', 'layers_to_transform')
    if settings.get(k)
  }
  if settings.get('peft_type') != 'LORA' or settings.get('bias', 'none') != 'none' or unsupported:
    raise ConversionError(
      f'{path / CONFIG_FILE}: only plain LoRA adapters load (peft_type LORA, bias none), got '
      f'peft_type={settings.get("peft_type")!r}, bias={settings.get("bias")!r}'
      + ''.join(f', {k}={v!r}' for k, v in unsupported.items())
    )
  rules = _kernel_rules(model)
  ours_of = {_module_of(rule, ours): ours for ours, rule in rules.items()}
  shapes, rank = our_shapes(model), settings['r']
  tree, problems = {}, []
  for key, value in tensors.items():
    module, _, leaf = key.removeprefix(_PREFIX).rpartition('.lora_')
    ours = ours_of.get(module)
    if ours is None or leaf not in ('A.weight', 'B.weight'):
      problems.append(f'{key} is no LoRA weight of a projection of ours')
      continue
    kernel, n_in = shapes[f'{ours}/kernel'], rules[ours].n_in
    inputs, outputs = kernel[:n_in], kernel[n_in:]
    if leaf == 'A.weight':  # (r, in) -> (*in, r)
      name, expected, shape = lora.A, (rank, math.prod(inputs)), inputs + (rank,)
    else:  # (out, r) -> (r, *out)
      name, expected, shape = lora.B, (math.prod(outputs), rank), (rank,) + outputs
    if value.shape != expected:
      problems.append(f'{key}: expected {expected}, found {value.shape}')
      continue
    node = tree
    for part in ours.split('/'):
      node = node.setdefault(part, {})
    node[name] = np.ascontiguousarray(value.T.reshape(shape))
  if problems:
    raise ConversionError(f'{path / WEIGHTS_FILE}: ' + '; '.join(problems))
  # the adapted modules' own names, e.g. query|value (targets matter only to lora.init)
  leaves = sorted({key.split('/')[-2] for key in flatten(tree)})
  config = lora.LoraConfig(
    rank=rank,
    alpha=float(settings['lora_alpha']),
    dropout=float(settings.get('lora_dropout', 0.0)),
    targets='|'.join(leaves),
  )
  return config, to_model_layout(jax.tree.map(jnp.asarray, tree), model.config)
