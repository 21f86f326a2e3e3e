"""The seq2seq families' tokenizers against `transformers.AutoTokenizer` on the same directories: Marian's two
SentencePiece models (shared and separate vocabularies), BART's byte-level BPE (tokenizer.json, and vocabulary files
named by a model config) and T5's Unigram (tokenizer.json as saved, one whose pipeline transformers rebuilds, and
spiece.model alone). Every vocabulary is trained here; sources and targets, padded and truncated batches, decoding
and saving."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import sentencepiece
from tokenizer_helpers import train_byte_bpe, train_spm
from transformers import AutoTokenizer, BartTokenizerFast, MarianTokenizer

from transformer_jax.tokenizer import TokenizerError, load_tokenizer

pytestmark = pytest.mark.filterwarnings('ignore:Recommended. pip install sacremoses')

ENGLISH = [
  'The quick brown fox jumps over the lazy dog.',
  'Café au lait, crème brûlée and a naïve résumé.',
  "It's a test, isn't it? We're sure they've done it.",
  'Numbers 1234567890, 3.14159 and 1,000,000 dollars.',
  'Emoji time 😀 🎉 and hearts.',
]
GERMAN = [
  'Über den Wolken muss die Freiheit wohl grenzenlos sein!',
  'Grüße aus München: Straße, Äpfel, Öl und Übermut.',
  'Der schnelle braune Fuchs springt über den faulen Hund.',
  'Zahlen 1234567890 und 3,14159 Euro.',
  '北京欢迎你。東京は日本の首都です。',
]
TEXTS = [
  'Hello world!',
  'Straße über Öl, CRÈME BRÛLÉE.',
  '北京 東京 서울 😀 and   several    spaces',
  "It's a much longer sentence, isn't it? It keeps going until truncation bites.",
  'x',
  '',
  ' ',
  'combining: e\u0301 u\u0308, ﬁ ligature, ＦＵＬＬ width, tab\there',
  'specials inline: </s> and <pad> and <unk>',
]
MARIAN_TEXTS = TEXTS + ['>>de<< with a language code']
T5_TEXTS = TEXTS + ['a sentinel <extra_id_3> inside']
SPECIALS = ('</s>', '<unk>', '<pad>')


def _pieces(model: bytes) -> list[str]:
  sp = sentencepiece.SentencePieceProcessor(model_proto=model)
  return [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if not sp.is_unknown(i)]


def _marian(root, separate: bool):
  """source.spm (60 pieces) and target.spm (70) with an opus-mt style vocab.json ('</s>' 0, '<unk>' 1, a
  language code, '<pad>' last), saved by transformers' MarianTokenizer."""
  source = train_spm(ENGLISH, 60, bos_id=-1, eos_id=-1)
  target = train_spm(GERMAN, 70, bos_id=-1, eos_id=-1)
  (root / 'source.spm').write_bytes(source)
  (root / 'target.spm').write_bytes(target)
  number = lambda pieces: {p: i for i, p in enumerate(dict.fromkeys(pieces))}  # noqa: E731
  shared = ['</s>', '<unk>', '>>de<<'] + sorted(set(_pieces(source)) | set(_pieces(target)))
  vocab = number(shared + ['<pad>'] if not separate else SPECIALS + tuple(_pieces(source)))
  (root / 'vocab.json').write_text(json.dumps(vocab))
  options = {}
  if separate:  # the target side numbered otherwise: reversed, specials first
    reverse = number(['</s>', '<unk>', '<pad>'] + _pieces(target)[::-1])
    (root / 'target_vocab.json').write_text(json.dumps(reverse))
    options = dict(target_vocab_file=str(root / 'target_vocab.json'), separate_vocabs=True)
  files = [str(root / name) for name in ('source.spm', 'target.spm', 'vocab.json')]
  MarianTokenizer(*files, **options).save_pretrained(root / 'saved')
  return root / 'saved'


def _bart(root):
  """A byte-level BPE with BART's special tokens, saved by BartTokenizerFast; and its vocab.json + merges.txt
  beside a model config that says BART (as facebook/bart-base's files are)."""
  vocab, merges = train_byte_bpe(ENGLISH + GERMAN, 320)
  BartTokenizerFast(vocab=vocab, merges=merges).save_pretrained(root / 'json')
  files = root / 'files'
  files.mkdir()
  (files / 'vocab.json').write_text(json.dumps(vocab))
  (files / 'merges.txt').write_text('#version: 0.2\n' + ''.join(f'{a} {b}\n' for a, b in merges))
  (files / 'config.json').write_text(json.dumps({'model_type': 'bart'}))
  return {'bart-json': root / 'json', 'bart-files': files}


def _t5(root):
  """A T5 layout spiece.model (<pad> 0, </s> 1, <unk> 2) alone; converted and saved by transformers as
  tokenizer.json; and that file given a pipeline T5Tokenizer replaces (lowercasing, whitespace splitting)."""
  spiece = root / 'spiece'
  spiece.mkdir()
  (spiece / 'spiece.model').write_bytes(
    train_spm(ENGLISH + GERMAN, 120, pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
  )
  (spiece / 'tokenizer_config.json').write_text(json.dumps({'tokenizer_class': 'T5Tokenizer'}))
  AutoTokenizer.from_pretrained(spiece).save_pretrained(root / 'json')
  shutil.copytree(root / 'json', root / 'rebuilt')
  state = json.loads((root / 'rebuilt' / 'tokenizer.json').read_text())
  state['normalizer'] = {
    'type': 'Sequence',
    'normalizers': [state['normalizer'], {'type': 'Lowercase'}],
  }
  state['pre_tokenizer'] = {'type': 'Whitespace'}
  (root / 'rebuilt' / 'tokenizer.json').write_text(json.dumps(state))
  return {'t5-spiece': spiece, 't5-json': root / 'json', 't5-rebuilt': root / 'rebuilt'}


@pytest.fixture(scope='module')
def directories(tmp_path_factory):
  root = tmp_path_factory.mktemp('seq2seq_tokenizers')
  for name in ('marian', 'marian-separate', 'bart', 't5'):
    (root / name).mkdir()
  out = {
    'marian': _marian(root / 'marian', separate=False),
    'marian-separate': _marian(root / 'marian-separate', separate=True),
  }
  return out | _bart(root / 'bart') | _t5(root / 't5')


NAMES = [
  'marian',
  'marian-separate',
  'bart-json',
  'bart-files',
  't5-spiece',
  't5-json',
  't5-rebuilt',
]


@pytest.fixture(scope='module')
def loaded(directories):
  """name -> (ours, transformers') for each directory."""
  return {
    name: (load_tokenizer(d), AutoTokenizer.from_pretrained(d)) for name, d in directories.items()
  }


def _texts(name: str) -> list[str]:
  return {'m': MARIAN_TEXTS, 't': T5_TEXTS}.get(name[0], TEXTS)


def assert_same(ours: dict, theirs) -> None:
  for key in ('input_ids', 'attention_mask'):
    np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


CALLS = {
  'longest': dict(padding=True),
  'left': dict(padding=True, padding_side='left'),
  'truncated': dict(padding=True, truncation=True, max_length=6),
  'max_length': dict(padding='max_length', truncation=True, max_length=12),
}


@pytest.mark.parametrize('call', CALLS, ids=list(CALLS))
@pytest.mark.parametrize('name', NAMES)
def test_sources_and_targets_equal_transformers(loaded, name, call):
  ours, theirs = loaded[name]
  texts, options = _texts(name), CALLS[call]
  assert_same(ours(texts, **options), theirs(texts, return_tensors='np', **options))
  targets = theirs(text_target=texts, return_tensors='np', **options)
  assert_same(ours.for_targets()(texts, **options), targets)


def test_marian_sides_differ_and_bart_t5_have_one(loaded):
  """Marian encodes targets with target.spm; the other families have one tokenizer for both."""
  ours, _ = loaded['marian']
  assert ours.for_targets().encode(GERMAN[1]) != ours.encode(GERMAN[1])
  assert all(loaded[name][0].for_targets() is loaded[name][0] for name in NAMES[2:])


@pytest.mark.parametrize('name', NAMES)
def test_decoding_equals_transformers(loaded, name):
  """Every text's source and target ids decode alike, special tokens skipped or kept, one row or a padded batch."""
  ours, theirs = loaded[name]
  texts = _texts(name)
  rows = theirs(texts)['input_ids'] + theirs(text_target=texts)['input_ids']
  for row in rows:
    for skip in (True, False):
      assert ours.decode(row, skip) == theirs.decode(row, skip_special_tokens=skip), (row, skip)
  batch = ours.for_targets()(texts, padding=True)['input_ids']
  assert ours.batch_decode(batch) == theirs.batch_decode(batch, skip_special_tokens=True)


@pytest.mark.parametrize('name', NAMES)
def test_sizes_and_special_ids_equal_transformers(loaded, name):
  ours, theirs = loaded[name]
  assert ours.vocab_size == len(theirs)
  for special in ('pad', 'eos', 'unk', 'bos'):
    assert getattr(ours, f'{special}_id') == getattr(theirs, f'{special}_token_id'), special
  assert ours.token_to_id('</s>') == theirs.convert_tokens_to_ids('</s>')


def test_marian_left_truncation(loaded):
  ours, theirs = loaded['marian']
  ours, theirs = ours.for_targets(), MarianTokenizer.from_pretrained(theirs.name_or_path)
  ours.truncation_side = theirs.truncation_side = 'left'
  options = dict(padding=True, truncation=True, max_length=5)
  assert_same(ours(TEXTS, **options), theirs(text_target=TEXTS, return_tensors='np', **options))


@pytest.mark.parametrize('name', NAMES)
def test_saved_directories_load_in_transformers_alike(loaded, tmp_path, name):
  ours, theirs = loaded[name]
  ours.save(tmp_path)
  again, texts = AutoTokenizer.from_pretrained(tmp_path), _texts(name)
  assert type(again).__name__ == type(theirs).__name__
  options = dict(padding=True, return_tensors='np')
  assert_same(again(texts, **options), theirs(texts, **options))
  assert_same(again(text_target=texts, **options), theirs(text_target=texts, **options))
  assert_same(load_tokenizer(tmp_path).for_targets()(texts), theirs(text_target=texts, **options))


# ------------------------------------------------------------------------------------------------- errors
def test_marian_without_sentencepiece_names_the_extra(directories, monkeypatch):
  monkeypatch.setitem(
    sys.modules, 'sentencepiece', None
  )  # `import sentencepiece` now raises ImportError
  with pytest.raises(TokenizerError) as error:
    load_tokenizer(directories['marian'])
  message = str(error.value)
  assert 'pip install "transformer_jax[sentencepiece]"' in message and '\n' not in message
  # T5's spiece.model is read without the package
  assert load_tokenizer(directories['t5-spiece']).encode('x') == load_tokenizer(
    directories['t5-json']
  ).encode('x')


def test_marian_files_missing_or_corrupt_are_named(directories, tmp_path):
  for source in directories['marian'].iterdir():
    if source.name != 'target.spm':
      shutil.copy(source, tmp_path / source.name)
  with pytest.raises(TokenizerError, match='target.spm missing'):
    load_tokenizer(tmp_path)
  (tmp_path / 'target.spm').write_bytes(b'not a model')
  with pytest.raises(TokenizerError) as error:
    load_tokenizer(tmp_path)
  assert str(tmp_path / 'target.spm') in str(error.value) and '\n' not in str(error.value)


def test_marian_takes_no_pairs(loaded):
  with pytest.raises(ValueError, match='no text pairs'):
    loaded['marian'][0](['a'], ['b'])
