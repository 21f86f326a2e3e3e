"""Data: memory-mapped token streams, encoded examples, and batches that are a pure function of the step.

Every batch is drawn by ``numpy.random.default_rng([seed, step])`` (or from the per-epoch permutation of that seed),
so the data position of a run is its step: a resumed run reads exactly the batches the uninterrupted run would have.
Everything here raises a clear ``ValueError``/``FileNotFoundError`` before any compiling starts.
"""

from __future__ import annotations

import os
import tempfile
from typing import Iterator

import numpy as np

from train.readers import CHUNK_CHARS
from train.vocab import BOS, EOS, PAD, Vocab
from transformer_jax.validation import check_token_ids


# ----------------------------------------------------------------------------------------------------- token file
def tokenize(texts: Iterator[str], vocab: Vocab) -> np.memmap:
  """Tokenizes ``texts`` chunk by chunk into a flat, read-only memory map, kept in a temporary file that is unlinked
  at once (the mapping holds the data; nothing is left on disk on any exit path). :func:`save_token_file` puts it
  in a workdir once the run is known to start."""
  dtype = token_dtype(vocab.size)
  with tempfile.TemporaryFile() as f:
    for chunk in texts:
      ids = np.asarray(vocab.encode(chunk), dtype=np.int64)
      check_token_ids(ids, vocab.size, 'token ids')
      f.write(ids.astype(dtype).tobytes())
    f.flush()
    if f.tell() == 0:
      raise ValueError('the corpus holds no tokens')
    return np.memmap(f, dtype=dtype, mode='r')


def save_token_file(tokens: np.ndarray, path: str) -> None:
  with open(path + '.tmp', 'wb') as f:
    for start in range(0, len(tokens), CHUNK_CHARS):
      f.write(np.asarray(tokens[start : start + CHUNK_CHARS]).tobytes())
  # a killed run never leaves a half-written token file under the final name
  os.replace(path + '.tmp', path)


def token_dtype(vocab_size: int):
  return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


def open_token_file(path: str, vocab_size: int) -> np.memmap:
  if os.path.getsize(path) == 0:
    raise ValueError(f'the token file {path} is empty: the corpus holds no tokens')
  return np.memmap(path, dtype=token_dtype(vocab_size), mode='r')


def split_tokens(
  tokens: np.ndarray, val_fraction: float, seq_len: int
) -> tuple[np.ndarray, np.ndarray]:
  """The first ``1 - val_fraction`` of the stream trains, the rest validates; each must hold a whole sequence."""
  cut = int(len(tokens) * (1 - val_fraction))
  train, val = tokens[:cut], tokens[cut:]
  for name, part in (('training', train), ('validation', val)):
    if len(part) < seq_len + 1:
      raise ValueError(
        f'the {name} split has {len(part)} tokens, fewer than one sequence of seq_len + 1 = '
        f'{seq_len + 1}: use a bigger corpus, a shorter seq_len or another val_fraction'
      )
  return train, val


def unigram_cross_entropy(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
  """Cross-entropy (nats/token) of ``val`` under the training split's token frequencies (add-one smoothed): the loss
  of a model that ignores context, which a language model must beat."""
  counts = np.ones(vocab_size)
  for start in range(0, len(train), CHUNK_CHARS):
    counts += np.bincount(train[start : start + CHUNK_CHARS], minlength=vocab_size)
  log_p = np.log(counts / counts.sum())
  val_counts = sum(
    np.bincount(val[s : s + CHUNK_CHARS], minlength=vocab_size)
    for s in range(0, len(val), CHUNK_CHARS)
  )
  return float(-(val_counts * log_p).sum() / val_counts.sum())


# -------------------------------------------------------------------------------------------------------- windows
def random_windows(
  tokens: np.ndarray,
  batch_size: int,
  length: int,
  seed: int,
  step: int,
  rows: np.ndarray | None = None,
) -> np.ndarray:
  """``(B, length)`` windows at random offsets, drawn from ``(seed, step)`` alone; with ``rows``, only those rows
  of the batch are read (one process's share of a multi-process batch)."""
  starts = np.random.default_rng([seed, step]).integers(0, len(tokens) - length + 1, batch_size)
  starts = starts if rows is None else starts[rows]
  return np.stack([tokens[s : s + length] for s in starts]).astype(np.int32)


def consecutive_windows(tokens: np.ndarray, length: int, limit: int | None = None) -> np.ndarray:
  """Up to ``limit`` (default: all) non-overlapping ``(length,)`` windows from the start of ``tokens``: a fixed
  evaluation set."""
  count = len(tokens) // length if limit is None else min(limit, len(tokens) // length)
  return np.asarray(tokens[: count * length], dtype=np.int32).reshape(count, length)


def lm_example(window: np.ndarray) -> dict:
  """Next-token prediction on ``(B, T + 1)`` windows."""
  return {
    'inputs': window[:, :-1],
    'targets': window[:, 1:],
    'weights': np.ones(window[:, 1:].shape, np.float32),
  }


def mask_positions(
  candidates: np.ndarray, prob: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
  """``P = max(1, round(prob * T))`` positions of each row of the ``(B, T)`` bool ``candidates``, drawn without
  replacement: ``(positions, real)``, both ``(B, P)``, positions ascending. A row with fewer than ``P`` candidates
  fills up with position 0 where ``real`` is False, after its real ones."""
  length = candidates.shape[1]
  count = max(1, round(prob * length))
  order = np.where(
    candidates, rng.random(candidates.shape), np.inf
  )  # a random order, non-candidates last
  picked = np.argsort(order, axis=1, kind='stable')[:, :count]
  # a fill-up as `length`, which sorts after every real position
  positions = np.sort(np.where(np.take_along_axis(candidates, picked, 1), picked, length), axis=1)
  real = positions < length
  return np.where(real, positions, 0), real


def mask_tokens(
  ids: np.ndarray, vocab: Vocab, rng: np.random.Generator, prob: float = 0.15
) -> dict:
  """BERT's masking of ``(B, T)`` ids: ``P = max(1, round(prob * T))`` positions of each row are predicted, drawn
  without replacement from its regular tokens (special tokens are never chosen, nor drawn as random ones); of those
  80% become the mask token, 10% a random token, 10% stay.

  A fixed ``P`` per row, as in the original BERT's ``max_predictions_per_seq``, gives the batch one shape, so the model
  runs its head at these positions only. Returns ``inputs`` ``(B, T)``, and ``positions`` (ascending), ``targets``
  and ``weights`` ``(B, P)``; a row with fewer than ``P`` regular tokens fills up with weight-0 positions.
  """
  specials = np.array(sorted(vocab.special_ids), np.int64)
  regular = np.setdiff1d(np.arange(vocab.size), specials)
  positions, real = mask_positions(~np.isin(ids, specials), prob, rng)
  targets = np.take_along_axis(ids, positions, axis=1)
  action = rng.random(positions.shape)
  random_ids = regular[rng.integers(0, len(regular), positions.shape)]
  replaced = np.where(action < 0.8, vocab.mask_id, np.where(action < 0.9, random_ids, targets))
  inputs = np.array(ids)
  rows = np.broadcast_to(np.arange(len(ids))[:, None], positions.shape)
  inputs[rows[real], positions[real]] = replaced[real]
  return {
    'inputs': inputs.astype(np.int32),
    'positions': positions.astype(np.int32),
    'targets': targets.astype(np.int32),
    'weights': real.astype(np.float32),
  }


# ---------------------------------------------------------------------------------------------- example datasets
def epoch_indices(
  num_examples: int, batch_size: int, seed: int, step: int, rows: np.ndarray | None = None
) -> np.ndarray:
  """The example indices of batch ``step`` (of its ``rows`` only, when given): consecutive slices of one shuffled
  permutation per epoch."""
  flat = step * batch_size + (np.arange(batch_size) if rows is None else rows)
  epochs, positions = np.divmod(flat, num_examples)
  perms = {
    int(e): np.random.default_rng([seed, int(e)]).permutation(num_examples)
    for e in np.unique(epochs)
  }
  return np.array([perms[int(e)][p] for e, p in zip(epochs, positions)])


def pad_rows(rows: list[list[int]], length: int, pad_id: int = PAD) -> np.ndarray:
  """``(N, length)`` int32, right-padded with ``pad_id``; rows must already fit."""
  out = np.full((len(rows), length), pad_id, np.int32)
  for i, row in enumerate(rows):
    out[i, : len(row)] = row
  return out


def encode_pairs(pairs, src_vocab: Vocab, tgt_vocab: Vocab, src_len: int, tgt_len: int) -> dict:
  """Sources ``(N, S)``; target inputs ``[BOS] t`` and targets ``t [EOS]`` ``(N, T)``; longer pairs truncated."""
  sources = [src_vocab.encode(s)[:src_len] for s, _ in pairs]
  targets = [tgt_vocab.encode(t)[: tgt_len - 1] for _, t in pairs]
  data = {
    'sources': pad_rows(sources, src_len),
    'inputs': pad_rows([[BOS] + t for t in targets], tgt_len),
    'targets': pad_rows([t + [EOS] for t in targets], tgt_len),
  }
  check_token_ids(data['sources'], src_vocab.size, 'source ids')
  check_token_ids(data['targets'], tgt_vocab.size, 'target ids')
  data['weights'] = (data['targets'] != PAD).astype(np.float32)
  return data


def encode_sentences(texts: list[str], vocab: Vocab, length: int) -> np.ndarray:
  """The ids of each text as the vocabulary frames a sentence (:meth:`~train.vocab.Vocab.sentence`), padded to
  ``(N, length)``."""
  ids = pad_rows([vocab.sentence(text, length) for text in texts], length, vocab.pad_id)
  check_token_ids(ids, vocab.size, 'text ids')
  return ids


def encode_labelled(
  texts: list[str], labels: list[int], vocab: Vocab, max_len: int, num_labels: int
) -> dict:
  """:func:`encode_sentences` of ``texts`` and class ids ``(N,)``, which must lie in ``[0, num_labels)``."""
  labels = np.array(labels, np.int32)
  bad = labels[(labels < 0) | (labels >= num_labels)]
  if bad.size:
    raise ValueError(
      f'labels {sorted(set(bad.tolist()))[:8]} lie outside [0, model.num_labels={num_labels})'
    )
  return {'inputs': encode_sentences(texts, vocab, max_len), 'labels': labels}


def builtin_sentiment(count: int, seed: int) -> list[tuple[str, str]]:
  """A tiny generated sentiment task (labels ``positive`` and ``negative``) for running ``classify`` without files.
  A "not" before the adjective flips the label, so a bag of words is not enough."""
  subjects = [
    'the film',
    'this book',
    'the food',
    'our trip',
    'the show',
    'that song',
    'the hotel',
    'my day',
  ]
  good = ['great', 'wonderful', 'fun', 'lovely', 'excellent', 'charming']
  bad = ['awful', 'boring', 'terrible', 'dull', 'bad', 'painful']
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(count):
    positive, negated = bool(rng.integers(2)), bool(rng.integers(2))
    adjective = rng.choice(good if positive else bad)
    text = f'{rng.choice(subjects)} was {"not " if negated else ""}{adjective}'
    rows.append((text, 'positive' if positive != negated else 'negative'))
  return rows
