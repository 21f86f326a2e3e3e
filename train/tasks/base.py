"""What every task shares: the :class:`Task` interface, the files it keeps in the workdir, fixed evaluation batches
and the model config taken from the run config."""

from __future__ import annotations

import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from train.losses import cross_entropy_sums
from train.vocab import EOS, Vocab, build_vocab, load_vocab

TOKEN_FILE, TOKEN_SOURCE = os.path.join('data', 'tokens.bin'), os.path.join('data', 'source.json')
LABELS_FILE = 'labels.json'


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


def check_lengths(config, *names):
  """Sequence lengths of ``config.data`` must fit the model's positions."""
  for name in names:
    if config.data[name] > config.model.max_len:
      raise ValueError(
        f'data.{name}={config.data[name]} exceeds model.max_len={config.model.max_len}'
      )


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

  def logits(self, params, batch, *, deterministic: bool, rng=None):
    return self.model.apply(
      {'params': params},
      *self.model_inputs(batch),
      deterministic=deterministic,
      rngs=None if deterministic else {'dropout': rng},
    )

  def loss_sums(
    self, params, batch, rng, deterministic: bool, label_smoothing: float = 0.0
  ) -> dict:
    logits = self.logits(params, batch, deterministic=deterministic, rng=rng)
    return cross_entropy_sums(logits, batch['targets'], batch['weights'], label_smoothing)

  def init_params(self, rng):
    """Fresh parameters, from one row of the first batch."""
    example = jax.tree.map(lambda x: jnp.asarray(x[:1]), self.train_batch(0))
    return jax.jit(lambda key: self.model.init(key, *self.model_inputs(example))['params'])(rng)

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
    """The workdir's saved vocabulary if there is one (a resumed run must keep its ids), else a new one."""
    if path := self._kept(filename):
      return load_vocab(path)
    vocab = build_vocab(kind, texts, self.config.data.get('bpe_vocab_size', 4096))
    self.pending[filename] = vocab.save
    return vocab
