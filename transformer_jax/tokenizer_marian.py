"""Marian's tokenizer as transformers' `MarianTokenizer` reads it: two SentencePiece models, `source.spm` for the
texts to translate and `target.spm` for translations, whose pieces `vocab.json` numbers (`target_vocab.json` the
target side's with `separate_vocabs`), `</s>` after each text. Needs the optional sentencepiece package.

tok = load_tokenizer('opus-mt-en-de/')                                   # a MarianTokenizer
batch = tok(['A text.', 'Another one.'])                                 # input_ids, attention_mask: (B, S)
labels = tok.for_targets()(['Ein Text.', 'Noch einer.'])['input_ids']    # AutoTokenizer(text_target=...)
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import NamedTuple

from transformer_jax.tokenizer import (
  Tokenizer,
  TokenizerError,
  _one_line,
  _read_json,
  read_settings,
)
from transformer_jax.tokenizer_families import clean_up_tokenization, content

_DEFAULTS = dict(unk_token='<unk>', eos_token='</s>', pad_token='<pad>', model_max_length=512)
# transformers' SPECIAL_TOKENS_ATTRIBUTES: the order that numbers special tokens missing from vocab.json.
_NAMED_ORDER = ('bos', 'eos', 'unk', 'sep', 'pad', 'cls', 'mask')
_WORD_START = '▁'  # SentencePiece's space
_INSTALL = 'pip install "transformer_jax[sentencepiece]"'


class _Row(NamedTuple):
  """One encoded text, as the `__call__` of :class:`Tokenizer` reads a `tokenizers.Encoding`."""

  ids: list[int]
  type_ids: list[int]


def _sentencepiece():
  """The sentencepiece module, or a one-line TokenizerError saying how to install it."""
  try:
    import sentencepiece
  except ImportError as e:
    raise TokenizerError(f'Marian tokenizers need the sentencepiece package: {_INSTALL}') from e
  return sentencepiece


class MarianTokenizer(Tokenizer):
  """A Marian tokenizer; `for_targets()` gives the tokenizer of its target side. Both decode alike, with the
  source model (the target model with `separate_vocabs`), as transformers does.

  `added` maps the added tokens (the special tokens) to their ids, which both sides share.
  """

  def __init__(self, models: tuple, vocabs: tuple[dict, dict], config: dict, path=None):
    """`models`: the source and target `SentencePieceProcessor`; `vocabs`: the source and target piece -> id maps
    (one map twice unless `separate_vocabs`); `config`: the tokenizer config with Marian's defaults."""
    super().__init__(None, config, 'marian', path)
    self.source_model, self.target_model = models
    self.source_vocab, self.target_vocab = vocabs
    self.separate_vocabs = bool(config.get('separate_vocabs'))
    self.targets = False
    if self.unk_token not in self.source_vocab:
      raise TokenizerError(f'the vocab.json in {path} lacks the unknown token {self.unk_token!r}')
    extra = config.get('extra_special_tokens') or config.get('additional_special_tokens') or []
    named = [getattr(self, f'{name}_token') for name in _NAMED_ORDER]
    self.special_tokens = list(dict.fromkeys(t for t in named + [content(t) for t in extra] if t))
    self.added_entries = self._added_entries(config.get('added_tokens_decoder') or {})
    self.added = {content(entry): int(i) for i, entry in self.added_entries.items()}
    self._added_by_id = {i: token for token, i in self.added.items()}
    # Decoding reads the target vocabulary (the shared one without separate_vocabs) on either side.
    self._pieces = {i: piece for piece, i in self.target_vocab.items()}
    longest_first = sorted(self.added, key=len, reverse=True)
    self._splitter = re.compile('(' + '|'.join(map(re.escape, longest_first)) + ')')

  @classmethod
  def from_directory(cls, path) -> MarianTokenizer:
    """Reads source.spm, target.spm, vocab.json (and target_vocab.json) with tokenizer_config.json's settings."""
    root = Path(path)
    config = {**_DEFAULTS, **read_settings(root)}
    names = ['source.spm', 'target.spm', 'vocab.json']
    names += ['target_vocab.json'] if config.get('separate_vocabs') else []
    missing = [name for name in names if not (root / name).is_file()]
    if missing:
      raise TokenizerError(f'no Marian tokenizer in {root}: {" + ".join(missing)} missing')
    sentencepiece = _sentencepiece()
    models = []
    for name in names[:2]:
      try:
        models.append(sentencepiece.SentencePieceProcessor(model_file=str(root / name)))
      except (OSError, RuntimeError) as e:
        raise TokenizerError(f'cannot read {root / name}: {_one_line(e)}') from e
    vocabs = [_read_json(root / name) for name in names[2:]]
    return cls(tuple(models), (vocabs[0], vocabs[-1]), config, root)

  def _added_entries(self, saved: dict) -> dict[str, dict]:
    """transformers' added tokens: those the config lists, then each special token not among them, with its
    vocab.json id or, missing there, the next free one."""
    entries = dict(saved)
    taken = {content(entry) for entry in entries.values()}
    known = {**self.source_vocab, **{content(e): int(i) for i, e in entries.items()}}
    size = len(known)
    flags = dict(lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)
    for token in self.special_tokens:
      if token not in taken:
        if token not in known:
          known[token], size = size, size + 1
        entries[str(known[token])] = {'content': token, **flags}
    return entries

  def for_targets(self) -> MarianTokenizer:
    """This tokenizer encoding with target.spm (and target_vocab.json), as `text_target=` does."""
    twin = copy.copy(self)
    twin.targets = True
    return twin

  @property
  def _model(self):
    return self.target_model if self.targets else self.source_model

  @property
  def _vocab(self) -> dict:
    return self.target_vocab if self.targets else self.source_vocab

  @property
  def vocab_size(self) -> int:
    """The rows an embedding of this side needs: one past the largest id of its vocabulary and added tokens."""
    return 1 + max(max(self._vocab.values()), max(self.added.values()))

  def token_to_id(self, token: str | None) -> int | None:
    """The id of `token` (an added token's, else this side's vocabulary's), or None when there is none."""
    return None if token is None else self.added.get(token, self._vocab.get(token))

  def id_to_token(self, i: int) -> str | None:
    """The token with id `i`, or None when there is none."""
    return self._added_by_id.get(int(i), self._pieces.get(int(i)))

  def _pieces_to_ids(self, text: str) -> list[int]:
    """Ids of a text without special tokens around it: added tokens matched whole, the rest SentencePiece pieces
    (a leading language code such as '>>de<<' kept whole), each looked up in this side's vocabulary."""
    unk, ids = self._vocab[self.unk_token], []
    for chunk in self._splitter.split(text):
      if chunk in self.added:
        ids.append(self.added[chunk])
        continue
      code = []
      if chunk.startswith('>>') and (end := chunk.find('<<')) != -1:
        code, chunk = [chunk[: end + 2]], chunk[end + 2 :]
      pieces = code + (self._model.encode(chunk, out_type=str) if chunk else [])
      ids += [self.added.get(p, self._vocab.get(p, unk)) for p in pieces]
    return ids

  def _encode(self, inputs: list, add_special_tokens: bool, truncation, max_length: int | None):
    if not all(isinstance(text, str) for text in inputs):
      raise ValueError('MarianTokenizer encodes single texts; it takes no text pairs')
    cut = truncation in (True, 'longest_first', 'only_first') and max_length is not None
    rows = []
    for text in inputs:
      ids = self._pieces_to_ids(text)
      # as transformers' truncate_sequences: the room for `</s>` counts
      excess = len(ids) + int(add_special_tokens) - max_length if cut else 0
      if excess > 0:
        ids = ids[excess:] if self.truncation_side == 'left' else ids[:-excess]
      ids = ids + [self.eos_id] if add_special_tokens else ids
      rows.append(_Row(ids, [0] * len(ids)))
    return rows

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    """The text of a row of ids, as `MarianTokenizer.decode` gives it: SentencePiece decodes the runs between
    special tokens, which are kept as written unless skipped."""
    model = self.target_model if self.separate_vocabs else self.source_model
    skipped = {self.token_to_id(t) for t in self.special_tokens} if skip_special_tokens else set()
    specials, text, run = set(self.special_tokens), '', []
    for i in (int(i) for i in ids):
      if i in skipped:
        continue
      token = self.id_to_token(i) or model.IdToPiece(i) or self.unk_token
      if token in specials:
        text, run = text + model.decode_pieces(run) + token + ' ', []
      else:
        run.append(token)
    text = (text + model.decode_pieces(run)).replace(_WORD_START, ' ').strip()
    return clean_up_tokenization(text) if self.config.get('clean_up_tokenization_spaces') else text

  def save(self, path) -> None:
    """Writes source.spm, target.spm, vocab.json (target_vocab.json with separate vocabularies) and
    tokenizer_config.json, which this class and transformers' MarianTokenizer read."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    (root / 'source.spm').write_bytes(self.source_model.serialized_model_proto())
    (root / 'target.spm').write_bytes(self.target_model.serialized_model_proto())
    vocabs = {'vocab.json': self.source_vocab}
    if self.separate_vocabs:
      vocabs['target_vocab.json'] = self.target_vocab
    for name, vocab in vocabs.items():
      text = json.dumps(vocab, indent=2, ensure_ascii=False) + '\n'
      (root / name).write_text(text, encoding='utf-8')
    self._write_config(
      root,
      tokenizer_class='MarianTokenizer',
      separate_vocabs=self.separate_vocabs,
      added_tokens_decoder=self.added_entries,
    )
