"""The tokenizer of a Hugging Face model directory, read with `tokenizers` alone (no transformers, no torch).

`load_tokenizer(dir)` gives the ids, attention masks and decoded text that
`transformers.AutoTokenizer.from_pretrained(dir)` gives (transformers 5). `Tokenizer.from_directory` reads
`tokenizer.json`, else a BERT `vocab.txt`, else a GPT-2 or BART `vocab.json` + `merges.txt`, else a T5
`spiece.model`, with the settings in `tokenizer_config.json`; Marian's two SentencePiece models are read by
:class:`transformer_jax.tokenizer_marian.MarianTokenizer`, which `load_tokenizer` picks for them.

ids = load_tokenizer('bert-base-uncased/')(['a text', 'another text'], padding_side='left')['input_ids']
labels = load_tokenizer('opus-mt-en-de/').for_targets()(['Ein Text'])['input_ids']   # the target side's ids
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import models

from transformer_jax.tokenizer_families import (
  FAMILY_DEFAULTS,
  FAMILY_OF_CLASS,
  PADDING_SIDE,
  SPECIAL_TOKENS,
  auto_class,
  clean_up_tokenization,
  content,
  set_up,
  t5_from_spiece,
)

# transformers stores this as the `model_max_length` of a tokenizer without a length limit.
_UNLIMITED = int(1e30)
# Config entries that name files or hold what tokenizer.json holds: `save` leaves them out.
_NOT_SAVED = {'added_tokens_decoder', 'backend', 'name_or_path', 'special_tokens_map_file'}
_NOT_SAVED |= {'merges_file', 'tokenizer_file', 'vocab_file'}
_CLEAN_UP = 'clean_up_tokenization_spaces'
_NOT_FOUND = (
  'looked for tokenizer.json, vocab.txt, vocab.json + merges.txt, spiece.model (T5), '
  'source.spm + target.spm + vocab.json (Marian); pass the directory that holds one'
)


class TokenizerError(ValueError):
  """A tokenizer directory that cannot be read; its message is one line."""


def _one_line(error: Exception) -> str:
  """The message of `error` on one line."""
  return ' '.join(str(error).split())


def _read_json(file: Path) -> dict | None:
  """The object in a JSON file, or None when there is no such file."""
  if not file.is_file():
    return None
  try:
    data = json.loads(file.read_text(encoding='utf-8'))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise TokenizerError(f'cannot read {file}: {_one_line(e)}') from e
  if not isinstance(data, dict):
    raise TokenizerError(f'cannot read {file}: expected a JSON object, got {type(data).__name__}')
  return data


def read_settings(root: Path) -> dict:
  """The tokenizer config of a directory as transformers reads it: tokenizer_config.json, special_tokens_map.json
  and as `tokenizer_class` the class AutoTokenizer picks for it and config.json's `model_type`."""
  config = _read_json(root / 'tokenizer_config.json') or {}
  # As in transformers: without `added_tokens_decoder` the legacy map is read, and wins over the config.
  if 'added_tokens_decoder' not in config:
    config.update(_read_json(root / 'special_tokens_map.json') or {})
  model_type = (_read_json(root / 'config.json') or {}).get('model_type')
  file = root / 'tokenizer.json'
  byte_level = lambda: file.is_file() and '"ByteLevel"' in file.read_text('utf-8', 'replace')
  named = auto_class(config.get('tokenizer_class'), model_type, byte_level)
  if named:
    config['tokenizer_class'] = named
  return config


def _token_id(name: str):
  """A property: the id of the `{name}_token` attribute's token."""
  return property(
    lambda self: self.token_to_id(getattr(self, f'{name}_token')),
    doc=f'The id of the {name} token, or None when there is none.',
  )


class Tokenizer:
  """A Hugging Face tokenizer (a `tokenizers.Tokenizer` plus the settings of its tokenizer_config.json).

  The `*_token` attributes are the special tokens' strings (None when absent) and may be set, e.g.
  `tok.pad_token = tok.eos_token` for GPT-2; the `*_id` attributes follow them.
  """

  pad_id, unk_id, cls_id, sep_id, mask_id, bos_id, eos_id = map(_token_id, SPECIAL_TOKENS)

  def __init__(self, backend: tokenizers.Tokenizer | None, config: dict, family=None, path=None):
    """Wraps `backend`, already set up as transformers would set it up (None for a subclass that tokenizes
    otherwise). `config` is the tokenizer config (with special_tokens_map.json and the class defaults merged in),
    `family` 'bert', 'gpt2', 'roberta', 't5', 'llama', 'qwen2' or None (tokenizer.json as saved), `path` the
    directory it came from."""
    self.backend = backend
    self.config = config
    self.family = family
    self.path = path
    for name in SPECIAL_TOKENS:
      setattr(self, f'{name}_token', content(config.get(f'{name}_token')))
    limit = config.get('model_max_length')
    self.model_max_length = None if limit is None or limit >= _UNLIMITED else int(limit)
    self.padding_side = config.get('padding_side') or 'right'
    self.truncation_side = config.get('truncation_side') or 'right'

  @classmethod
  def from_directory(cls, path) -> Tokenizer:
    """Reads the tokenizer in `path`: tokenizer.json, else vocab.txt (BERT), else vocab.json + merges.txt (GPT-2,
    or BART's RoBERTa template or Qwen2's pipeline when the class is that), else spiece.model (T5)."""
    root = Path(path)
    config = read_settings(root)
    named = config.get('tokenizer_class') or ''
    family = FAMILY_OF_CLASS.get(named.removesuffix('Fast').removesuffix('Legacy'))
    json_file, vocab_txt = root / 'tokenizer.json', root / 'vocab.txt'
    vocab_json, merges_txt, spiece = root / 'vocab.json', root / 'merges.txt', root / 'spiece.model'
    if json_file.is_file():
      read, build = json_file, lambda: tokenizers.Tokenizer.from_file(str(json_file))
      # transformers drops these when there is a tokenizer.json (its post-processor says it all).
      config = {k: v for k, v in config.items() if k not in ('add_bos_token', 'add_eos_token')}
    elif vocab_txt.is_file():
      family, read = 'bert', vocab_txt
      unk = content({**FAMILY_DEFAULTS[family], **config}['unk_token'])
      build = lambda: tokenizers.Tokenizer(models.WordPiece.from_file(str(read), unk_token=unk))
    elif vocab_json.is_file() and merges_txt.is_file():
      family = family if family in ('roberta', 'qwen2') else 'gpt2'
      read = f'{vocab_json} + merges.txt'
      build = lambda: tokenizers.Tokenizer(models.BPE.from_file(str(vocab_json), str(merges_txt)))
    elif spiece.is_file() and family == 't5':
      read = spiece
      config = {**FAMILY_DEFAULTS['t5'], **config}
      build = lambda: t5_from_spiece(spiece, config)
    else:
      raise TokenizerError(f'no tokenizer in {root}: {_NOT_FOUND}')
    try:
      backend = build()
    except Exception as e:  # the tokenizers library raises plain Exception for unreadable files
      raise TokenizerError(f'cannot read {read}: {_one_line(e)}') from e
    # The class's defaults go before tokenizer.json's padding (transformers passes them explicitly); padding and
    # truncation themselves are set per call.
    config = {**FAMILY_DEFAULTS[family], **config}
    if backend.padding:
      config.setdefault('pad_token', backend.padding['pad_token'])
      config.setdefault('padding_side', backend.padding['direction'])
    if backend.truncation:
      config.setdefault('truncation_side', backend.truncation['direction'])
    config.setdefault('padding_side', PADDING_SIDE.get(family, 'right'))
    backend.no_padding()
    backend.no_truncation()
    set_up(backend, config, family)
    return cls(backend, config, family, root)

  @property
  def vocab_size(self) -> int:
    """The number of ids, added tokens included (the rows an embedding needs)."""
    return self.backend.get_vocab_size(with_added_tokens=True)

  def token_to_id(self, token: str | None) -> int | None:
    """The id of `token`, or None when it is not in the vocabulary."""
    return None if token is None else self.backend.token_to_id(token)

  def id_to_token(self, i: int) -> str | None:
    """The token with id `i`, or None when there is none."""
    return self.backend.id_to_token(int(i))

  def _encode(self, inputs: list, add_special_tokens: bool, truncation, max_length: int | None):
    # One backend serves every call, so each call sets its own truncation (as transformers does).
    if truncation and max_length is not None:
      strategy = 'longest_first' if truncation is True else truncation
      self.backend.enable_truncation(max_length, strategy=strategy, direction=self.truncation_side)
    else:
      self.backend.no_truncation()
    return self.backend.encode_batch(inputs, add_special_tokens=add_special_tokens)

  def for_targets(self) -> Tokenizer:
    """The tokenizer of a seq2seq model's targets (transformers' `text_target=`): this one, except for Marian."""
    return self

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    """The ids of one text, without padding or truncation."""
    return self._encode([text], add_special_tokens, False, None)[0].ids

  def __call__(
    self,
    texts,
    pairs=None,
    *,
    padding='longest',
    max_length: int | None = None,
    truncation=False,
    padding_side: str | None = None,
    add_special_tokens: bool = True,
    pad_id: int | None = None,
  ) -> dict[str, np.ndarray]:
    """Tokenizes a text or a list of texts (with `pairs`: text pairs) into int32 arrays `input_ids`,
    `attention_mask` and `token_type_ids`, each (B, T), as `AutoTokenizer(..., return_tensors='np')` does.

    `padding` is 'longest' (or True), 'max_length' or False; `truncation` is False, True ('longest_first') or a
    transformers strategy name; both use `max_length`, else `model_max_length`. `pad_id` overrides the pad token.
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    inputs = texts
    if pairs is not None:
      pairs = [pairs] if isinstance(pairs, str) else list(pairs)
      if len(pairs) != len(texts):
        raise ValueError(f'{len(texts)} texts but {len(pairs)} pairs; pass one pair per text')
      inputs = list(zip(texts, pairs))
    padding = {True: 'longest', False: None, 'do_not_pad': None}.get(padding, padding)
    truncation = {False: None, 'do_not_truncate': None}.get(truncation, truncation)
    if padding not in (None, 'longest', 'max_length'):
      raise ValueError(f"padding={padding!r}; use 'longest', 'max_length' or False")
    side = padding_side or self.padding_side
    if side not in ('left', 'right'):
      raise ValueError(f"padding_side={side!r}; use 'left' or 'right'")
    limit = self.model_max_length if max_length is None else max_length
    rows = self._encode(inputs, add_special_tokens, truncation, limit)
    lengths = [len(row.ids) for row in rows]
    length = max(lengths, default=0)
    if padding == 'max_length':
      if limit is None or length > limit:
        raise ValueError(f"padding='max_length' with {limit=} and a row of {length} tokens")
      length = limit
    if padding is None and len(set(lengths)) > 1:
      raise ValueError(f'rows of {min(lengths)} to {length} tokens; pass padding=True to pad them')
    pad_id = self.pad_id if pad_id is None else pad_id
    if pad_id is None and any(n < length for n in lengths):
      where = f' in {self.path}' if self.path else ''
      raise TokenizerError(
        f'the tokenizer{where} has no padding token; set one (GPT-2 uses its eos token: '
        'tokenizer.pad_token = tokenizer.eos_token) or pass pad_id=...'
      )
    shape = (len(rows), length)
    out = {'input_ids': np.full(shape, pad_id or 0, np.int32)}
    out.update(attention_mask=np.zeros(shape, np.int32), token_type_ids=np.zeros(shape, np.int32))
    for i, (row, n) in enumerate(zip(rows, lengths)):
      at = slice(length - n, length) if side == 'left' else slice(0, n)
      out['input_ids'][i, at] = row.ids
      out['attention_mask'][i, at] = 1
      out['token_type_ids'][i, at] = row.type_ids
    return out

  def _clean_up(self, text: str) -> str:
    # transformers skips this clean-up for BPE models unless told that corrupting the text is fine.
    bpe_ok = self.config.get(f'{_CLEAN_UP}_for_bpe_even_though_it_will_corrupt_output')
    if self.config.get(_CLEAN_UP) and (bpe_ok or not isinstance(self.backend.model, models.BPE)):
      text = clean_up_tokenization(text)
    return text

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    """The text of a row of ids, as `AutoTokenizer.decode` gives it."""
    text = self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
    return self._clean_up(text)

  def batch_decode(self, rows, skip_special_tokens: bool = True) -> list[str]:
    """The texts of rows of ids (pads are special tokens, so `skip_special_tokens` drops them)."""
    return [self.decode(row, skip_special_tokens) for row in rows]

  def save(self, path) -> None:
    """Writes tokenizer.json and tokenizer_config.json into `path`, for this class and for AutoTokenizer."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    self.backend.no_truncation()
    self.backend.save(str(root / 'tokenizer.json'))
    # tokenizer.json carries the added tokens and the vocabulary; the config keeps every other setting.
    self._write_config(root)

  def _write_config(self, root: Path, **extra) -> None:
    """Writes tokenizer_config.json: the settings read, the special tokens and sides as they are now, and `extra`."""
    config = {key: value for key, value in self.config.items() if key not in _NOT_SAVED}
    # transformers 5's legacy classes read only vocabulary files; the class they stand for reads tokenizer.json.
    named = (config.get('tokenizer_class') or 'PreTrainedTokenizerFast').removesuffix('Legacy')
    config.update({f'{name}_token': getattr(self, f'{name}_token') for name in SPECIAL_TOKENS})
    config.update(tokenizer_class=named, padding_side=self.padding_side)
    config['truncation_side'] = self.truncation_side
    limit = self.model_max_length
    config['model_max_length'] = _UNLIMITED if limit is None else limit
    config.update(extra)
    text = json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + '\n'
    (root / 'tokenizer_config.json').write_text(text, encoding='utf-8')


def load_tokenizer(path) -> Tokenizer:
  """The tokenizer in a Hugging Face model directory: a :class:`~transformer_jax.tokenizer_marian.MarianTokenizer`
  when the config names that class (or names none and source.spm is there), else `Tokenizer.from_directory`."""
  root = Path(path)
  named = (read_settings(root).get('tokenizer_class') or '').removesuffix('Fast')
  if named == 'MarianTokenizer' or (not named and (root / 'source.spm').is_file()):
    # imported here: tokenizer_marian builds on this module
    from transformer_jax.tokenizer_marian import MarianTokenizer

    return MarianTokenizer.from_directory(root)
  return Tokenizer.from_directory(root)
