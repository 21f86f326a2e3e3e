"""What ``init_from`` gives a run (:class:`Pretrained`): the checkpoint's architecture, vocabulary, weights and
decoding settings, how they become the run's model config and first parameters, and the record a workdir keeps of
them. :mod:`train.pretrained_init` finds and checks the source."""

from __future__ import annotations

import dataclasses
import json
import logging

import jax
import numpy as np
from flax import traverse_util

from train.checkpoint import Checkpoints
from train.configs import preset
from train.vocab import TokenizerVocab, Vocab
from transformer_jax.convert.engine import our_shapes, to_loop_layout, to_model_layout
from transformer_jax.convert.hf_directory import load_hf
from transformer_jax.generation_config import translate_options
from transformer_jax.models import BERT

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
# generate()'s settings that decoding a run's validation pairs takes from the checkpoint (lengths and beams are the
# run's).
_DECODING = (
  'bos_id',
  'eos_id',
  'pad_id',
  'length_penalty',
  'early_stopping',
  'no_repeat_ngram_size',
  'min_new_tokens',
  'bad_words_ids',
  'forced_bos_id',
  'forced_eos_id',
)


def flat_loop(params) -> dict[str, np.ndarray]:
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
    return flat_loop(params)
  model, params = load_hf(source, dtype='float32')
  return flat_loop({'bert': params} if isinstance(model, BERT) else params)


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
  # an encoder-decoder's generation_config.json (over its config.json's ids), for decoding and the export
  generation: dict = dataclasses.field(default_factory=dict)
  # the checkpoint's weights (flat, loop layout), read when first needed
  _params: dict | None = None

  @property
  def decoding(self) -> dict:
    """The keyword arguments of :func:`~transformer_jax.generation.translate` the checkpoint ships (start, end
    and padding ids, the length penalty and the constraints of its ``generation_config.json``)."""
    options = translate_options(self.generation)
    return {k: options[k] for k in _DECODING}

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

  def fresh(self, model) -> list[str]:
    """The modules of ``model`` (loop-layout paths) that do not start from the checkpoint: a new head."""
    shapes = our_shapes(model)
    taken = set(self._taken(shapes))
    return sorted({k.rsplit('/', 1)[0] for k in shapes if k not in taken})

  def initial_params(self, fresh: dict, model) -> dict:
    """``fresh`` (a new init of ``model``, placed on the devices) with the checkpoint's weights in place of every
    parameter that starts from them, each placed like the array it replaces."""
    shapes = our_shapes(model)
    taken = self._taken(shapes)
    loop = traverse_util.unflatten_dict({k: self.params()[k] for k in taken}, sep='/')
    weights = traverse_util.flatten_dict(to_model_layout(loop, model.config), sep='/')
    new = self.fresh(model)
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
      'generation': self.generation,
      'model': model_config.to_dict(),
    }

    def write(path):
      with open(path, 'w') as f:
        json.dump(record, f, indent=2)

    vocab_file = TOKENIZER_DIR if isinstance(self.vocab, TokenizerVocab) else 'vocab.json'
    return {INIT_FILE: write, vocab_file: self.vocab.save}
