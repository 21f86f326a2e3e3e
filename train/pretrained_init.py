"""Runs that start from pretrained weights (``init_from``): a Hugging Face directory or the workdir of an earlier run.

The checkpoint decides the architecture, the tokenizer (or vocabulary) and the starting weights; the run config may
change only the model's runtime fields. On the first start everything is read and checked before anything is
written; the workdir then records what was found in ``init_from.json``, beside a copy of the tokenizer. From then on
the workdir alone describes the run (resume, ``train.sample``, ``train.export``), and ``init_from`` is read again
only for its weights, by a start that never saved a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import jax
import numpy as np
from flax import traverse_util

from train.checkpoint import Checkpoints
from train.configs import preset
from train.errors import first_line
from train.readers import LABELS_FILE, LabelSet
from train.vocab import TokenizerVocab, Vocab, load_vocab
from transformer_jax import pretrained as hf_pretrained
from transformer_jax.convert.engine import our_shapes, to_loop_layout, to_model_layout
from transformer_jax.convert.hf_directory import load_hf, read_config
from transformer_jax.models import BERT
from transformer_jax.tokenizer import load_tokenizer

log = logging.getLogger('train')

INIT_FILE = 'init_from.json'
TOKENIZER_DIR = 'tokenizer'
# Model fields a run from pretrained weights may set: how the weights compute and train, not what they are.
RUNTIME_FIELDS = (
  'dropout_rate',
  'attention_dropout_rate',
  'classifier_dropout_rate',
  'dtype',
  'param_dtype',
  'attention_implementation',
  'scan_layers',
  'remat_policy',
)
# Each task's model family, as a Hugging Face model_type; a run's workdir belongs to the family of its task.
FAMILY = {'lm': 'gpt2', 'mlm': 'bert', 'classify': 'bert'}
_WANTED = {
  'gpt2': 'a GPT-2 checkpoint (GPT2LMHeadModel or GPT2Model) or an lm workdir',
  'bert': 'a BERT checkpoint (BertModel, BertForMaskedLM or BertForSequenceClassification) or an '
  'mlm or classify workdir',
}
# The special tokens each task feeds its model.
_TOKENS = {'lm': (), 'mlm': ('mask',), 'classify': ('cls', 'sep', 'pad')}


def workdir_vocab(workdir: str) -> Vocab:
  """The vocabulary a run's workdir keeps: its tokenizer files, else its ``vocab.json``."""
  path = os.path.join(workdir, TOKENIZER_DIR)
  if os.path.isdir(path):
    return TokenizerVocab(load_tokenizer(path))
  return load_vocab(os.path.join(workdir, 'vocab.json'))


def _read_record(workdir: str) -> dict | None:
  path = os.path.join(workdir, INIT_FILE)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def _flat_loop(params) -> dict[str, np.ndarray]:
  """Our params (either layout) -> ``{'a/b/kernel': array}`` in the loop layout; a bare BERT encoder under ``bert``,
  where every BERT head keeps it."""
  flat = traverse_util.flatten_dict(to_loop_layout(params), sep='/')
  return {k: np.asarray(v) for k, v in flat.items()}


def _source_params(source: str, kind: str) -> dict[str, np.ndarray]:
  """The weights of ``init_from``, read now."""
  if kind == 'workdir':
    with Checkpoints.reader(source) as checkpoints:
      params = checkpoints.saved_params()
    if params is None:
      raise ValueError(f'init_from {source} holds no checkpoint to start from')
    return _flat_loop(params)
  model, params = load_hf(source, dtype='float32')
  return _flat_loop({'bert': params} if isinstance(model, BERT) else params)


@dataclasses.dataclass
class Pretrained:
  """What ``init_from`` gives a run. ``architecture``: our model config as a dict; ``head_labels``: the class
  names of the checkpoint's classification head (``None`` without one); ``hf_config``: what its ``config.json``
  says beyond the architecture (special token ids), for the export; ``recorded``: the workdir already holds the
  record; ``new``: top-level parameter groups to start afresh even where the checkpoint has them (a head whose
  labels do not fit)."""

  source: str
  kind: str  # 'hugging_face' | 'workdir'
  architecture: dict
  vocab: Vocab
  head_labels: list[str] | None
  hf_config: dict
  recorded: bool
  new: set = dataclasses.field(default_factory=set)
  # the checkpoint's weights (flat, loop layout), read when first needed
  _params: dict | None = None

  def params(self) -> dict[str, np.ndarray]:
    if self._params is None:
      self._params = _source_params(self.source, self.kind)
    return self._params

  def model_config(self, config, config_cls, **derived):
    """The run's model config: the checkpoint's architecture, ``derived`` (what the data sizes, e.g. the labels)
    and the run config's runtime fields. Any other ``model`` field that the run config moves away from its preset
    must equal the checkpoint's: otherwise a ``ValueError`` names it."""
    chosen, defaults = config.model.to_dict(), preset(config.task).model.to_dict()
    model = {**self.architecture, **derived}
    problems = []
    for name, value in chosen.items():
      if name not in model or value in (defaults.get(name), model[name]):
        continue
      if name in RUNTIME_FIELDS:
        model[name] = value
      else:
        origin = 'the data' if name in derived else 'the checkpoint'
        problems.append(f'model.{name}={value!r} ({origin} gives {model[name]!r})')
    if problems:
      raise ValueError(
        f'init_from {self.source} sets the architecture: drop {", ".join(problems)}; only the runtime '
        f'fields {", ".join(RUNTIME_FIELDS)} may be set'
      )
    return config_cls.from_dict(model)

  def _taken(self, shapes: dict) -> list[str]:
    """The parameters (of ``shapes``, loop layout) that start from the checkpoint."""
    return [k for k in shapes if k in self.params() and k.split('/')[0] not in self.new]

  def check(self, model) -> None:
    """Reads the weights and checks them against ``model``'s parameters, so that a start fails before it writes."""
    shapes = our_shapes(model)
    wrong = [
      f'{k}: checkpoint {self.params()[k].shape}, model {shapes[k]}'
      for k in self._taken(shapes)
      if self.params()[k].shape != tuple(shapes[k])
    ]
    if wrong:
      raise ValueError(
        f'the weights of init_from {self.source} do not fit the model: {"; ".join(wrong[:4])}'
      )

  def initial_params(self, fresh: dict, model) -> dict:
    """``fresh`` (a new init of ``model``, placed on the devices) with the checkpoint's weights in place of every
    parameter that starts from them, each placed like the array it replaces."""
    shapes = our_shapes(model)
    taken = self._taken(shapes)
    loop = traverse_util.unflatten_dict({k: self.params()[k] for k in taken}, sep='/')
    weights = traverse_util.flatten_dict(to_model_layout(loop, model.config), sep='/')
    new = sorted({k.rsplit('/', 1)[0] for k in shapes if k not in taken})
    log.info(
      'starting from %s: %d of %d parameter arrays from it%s',
      self.source,
      len(taken),
      len(shapes),
      f'; new: {", ".join(new)}' if new else '',
    )

    def place(name, leaf):
      if name not in weights:
        return leaf
      value = np.asarray(weights[name], leaf.dtype)
      return jax.make_array_from_callback(leaf.shape, leaf.sharding, lambda index: value[index])

    flat = traverse_util.flatten_dict(fresh, sep='/')
    return traverse_util.unflatten_dict({k: place(k, v) for k, v in flat.items()}, sep='/')

  def files(self, model_config) -> dict:
    """The workdir files a first start writes: the record (with the run's final model config, for runs that start
    from this one) and the tokenizer or vocabulary."""
    record = {
      'init_from': self.source,
      'kind': self.kind,
      'architecture': self.architecture,
      'head_labels': self.head_labels,
      'hf_config': self.hf_config,
      'model': model_config.to_dict(),
    }

    def write(path):
      with open(path, 'w') as f:
        json.dump(record, f, indent=2)

    vocab_file = TOKENIZER_DIR if isinstance(self.vocab, TokenizerVocab) else 'vocab.json'
    return {INIT_FILE: write, vocab_file: self.vocab.save}


def _from_hugging_face(source: str, found: dict, task: str) -> Pretrained:
  family = FAMILY[task]
  if found.get('model_type') != family:
    named = ', '.join(found.get('architectures') or []) or 'no architectures'
    raise ValueError(
      f'init_from {source} holds a {found.get("model_type")!r} model ({named}); the {task} task needs '
      f'{_WANTED[family]}'
    )
  try:  # the tokenizer, the weights, and whether they belong together
    loaded = hf_pretrained.load(source, dtype='float32')
  except ValueError as e:
    raise ValueError(f'init_from {source}: {first_line(e)}') from e
  vocab = TokenizerVocab(loaded.tokenizer)
  architecture = loaded.model.config.to_dict()
  if (
    family == 'bert' and vocab.pad_id is not None
  ):  # the model tells padding by the tokenizer's pad id
    architecture['pad_id'] = vocab.pad_id
  params = {'bert': loaded.params} if isinstance(loaded.model, BERT) else loaded.params
  labels = None if loaded.labels is None else list(loaded.labels)
  return Pretrained(
    source,
    'hugging_face',
    architecture,
    vocab,
    labels,
    loaded.hf_config,
    False,
    _params=_flat_loop(params),
  )


def _from_workdir(source: str, found: dict, task: str) -> Pretrained:
  family = FAMILY[task]
  if FAMILY.get(found['task']) != family:
    raise ValueError(
      f'init_from {source} is the workdir of a {found["task"]} run; the {task} task needs '
      f'{_WANTED[family]}'
    )
  vocab = workdir_vocab(source)
  record = _read_record(source)
  if record is not None:  # itself started from pretrained weights: its record holds what it trained
    architecture, hf_config = record['model'], record['hf_config']
  else:  # as its task built it: the config's model fields and the vocabulary's
    pad_id = vocab.pad_id if family == 'bert' else None
    architecture, hf_config = {**found['model'], 'vocab_size': vocab.size, 'pad_id': pad_id}, {}
  labels = None
  if found['task'] == 'classify':
    names = LabelSet.load(os.path.join(source, LABELS_FILE)).names
    labels = names or [str(i) for i in range(architecture['num_labels'])]
  return Pretrained(source, 'workdir', architecture, vocab, labels, hf_config, False)


def _inspect(source: str, task: str) -> Pretrained:
  if not os.path.isdir(source):
    raise FileNotFoundError(f'init_from {source} is not a directory')
  found = read_config(Path(source))
  if 'model_type' in found:
    return _from_hugging_face(source, found, task)
  if 'task' in found:
    return _from_workdir(source, found, task)
  raise ValueError(
    f'init_from {source} is neither a Hugging Face model directory (its config.json has no model_type) nor '
    'the workdir of a run'
  )


def open_init_from(config, workdir: str) -> Pretrained | None:
  """The pretrained start of a run (``None`` without ``init_from``): from the workdir's record when an earlier
  start of this run left one, else read from ``init_from`` and checked. Raises ``ValueError`` (or
  ``FileNotFoundError``) with one line that names the problem."""
  if not config.get('init_from'):
    return None
  if config.task not in FAMILY:
    raise ValueError(f'init_from works for the tasks {sorted(FAMILY)}, not {config.task!r}')
  source = os.path.abspath(os.path.expanduser(config.init_from))
  record = _read_record(workdir)
  if record is not None and record['init_from'] == source:
    pretrained = Pretrained(
      source,
      record['kind'],
      record['architecture'],
      workdir_vocab(workdir),
      record['head_labels'],
      record['hf_config'],
      True,
    )
  else:
    pretrained = _inspect(source, config.task)
  vocab = pretrained.vocab
  for name in _TOKENS[config.task]:
    if getattr(vocab, f'{name}_id') is None:
      raise ValueError(
        f'the tokenizer of init_from {source} has no {name} token, which the {config.task} task needs'
      )
  if vocab.size > pretrained.architecture['vocab_size']:
    raise ValueError(
      f'the tokenizer of init_from {source} has {vocab.size} tokens but the model embeds only '
      f'{pretrained.architecture["vocab_size"]}: they do not belong together'
    )
  return pretrained
