"""Tasks trained on whole examples read from a file (or built in): the shared base, and ``classify``."""

from __future__ import annotations

import functools

import jax
import numpy as np

from train import data, readers
from train.readers import LABELS_FILE
from train.tasks.base import (
  Task,
  check_lengths,
  eval_rows,
  fixed_batches,
)
from transformer_jax import (
  BERTConfig,
  BERTForSequenceClassification,
)


def split_examples(examples: list, val_fraction: float, seed: int) -> tuple[list, list]:
  """A seeded shuffle, then the last ``val_fraction`` (at least one example) validates."""
  order = np.random.default_rng(seed).permutation(len(examples))
  examples = [examples[i] for i in order]
  cut = len(examples) - max(1, int(len(examples) * val_fraction))
  if cut < 1:
    raise ValueError(f'{len(examples)} example(s) cannot be split into training and validation')
  return examples[:cut], examples[cut:]


class ExampleTask(Task):
  """Shared by ``translation`` and ``classify``: whole examples in numpy arrays, shuffled once per epoch."""

  def train_batch(self, step, rows=None):
    examples = data.epoch_indices(
      len(self.train['weights']), self.config.batch_size, self.config.seed, step, rows
    )
    return {k: v[examples] for k, v in self.train.items()}

  def eval_batches(self):
    rows = eval_rows(self.config)
    return fixed_batches(
      self.val if rows is None else {k: v[:rows] for k, v in self.val.items()},
      self.config.batch_size,
    )


class ClassificationTask(ExampleTask):
  """``classify``: BERT's classification head on ``text,label`` rows (or a tiny built-in sentiment set). Labels are
  integers (their own class ids) or names, numbered in sorted order (:class:`~train.readers.LabelSet`). From
  pretrained weights, the head is sized to the data's labels, or kept when the checkpoint's head already has them
  (in its own order)."""

  metric = 'accuracy'
  metric_mode = 'max'
  token_level = False

  def __init__(self, config, workdir):
    super().__init__(config, workdir)
    cfg = config.data
    check_lengths(config, 'seq_len', pretrained=self.pretrained)
    rows = (
      data.builtin_sentiment(cfg.builtin_size, config.seed)
      if cfg.path == readers.BUILTIN
      else readers.read_labelled(
        cfg.path, cfg.get('text_field', 'text'), cfg.get('label_field', 'label')
      )
    )
    if len({label for _, label in rows}) < 2:
      raise ValueError(
        f'the data has one label only ({rows[0][1]!r}); a classifier needs two or more'
      )
    train, val = split_examples(rows, cfg.val_fraction, config.seed)
    train_labels = [label for _, label in train]
    self.labels = self._label_set(train_labels)
    self.num_labels = self._num_labels(train_labels)
    self.vocab = self._vocab('vocab.json', (text for text, _ in train), cfg.vocab)
    self.train, self.val = (
      self._encode(part, split) for part, split in ((train, 'training'), (val, 'validation'))
    )
    self.texts = [text for text, _ in val]
    self.model = self._build_model(
      BERTForSequenceClassification,
      BERTConfig,
      vocab_size=self.vocab.size,
      pad_id=0,
      num_labels=self.num_labels,
    )

  def _label_set(self, train_labels) -> readers.LabelSet:
    if path := self._kept(LABELS_FILE):
      return readers.LabelSet.load(path)
    labels = readers.LabelSet.from_labels(train_labels)
    head = self.pretrained and self.pretrained.head_labels
    if head and labels.names is not None and set(labels.names) <= set(head):
      labels = readers.LabelSet(
        head
      )  # the checkpoint's head knows these labels: its order keeps it usable
    self.pending[LABELS_FILE] = labels.save
    return labels

  def _num_labels(self, train_labels) -> int:
    """Classes of the head: ``model.num_labels``, which named labels must match; from pretrained weights, as many
    as the data has (or the checkpoint's head has, when it is kept)."""
    names = self.labels.names
    if self.pretrained is None:
      count = self.config.model.num_labels
      if names is not None and len(names) != count:
        raise ValueError(
          f'the training data has {len(names)} labels {names[:8]}, but model.num_labels={count}: set '
          f'--config.model.num_labels={len(names)}'
        )
      return count
    count = len(names) if names is not None else max(int(label) for label in train_labels) + 1
    head = self.pretrained.head_labels
    if head is not None and (names == head if names is not None else count <= len(head)):
      return len(head)
    self.pretrained.new.add('classifier')
    return count

  def _encode(self, rows, split: str) -> dict:
    ids = self.labels.encode([label for _, label in rows], split)
    arrays = data.encode_labelled(
      [text for text, _ in rows], ids, self.vocab, self.config.data.seq_len, self.num_labels
    )
    return {
      'inputs': arrays['inputs'],
      'targets': arrays['labels'],
      'weights': np.ones(len(arrays['labels']), np.float32),
    }

  def encode_texts(self, texts: list[str]) -> np.ndarray:
    """``(N, seq_len)`` input ids of ``texts``, framed and padded as the training rows are."""
    return data.encode_sentences(texts, self.vocab, self.config.data.seq_len)

  def predict(self, params, inputs: np.ndarray) -> np.ndarray:
    """Class probabilities ``(N, num_labels)`` of ``(N, seq_len)`` input ids."""
    return np.asarray(self._probabilities(params, inputs))

  @functools.cached_property
  def _probabilities(self):
    """:meth:`predict`, compiled once per batch shape."""
    return jax.jit(
      lambda params, inputs: jax.nn.softmax(
        self.logits(params, {'inputs': inputs}, deterministic=True), axis=-1
      )
    )

  def sample(self, params, rng):
    batch = self.eval_batches()[0]
    predicted = self.predict(params, batch['inputs']).argmax(-1)
    name = self.labels.name
    return '\n'.join(
      f'{text!r}: predicted {name(p)}, label {name(t)}'
      for text, p, t in list(zip(self.texts, predicted, batch['targets']))[:5]
    )
