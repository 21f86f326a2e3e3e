"""Vocabularies: characters, bytes, words or BPE, with the same five special tokens first in each.

Every vocabulary built here reserves ids 0-4 for ``[PAD] [BOS] [EOS] [MASK] [UNK]``, so padding is always 0 (the
models' ``pad_id``), BERT's ``[CLS]``/``[SEP]`` are ``[BOS]``/``[EOS]``, and masked-LM has its ``[MASK]``. A
vocabulary is saved as one JSON file beside the checkpoints, so sampling and resuming never rebuild it from the
data. A run started from pretrained weights uses the model's own tokenizer instead (:class:`TokenizerVocab`), with
its special tokens wherever it keeps them.
"""

from __future__ import annotations

import collections
import json
import os
from typing import Iterable

SPECIALS = ('[PAD]', '[BOS]', '[EOS]', '[MASK]', '[UNK]')
PAD, BOS, EOS, MASK, UNK = range(len(SPECIALS))
KINDS = ('char', 'byte', 'word', 'bpe')


class Vocab:
  """Base class: ``encode(text) -> list[int]``, ``decode(ids) -> str`` (specials dropped), ``size``, and the ids of
  the special tokens (``cls_id``/``sep_id``: what BERT's inputs start and end with)."""

  kind = ''
  pad_id, bos_id, eos_id, mask_id, unk_id = PAD, BOS, EOS, MASK, UNK
  cls_id, sep_id = BOS, EOS
  special_ids = frozenset(range(len(SPECIALS)))

  @property
  def size(self) -> int:
    raise NotImplementedError

  def encode(self, text: str) -> list[int]:
    raise NotImplementedError

  def decode(self, ids: Iterable[int]) -> str:
    raise NotImplementedError

  def sentence(self, text: str, length: int) -> list[int]:
    """The ids a classifier reads for ``text``, at most ``length``: ``[BOS] text``, cut to fit."""
    return [self.cls_id] + self.encode(text)[: length - 1]

  def state(self) -> dict:
    """What :func:`load_vocab` needs to rebuild this vocabulary."""
    return {}

  def save(self, path: str) -> None:
    with open(path, 'w', encoding='utf-8') as f:
      json.dump({'kind': self.kind, **self.state()}, f, ensure_ascii=False)


class TableVocab(Vocab):
  """A fixed list of symbols (characters or words) after the specials."""

  def __init__(self, symbols: list[str]):
    self.symbols = list(symbols)
    self.index = {s: i + len(SPECIALS) for i, s in enumerate(self.symbols)}

  @property
  def size(self) -> int:
    return len(SPECIALS) + len(self.symbols)

  def split(self, text: str) -> list[str]:
    raise NotImplementedError

  def join(self, symbols: list[str]) -> str:
    raise NotImplementedError

  def encode(self, text: str) -> list[int]:
    return [self.index.get(s, UNK) for s in self.split(text)]

  def decode(self, ids: Iterable[int]) -> str:
    return self.join([self.symbols[i - len(SPECIALS)] for i in ids if i >= len(SPECIALS)])

  def state(self) -> dict:
    return {'symbols': self.symbols}


class CharVocab(TableVocab):
  kind = 'char'

  def split(self, text):
    return list(text)

  def join(self, symbols):
    return ''.join(symbols)


class WordVocab(TableVocab):
  """Whitespace-separated words; decoding joins them with single spaces."""

  kind = 'word'

  def split(self, text):
    return text.split()

  def join(self, symbols):
    return ' '.join(symbols)


class ByteVocab(Vocab):
  """UTF-8 bytes: any text encodes, nothing is unknown. Decoding replaces broken multi-byte sequences."""

  kind = 'byte'

  @property
  def size(self) -> int:
    return len(SPECIALS) + 256

  def encode(self, text):
    return [b + len(SPECIALS) for b in text.encode('utf-8')]

  def decode(self, ids):
    return bytes(i - len(SPECIALS) for i in ids if i >= len(SPECIALS)).decode(
      'utf-8', errors='replace'
    )


class BPEVocab(Vocab):
  """Byte-level BPE from the ``tokenizers`` library (GPT-2's scheme), specials at ids 0-4."""

  kind = 'bpe'

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer

  @property
  def size(self) -> int:
    return self.tokenizer.get_vocab_size()

  def encode(self, text):
    return self.tokenizer.encode(text, add_special_tokens=False).ids

  def decode(self, ids):
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

  def state(self):
    return {'tokenizer': self.tokenizer.to_str()}

  @classmethod
  def train(cls, texts: Iterable[str], vocab_size: int) -> 'BPEVocab':
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
      vocab_size=vocab_size,
      special_tokens=list(SPECIALS),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return cls(tokenizer)


class TokenizerVocab(Vocab):
  """A pretrained model's own tokenizer (a :class:`transformer_jax.tokenizer.Tokenizer`) as a run's vocabulary: its
  ids, its special tokens, and its files (``save`` writes a directory that ``transformers`` loads)."""

  kind = 'tokenizer'

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer
    tok = tokenizer
    self.pad_id, self.mask_id, self.unk_id = tok.pad_id, tok.mask_id, tok.unk_id
    self.cls_id, self.sep_id, self.eos_id = tok.cls_id, tok.sep_id, tok.eos_id
    self.bos_id = tok.bos_id
    ids = (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id, tok.bos_id, tok.eos_id)
    self.special_ids = frozenset(i for i in ids if i is not None)

  @property
  def size(self) -> int:
    return self.tokenizer.vocab_size

  def encode(self, text):
    return self.tokenizer.encode(text, add_special_tokens=False)

  def decode(self, ids):
    return self.tokenizer.decode([int(i) for i in ids])

  def sentence(self, text, length):
    """``[CLS] text [SEP]``, the text cut to fit ``length``, as BERT's tokenizer frames one sentence."""
    return [self.cls_id] + self.encode(text)[: length - 2] + [self.sep_id]

  def save(self, path: str) -> None:
    self.tokenizer.save(path)


def build_vocab(kind: str, texts: Iterable[str], bpe_size: int = 4096, min_count: int = 1) -> Vocab:
  """A vocabulary of ``kind`` (see :data:`KINDS`) fitted to ``texts`` (an iterable read once)."""
  if kind == 'byte':
    return ByteVocab()
  if kind == 'bpe':
    return BPEVocab.train(texts, bpe_size)
  if kind in ('char', 'word'):
    cls = CharVocab if kind == 'char' else WordVocab
    counts = collections.Counter()
    for text in texts:
      counts.update(cls.split(None, text))
    return cls(sorted(s for s, c in counts.items() if c >= min_count))
  raise ValueError(f'unknown vocabulary kind {kind!r}; expected one of {KINDS}')


def load_vocab(path: str) -> Vocab:
  """Reads a vocabulary written by :meth:`Vocab.save`."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'no vocabulary at {path}')
  with open(path, encoding='utf-8') as f:
    data = json.load(f)
  kind = data.pop('kind')
  if kind == 'byte':
    return ByteVocab()
  if kind == 'bpe':
    from tokenizers import Tokenizer

    return BPEVocab(Tokenizer.from_str(data['tokenizer']))
  return {'char': CharVocab, 'word': WordVocab}[kind](data['symbols'])
