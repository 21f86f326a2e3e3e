"""Runs that start from pretrained weights (``init_from``): a Hugging Face directory or the workdir of an earlier run.

The checkpoint decides the architecture, the tokenizer (or vocabulary) and the starting weights; the run config may
change only the model's runtime fields. On the first start everything is read and checked before anything is
written; the workdir then records what was found in ``init_from.json``, beside a copy of the tokenizer. From then on
the workdir alone describes the run (resume, ``train.sample``, ``train.export``), and ``init_from`` is read again
only for its weights, by a start that never saved a checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from train.errors import first_line
from train.pretrained_start import INIT_FILE, TOKENIZER_DIR, Pretrained, flat_loop
from train.readers import LABELS_FILE, LabelSet
from train.vocab import TokenizerVocab, Vocab, load_vocab
from transformer_jax import pretrained as hf_pretrained
from transformer_jax.convert.hf_directory import read_config
from transformer_jax.generation_config import GENERATION_KEYS
from transformer_jax.models import BERT
from transformer_jax.tokenizer import load_tokenizer

# Each task's model family; a run's workdir belongs to the family of its task.
FAMILY = {'lm': 'gpt2', 'mlm': 'bert', 'classify': 'bert', 'translation': 'seq2seq'}
# The Hugging Face model_types of each family.
MODEL_TYPES = {
  'gpt2': ('gpt2', 'llama', 'mistral', 'qwen2'),
  'bert': ('bert',),
  'seq2seq': ('bart', 'marian', 't5'),
}
_WANTED = {
  'gpt2': 'a decoder-only checkpoint (GPT2LMHeadModel, GPT2Model, LlamaForCausalLM, MistralForCausalLM or '
  'Qwen2ForCausalLM) or an lm workdir',
  'bert': 'a BERT checkpoint (BertModel, BertForMaskedLM or BertForSequenceClassification) or an '
  'mlm or classify workdir',
  'seq2seq': 'a BART, Marian or T5 checkpoint (BartForConditionalGeneration, MarianMTModel, '
  'T5ForConditionalGeneration) or the workdir of a translation run that started from one',
}
# The special tokens each task feeds its model.
_TOKENS = {'lm': (), 'mlm': ('mask',), 'classify': ('cls', 'sep', 'pad'), 'translation': ('eos',)}


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


def _from_hugging_face(source: str, found: dict, task: str) -> Pretrained:
  family = FAMILY[task]
  if found.get('model_type') not in MODEL_TYPES[family]:
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
  generation = {}
  if family == 'seq2seq':  # older checkpoints keep the ids in config.json alone
    generation = {**loaded.hf_config, **loaded.generation_config}
    generation = {k: v for k, v in generation.items() if k in GENERATION_KEYS}
  return Pretrained(
    source,
    'hugging_face',
    architecture,
    vocab,
    labels,
    loaded.hf_config,
    False,
    generation=generation,
    _params=flat_loop(params),
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
  generation = {} if record is None else record.get('generation', {})
  if family == 'seq2seq' and record is None:
    raise ValueError(
      f'init_from {source} is a translation run with its own vocabularies; only translation runs that started '
      'from a Hugging Face model (init_from) can start another'
    )
  if record is not None:  # itself started from pretrained weights: its record holds what it trained
    architecture, hf_config = record['model'], record['hf_config']
  else:  # as its task built it: the config's model fields and the vocabulary's
    pad_id = vocab.pad_id if family == 'bert' else None
    architecture, hf_config = {**found['model'], 'vocab_size': vocab.size, 'pad_id': pad_id}, {}
  labels = None
  if found['task'] == 'classify':
    names = LabelSet.load(os.path.join(source, LABELS_FILE)).names
    labels = names or [str(i) for i in range(architecture['num_labels'])]
  return Pretrained(
    source, 'workdir', architecture, vocab, labels, hf_config, False, generation=generation
  )


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
      generation=record.get('generation', {}),
    )
  else:
    pretrained = _inspect(source, config.task)
  vocab = pretrained.vocab
  for name in _TOKENS[config.task]:
    if getattr(vocab, f'{name}_id') is None:
      raise ValueError(
        f'the tokenizer of init_from {source} has no {name} token, which the {config.task} task needs'
      )
  rows = pretrained.architecture.get('vocab_size') or pretrained.architecture['src_vocab_size']
  if vocab.size > rows:
    raise ValueError(
      f'the tokenizer of init_from {source} has {vocab.size} tokens but the model embeds only '
      f'{rows}: they do not belong together'
    )
  return pretrained
