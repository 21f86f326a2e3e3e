"""What every task shares: the :class:`Task` interface, the files it keeps in the workdir, fixed evaluation batches
and the model, from the run config or from pretrained weights (``init_from``)."""

from __future__ import annotations

import os
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from train import adapters
from train.configs import DATA_DERIVED
from train.losses import cross_entropy_sums
from train.pretrained_init import open_init_from
from train.vocab import EOS, Vocab, build_vocab, load_vocab
from transformer_jax import lora
from transformer_jax.sharding import logical_axes

TOKEN_FILE, TOKEN_SOURCE = os.path.join('data', 'tokens.bin'), os.path.join('data', 'source.json')


def write_text(path: str, text: str) -> None:
  with open(path, 'w', encoding='utf-8') as f:
    f.write(text)


def eval_rows(config) -> int | None:
  """Validation rows per evaluation: ``eval_batches`` batches, or ``None`` (the whole split) for ``0``."""
  return config.eval_batches * config.batch_size or None


def fixed_batches(arrays: dict, batch_size: int) -> list[dict]:
  """All rows in batches of ``batch_size``; the last is filled up with weight-0 copies of its first row, so every
  batch has one shape (no recompiling) and the copies count for nothing."""
  count = len(arrays['weights'])
  batches = []
  for start in range(0, count, batch_size):
    rows = np.arange(start, start + batch_size)
    real = rows < count
    batch = {k: v[np.where(real, rows, start)] for k, v in arrays.items()}
    batch['weights'] = batch['weights'] * real.reshape((-1,) + (1,) * (batch['weights'].ndim - 1))
    batches.append(batch)
  return batches


def model_config(config_cls, config, **derived):
  """The model's frozen config: the run config's ``model`` fields plus those the vocabulary sets."""
  return config_cls.from_dict({**config.model.to_dict(), **derived})


def check_lengths(config, *names, pretrained=None):
  """Sequence lengths of ``config.data`` must fit the model's positions (those of the ``pretrained`` model, when
  the run starts from one)."""
  limit, what = config.model.max_len, 'model.max_len'
  if pretrained is not None:
    limit, what = pretrained.architecture['max_len'], 'the max_len of the init_from model'
  for name in names:
    if config.data[name] > limit:
      raise ValueError(f'data.{name}={config.data[name]} exceeds {what}={limit}')


def cut_at_eos(ids) -> list[int]:
  """A row of target ids up to (not including) its first ``[EOS]``."""
  ids = [int(i) for i in ids]
  return ids[: ids.index(EOS)] if EOS in ids else ids


class Task:
  """Base class. Subclasses set ``model``, ``metric`` and ``metric_mode`` and implement the batch functions.

  Building a task reads and checks all of its data and writes nothing: what the run must keep (vocabularies, the
  token file, label names) waits in ``pending`` until :meth:`save` writes it, once every check has passed. Files
  already in the workdir are reused, so a resumed run keeps its ids.
  """

  metric = 'loss'  # validation metric that picks the best checkpoints
  metric_mode = 'min'
  token_level = True  # the loss is per token (perplexity makes sense), not per example

  def __init__(self, config, workdir: str):
    self.config, self.workdir = config, workdir
    self.pending: dict[str, Callable[[str], None]] = {}  # path in the workdir -> writes that file
    # the start from pretrained weights, whose architecture and vocabulary the run then uses
    self.pretrained = open_init_from(config, workdir)
    self.lora = adapters.settings(config)  # None: every weight trains

  def save(self) -> None:
    """Writes the pending files into the workdir (created if need be)."""
    for name, write in self.pending.items():
      path = os.path.join(self.workdir, name)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      write(path)
    self.pending = {}

  def _kept(self, name: str) -> str | None:
    """The path of ``name`` in the workdir if a previous run left it there."""
    path = os.path.join(self.workdir, name)
    return path if os.path.exists(path) else None

  def train_batch(self, step: int, rows: np.ndarray | None = None) -> dict:
    """Batch ``step`` as numpy arrays; with ``rows`` (indices into the batch), only those rows: what one process
    feeds to its devices. Either way a row's content depends only on ``(seed, step, row)``."""
    raise NotImplementedError

  def eval_batches(self) -> list[dict]:
    raise NotImplementedError

  def model_inputs(self, batch) -> tuple:
    """The model's positional arguments taken from a batch."""
    return (batch['inputs'],)

  def model_options(self, batch) -> dict:
    """The model's keyword arguments taken from a batch (none by default)."""
    return {}

  def apply(self, params, *inputs, frozen=None, deterministic: bool, rng=None, **kwargs):
    """The model on ``inputs``. With LoRA's ``frozen`` parameters given (in training and evaluation), ``params`` are
    what trains (see :mod:`train.adapters`); else ``params`` are all the model's (merged ones, for a LoRA run).
    Under ``api='nnx'`` (:mod:`train.nnx_training`), ``params`` is the NNX model itself and ``rng`` an
    ``nnx.Rngs``."""
    if isinstance(params, nnx.Module):
      return params(*inputs, deterministic=deterministic, rngs=rng, **kwargs)
    rngs = None if deterministic else {'dropout': rng}
    if frozen is None:
      return self.model.apply(
        {'params': params}, *inputs, deterministic=deterministic, rngs=rngs, **kwargs
      )
    base = adapters.join(frozen, params['params'])
    made = params[lora.COLLECTION]
    options = dict(deterministic=deterministic, rngs=rngs, **kwargs)
    return lora.apply(self.model, base, made, self.lora, *inputs, **options)

  def logits(self, params, batch, *, deterministic: bool, rng=None, frozen=None):
    inputs, options = self.model_inputs(batch), self.model_options(batch)
    return self.apply(
      params, *inputs, frozen=frozen, deterministic=deterministic, rng=rng, **options
    )

  def loss_sums(
    self, params, batch, rng, deterministic: bool, label_smoothing: float = 0.0, frozen=None
  ) -> dict:
    logits = self.logits(params, batch, deterministic=deterministic, rng=rng, frozen=frozen)
    return cross_entropy_sums(logits, batch['targets'], batch['weights'], label_smoothing)

  def lora_split(self, params, key) -> tuple[dict, dict]:
    """``(frozen, trained)`` of a LoRA run from the model's ``params``: fresh adapters on the targets, and the
    modules of ``lora.train_also`` and those a pretrained start leaves new trained in full."""
    train_also = [self.config.lora.get('train_also', '')]
    if self.pretrained is not None:
      # this runs inside the jitted state constructor; the checkpoint's names and shapes are read eagerly
      with jax.ensure_compile_time_eval():
        fresh = self.pretrained.fresh(self.model)
      train_also += [re.escape(module) for module in fresh]
    frozen, trained = adapters.split(params, '|'.join(filter(None, train_also)))
    example = self.model_inputs(self._example())
    made = lora.init(self.model, params, self.lora, key, *example)
    return frozen, {lora.COLLECTION: made, 'params': trained}

  def init_params(self, rng):
    """Fresh parameters, from one row of the first batch."""
    example = self._example()
    return jax.jit(lambda key: self.model.init(key, *self.model_inputs(example))['params'])(rng)

  def param_axes(self):
    """The logical axis names of every parameter (:func:`~transformer_jax.sharding.logical_axes`)."""
    return logical_axes(self.model, *self.model_inputs(self._example()))

  def _example(self) -> dict:
    """One row of the first batch: what the model is initialised from."""
    return jax.tree.map(lambda x: jnp.asarray(x[:1]), self.train_batch(0))

  def start_params(self, params):
    """What a run without a checkpoint starts from: ``params`` (fresh, on the devices), or with ``init_from``, the
    pretrained weights in place of all the parameters they cover."""
    return params if self.pretrained is None else self.pretrained.initial_params(params, self.model)

  def _build_model(self, model_cls, config_cls, **derived):
    """``model_cls`` of the run config's ``model`` fields and ``derived`` (what the data sets); with
    ``init_from``, of the checkpoint's architecture (the vocabulary's fields included), its weights checked and
    its record staged on the first start."""
    if self.pretrained is None:
      return model_cls(model_config(config_cls, self.config, **derived))
    sized = {k: v for k, v in derived.items() if k not in DATA_DERIVED}
    model = model_cls(self.pretrained.model_config(self.config, config_cls, **sized))
    if not self.pretrained.recorded:
      self.pretrained.check(model)
      self.pending.update(self.pretrained.files(model.config))
    return model

  def extra_eval(self, params) -> dict:
    """Metrics beyond the loss (BLEU, exact match); empty by default."""
    return {}

  def baseline(self) -> dict:
    """Reference numbers to print beside the results (the unigram entropy of a language model)."""
    return {}

  def sample(self, params, rng) -> str:
    """What the trained model does, as text for the end of the run."""
    raise NotImplementedError

  def _vocab(self, filename: str, texts, kind: str) -> Vocab:
    """The pretrained model's own vocabulary; else the workdir's saved one if there is one (a resumed run must keep
    its ids), else a new one."""
    if self.pretrained is not None:
      return self.pretrained.vocab
    if path := self._kept(filename):
      return load_vocab(path)
    vocab = build_vocab(kind, texts, self.config.data.get('bpe_vocab_size', 4096))
    self.pending[filename] = vocab.save
    return vocab
