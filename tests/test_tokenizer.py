"""`transformer_jax.tokenizer` against `transformers.AutoTokenizer` on the same directories: BERT WordPiece and
GPT-2 byte-level BPE vocabularies trained here, saved by transformers as tokenizer.json or as vocabulary files only."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, BertTokenizer, GPT2Tokenizer
from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

from transformer_jax.tokenizer import Tokenizer, TokenizerError, load_tokenizer

CORPUS = [
  'The quick brown fox jumps over the lazy dog.',
  'Café au lait, crème brûlée and a naïve résumé.',
  'Über den Wolken muss die Freiheit wohl grenzenlos sein!',
  'Grüße aus München: Straße, Äpfel, Öl und Übermut.',
  'HELLO WORLD, SHOUTING IN UPPERCASE IS RUDE.',
  'Mixed CaSe WoRdS and CamelCaseIdentifiers everywhere.',
  'Spaces   between    words  and\ttabs\tand\nnew lines.',
  "It's a test, isn't it? We're sure they've done it; I'm not.",
  'Punctuation: (brackets) [square] {curly} <angle> "quotes" and so-on...',
  'Numbers 1234567890, 3.14159 and 1,000,000 dollars ($).',
  '北京欢迎你。我们在学习自然语言处理。',
  '東京は日本の首都です。ひらがなとカタカナ。',
  '서울은 한국의 수도입니다.',
  'Emoji time 😀 🎉 👍🏽 🚀 and ❤️ hearts.',
  'email@example.com and https://example.org/path?query=1&x=2',
  'El niño comió jalapeños en la mañana; ¿qué pasó? ¡Olé!',
  'Ça va très bien, merci. Où est la bibliothèque?',
  'Zürich, Genève and Lausanne are Swiss cities.',
  'naïve coöperation reëlection façade élève',
  'Tokenizers split text into subword units like ##ing and ##ed.',
] * 3
TEXTS = [
  'Hello world!',
  'Café über naïve résumé, CRÈME BRÛLÉE.',
  '北京 東京 서울 😀 🎉 and   several    spaces',
  "It's a much longer sentence, isn't it? It keeps going and going until truncation bites.",
  'x',
  "spaced out , like this . isn 't it ? yes !",
]
UNICODE = [
  'Ωmega ẞig 𝔘nicode ﬁligree',
  'tab\there, new\nline, no\u00a0break and zero\u200bwidth',
  'ＦＵＬＬＷＩＤＴＨ ｋａｎａ ｶﾀｶﾅ',
  'combining: e\u0301 u\u0308 vs é ü',
  '🧑\u200d🤝\u200d🧑 family 🇩🇪 flag',
]
PAIRS = [
  'first question?',
  'Zweite Frage über Größe',
  'a',
  '北京 or 東京?',
  'another one, longer than most',
  'b',
]
BERT_SPECIALS = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']
EOS = '<|endoftext|>'


@pytest.fixture(scope='module')
def wordpiece():
  """A cased WordPiece tokenizer trained on CORPUS and its lowercased copy, BERT's special tokens first."""
  tok = BackendTokenizer(models.WordPiece(unk_token='[UNK]'))
  tok.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  trainer = trainers.WordPieceTrainer(vocab_size=400, special_tokens=BERT_SPECIALS)
  tok.train_from_iterator(CORPUS + [line.lower() for line in CORPUS], trainer)
  return tok


@pytest.fixture(scope='module')
def bpe():
  """A byte-level BPE trained on CORPUS, GPT-2 style, with <|endoftext|> as id 0."""
  tok = BackendTokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=[EOS], initial_alphabet=alphabet)
  tok.train_from_iterator(CORPUS, trainer)
  return tok


def bpe_vocab_merges(bpe):
  model = json.loads(bpe.to_str())['model']
  return model['vocab'], [tuple(m.split(' ') if isinstance(m, str) else m) for m in model['merges']]


def bert_dir(root, wordpiece, files, **options):
  BertTokenizer(vocab=wordpiece.get_vocab(), **options).save_pretrained(root)
  # transformers 5 writes only tokenizer.json; the slow files are the vocabulary alone.
  if files == 'vocab.txt':
    os.remove(root / 'tokenizer.json')
    wordpiece.model.save(str(root))


def gpt2_dir(root, bpe, files, **options):
  vocab, merges = bpe_vocab_merges(bpe)
  GPT2Tokenizer(vocab=vocab, merges=merges, **options).save_pretrained(root)
  if files == 'vocab.json':
    os.remove(root / 'tokenizer.json')
    bpe.model.save(str(root))


def legacy_bert_dir(root, wordpiece):
  """The pure-Python BERT tokenizer's own files (vocab.txt), read back by that same slow tokenizer."""
  wordpiece.model.save(str(root))
  BertTokenizerLegacy(vocab_file=str(root / 'vocab.txt'), do_lower_case=True).save_pretrained(root)


def class_overrides_json_dir(root, wordpiece):
  """A cased tokenizer.json whose config names BertTokenizer without do_lower_case: transformers lowercases."""
  wordpiece.save(str(root / 'tokenizer.json'))
  (root / 'tokenizer_config.json').write_text(json.dumps({'tokenizer_class': 'BertTokenizer'}))


def generic_dir(root, backend, **config):
  """tokenizer.json as `tokenizers` wrote it, for the generic class (which runs it as it is)."""
  backend.save(str(root / 'tokenizer.json'))
  config = {
    'tokenizer_class': 'PreTrainedTokenizerFast',
    'clean_up_tokenization_spaces': True,
    **config,
  }
  (root / 'tokenizer_config.json').write_text(json.dumps(config))


def padded(backend):
  """A copy of `backend` that pads to the left with [PAD] (settings tokenizer.json keeps)."""
  copy = BackendTokenizer.from_str(backend.to_str())
  copy.enable_padding(direction='left', pad_id=0, pad_token='[PAD]', length=64)
  return copy


def model_type_dir(root, wordpiece):
  """A cased tokenizer.json with only a model config saying BERT: transformers uses BertTokenizer, lowercasing."""
  wordpiece.save(str(root / 'tokenizer.json'))
  (root / 'config.json').write_text(json.dumps({'model_type': 'bert'}))


def special_tokens_map_dir(root, wordpiece):
  """vocab.txt with the special tokens in the legacy special_tokens_map.json (as dicts, and overriding the config)."""
  wordpiece.model.save(str(root))
  config = {'tokenizer_class': 'BertTokenizer', 'do_lower_case': False, 'bos_token': '[PAD]'}
  (root / 'tokenizer_config.json').write_text(json.dumps(config))
  specials = {'bos_token': {'content': '[CLS]', 'lstrip': False}, 'eos_token': '[SEP]'}
  specials['additional_special_tokens'] = ['<ent>', '<rel>']
  (root / 'special_tokens_map.json').write_text(json.dumps(specials))


def gpt2_bos_dir(root, bpe):
  """GPT-2 vocabulary files with a config asking for bos (which transformers' save_pretrained would not write)."""
  gpt2_dir(root, bpe, 'vocab.json', pad_token=EOS)
  config = json.loads((root / 'tokenizer_config.json').read_text())
  (root / 'tokenizer_config.json').write_text(json.dumps({**config, 'add_bos_token': True}))


DIRECTORIES = {
  'bert-uncased-json': lambda r, w, b: bert_dir(r, w, 'json', do_lower_case=True),
  'bert-cased-json': lambda r, w, b: bert_dir(
    r, w, 'json', do_lower_case=False, model_max_length=16
  ),
  'bert-uncased-keep-accents-json': lambda r, w, b: bert_dir(
    r, w, 'json', do_lower_case=True, strip_accents=False
  ),
  'bert-cased-strip-accents-json': lambda r, w, b: bert_dir(
    r, w, 'json', do_lower_case=False, strip_accents=True
  ),
  'bert-no-chinese-chars-json': lambda r, w, b: bert_dir(
    r, w, 'json', tokenize_chinese_chars=False
  ),
  'bert-uncased-vocab-txt': lambda r, w, b: bert_dir(r, w, 'vocab.txt', do_lower_case=True),
  'bert-cased-vocab-txt': lambda r, w, b: bert_dir(r, w, 'vocab.txt', do_lower_case=False),
  'bert-cased-strip-accents-vocab-txt': lambda r, w, b: bert_dir(
    r, w, 'vocab.txt', do_lower_case=False, strip_accents=True
  ),
  'bert-legacy-slow-vocab-txt': lambda r, w, b: legacy_bert_dir(r, w),
  'bert-class-overrides-json': lambda r, w, b: class_overrides_json_dir(r, w),
  'gpt2-json': lambda r, w, b: gpt2_dir(r, b, 'json', pad_token=EOS, padding_side='left'),
  'gpt2-prefix-space-json': lambda r, w, b: gpt2_dir(
    r, b, 'json', pad_token=EOS, add_prefix_space=True
  ),
  'gpt2-vocab-merges': lambda r, w, b: gpt2_dir(r, b, 'vocab.json', pad_token=EOS),
  'gpt2-vocab-merges-add-bos': lambda r, w, b: gpt2_bos_dir(r, b),
  'gpt2-no-pad-json': lambda r, w, b: gpt2_dir(r, b, 'json'),
  'bert-model-type-json': lambda r, w, b: model_type_dir(r, w),
  'bert-special-tokens-map-vocab-txt': lambda r, w, b: special_tokens_map_dir(r, w),
  # transformers ignores add_eos_token next to a tokenizer.json, and the clean-up for BPE
  'generic-bpe-add-eos-json': lambda r, w, b: generic_dir(
    r, b, eos_token=EOS, pad_token=EOS, add_eos_token=True
  ),
  # padding to the left with [PAD] is baked into this tokenizer.json, and none of it into the config
  'generic-wordpiece-json': lambda r, w, b: generic_dir(r, padded(w), unk_token='[UNK]'),
}
PADDED = [name for name in DIRECTORIES if name != 'gpt2-no-pad-json']


@pytest.fixture(scope='module')
def directories(tmp_path_factory, wordpiece, bpe):
  """Every tokenizer directory of DIRECTORIES, by name."""
  out = {}
  for name, build in DIRECTORIES.items():
    out[name] = tmp_path_factory.mktemp(name)
    build(out[name], wordpiece, bpe)
  return out


@pytest.fixture(scope='module')
def loaded(directories):
  """(ours, AutoTokenizer's) for every directory, loaded once."""
  return {
    name: (load_tokenizer(d), AutoTokenizer.from_pretrained(d)) for name, d in directories.items()
  }


def assert_same(ours, theirs):
  """Our int32 arrays equal transformers' for every key it returns (ours always has all three)."""
  assert set(theirs) <= set(ours) == {'input_ids', 'attention_mask', 'token_type_ids'}
  for key in theirs:
    assert ours[key].dtype == np.int32, key
    np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


def by_name(names):
  return pytest.mark.parametrize('name', names, ids=names)


# ------------------------------------------------------------------------------------------------- the vocabulary
@by_name(list(DIRECTORIES))
def test_vocabulary_and_special_tokens_match(loaded, name):
  ours, theirs = loaded[name]
  assert ours.vocab_size == len(theirs)
  for token in ('pad', 'unk', 'cls', 'sep', 'mask', 'bos', 'eos'):
    assert getattr(ours, f'{token}_token') == getattr(theirs, f'{token}_token'), token
    assert getattr(ours, f'{token}_id') == getattr(theirs, f'{token}_token_id'), token
  assert ours.padding_side == theirs.padding_side
  limit = theirs.model_max_length
  assert ours.model_max_length == (None if limit >= int(1e30) else limit)
  tokens = theirs.convert_ids_to_tokens(range(len(theirs)))
  assert [ours.id_to_token(i) for i in range(len(theirs))] == tokens
  assert [ours.token_to_id(t) for t in tokens] == theirs.convert_tokens_to_ids(tokens)


def test_the_families_are_the_ones_expected(loaded):
  expected = {name: next((f for f in ('bert', 'gpt2') if f in name), None) for name in DIRECTORIES}
  assert {name: ours.family for name, (ours, _) in loaded.items()} == expected


@by_name(PADDED)
def test_the_configs_defaults_match(loaded, name):
  ours, theirs = loaded[name]
  expected = theirs(TEXTS, PAIRS, padding=True, truncation=True, return_tensors='np')
  assert_same(ours(TEXTS, PAIRS, truncation=True), expected)
  if ours.model_max_length is not None:
    assert expected['input_ids'].shape[1] == ours.model_max_length


# ------------------------------------------------------------------------------------------------- encoding
@by_name(PADDED)
@pytest.mark.parametrize('side', ['right', 'left'])
def test_padded_batches_match(loaded, name, side):
  ours, theirs = loaded[name]
  expected = theirs(TEXTS, padding=True, padding_side=side, return_tensors='np')
  assert_same(ours(TEXTS, padding_side=side), expected)


LIMITS = {
  'longest-truncated-to-7': dict(padding='longest', truncation=True, max_length=7),
  'max-length-truncated-to-7': dict(padding='max_length', truncation=True, max_length=7),
  'max-length-80': dict(padding='max_length', max_length=80),
}


@by_name(PADDED)
@pytest.mark.parametrize('kwargs', LIMITS.values(), ids=LIMITS.keys())
def test_truncated_and_fixed_length_batches_match(loaded, name, kwargs):
  ours, theirs = loaded[name]
  got = ours(TEXTS, **kwargs)
  assert_same(got, theirs(TEXTS, **kwargs, return_tensors='np'))
  assert got['input_ids'].shape == (len(TEXTS), kwargs['max_length'])


@by_name(PADDED)
@pytest.mark.parametrize('truncation', [False, True], ids=['whole', 'longest-first-to-20'])
def test_text_pairs_match(loaded, name, truncation):
  ours, theirs = loaded[name]
  kwargs = dict(padding=True, truncation=truncation, max_length=20 if truncation else None)
  expected = theirs(TEXTS, PAIRS, **kwargs, return_token_type_ids=True, return_tensors='np')
  assert expected['token_type_ids'].any()  # the second texts are type 1, for GPT-2 too
  assert_same(ours(TEXTS, PAIRS, **kwargs), expected)


@by_name(PADDED)
def test_without_special_tokens_matches(loaded, name):
  ours, theirs = loaded[name]
  expected = theirs(TEXTS, padding=True, add_special_tokens=False, return_tensors='np')
  assert_same(ours(TEXTS, add_special_tokens=False), expected)
  assert [ours.encode(t, add_special_tokens=False) for t in TEXTS] == [
    theirs.encode(t, add_special_tokens=False) for t in TEXTS
  ]


@by_name(list(DIRECTORIES))
def test_single_texts_match(loaded, name):
  ours, theirs = loaded[name]
  for text in TEXTS + UNICODE + ['', 'contains [MASK], <ent>, <rel> and <|endoftext|> tokens']:
    assert_same(ours(text), theirs(text, return_tensors='np'))
    assert ours.encode(text) == theirs.encode(text)


@by_name(PADDED)
def test_unicode_batches_match(loaded, name):
  ours, theirs = loaded[name]
  assert_same(ours(UNICODE), theirs(UNICODE, padding=True, return_tensors='np'))


def test_unseen_characters_are_unknown_for_bert_and_bytes_for_gpt2(loaded):
  bert = loaded['bert-cased-json'][0]
  assert bert.unk_id in bert.encode('ﬁ ẞ')
  gpt2 = loaded['gpt2-json'][0]
  assert gpt2.decode(gpt2.encode('ẞ 𝔘 🧑')) == 'ẞ 𝔘 🧑'


def test_calls_do_not_leak_settings_into_each_other(loaded):
  ours, theirs = loaded['bert-uncased-json']
  ours(TEXTS, truncation=True, max_length=4, padding_side='left')
  assert_same(ours(TEXTS), theirs(TEXTS, padding=True, return_tensors='np'))
  assert ours.encode(TEXTS[3]) == theirs.encode(TEXTS[3])


# ------------------------------------------------------------------------------------------------- decoding
@by_name(PADDED)
@pytest.mark.parametrize('skip', [True, False], ids=['skip-special', 'keep-special'])
def test_decoding_matches(loaded, name, skip):
  ours, theirs = loaded[name]
  rows = ours(TEXTS + UNICODE)['input_ids']
  expected = [theirs.decode(row, skip_special_tokens=skip) for row in rows]
  assert [ours.decode(row, skip_special_tokens=skip) for row in rows] == expected
  assert ours.batch_decode(rows, skip_special_tokens=skip) == theirs.batch_decode(
    rows, skip_special_tokens=skip
  )


@by_name(['bert-uncased-json', 'gpt2-json'])
def test_decoding_gives_the_text_back(loaded, name):
  ours, _ = loaded[name]
  text = 'hello world, it is a test.' if 'bert' in name else TEXTS[2]
  assert ours.decode(ours.encode(text)) == text


# ------------------------------------------------------------------------------------------------- saving
@by_name(list(DIRECTORIES))
def test_saved_directories_load_in_transformers_with_the_same_ids(loaded, name, tmp_path):
  ours, theirs = loaded[name]
  ours.save(tmp_path)
  saved = AutoTokenizer.from_pretrained(tmp_path)
  assert len(saved) == len(theirs) and saved.pad_token_id == theirs.pad_token_id
  for args in [(TEXTS + UNICODE,), (TEXTS, PAIRS)]:
    got, expected = saved(*args), theirs(*args)
    assert {k: got[k] for k in expected} == dict(expected)
  ids = theirs(TEXTS + UNICODE)['input_ids']
  assert saved.batch_decode(ids) == theirs.batch_decode(ids)
  assert [load_tokenizer(tmp_path).encode(t) for t in TEXTS] == [theirs.encode(t) for t in TEXTS]


def test_saved_config_records_the_settings(loaded, tmp_path):
  ours, _ = loaded['bert-cased-strip-accents-vocab-txt']
  ours.padding_side = 'left'
  try:
    ours.save(tmp_path)
  finally:
    ours.padding_side = 'right'
  config = json.loads((tmp_path / 'tokenizer_config.json').read_text())
  assert config['tokenizer_class'] == 'BertTokenizer'
  assert config['do_lower_case'] is False and config['strip_accents'] is True
  assert config['padding_side'] == 'left'
  assert config['pad_token'] == '[PAD]' and config['mask_token'] == '[MASK]'
  assert AutoTokenizer.from_pretrained(tmp_path).padding_side == 'left'


def test_a_vocabulary_without_config_saves_as_the_generic_class(wordpiece, tmp_path):
  (tmp_path / 'source').mkdir()
  wordpiece.model.save(str(tmp_path / 'source'))
  ours = load_tokenizer(tmp_path / 'source')
  ours.save(tmp_path / 'saved')
  config = json.loads((tmp_path / 'saved' / 'tokenizer_config.json').read_text())
  assert config['tokenizer_class'] == 'PreTrainedTokenizerFast' and config['do_lower_case'] is True
  theirs = AutoTokenizer.from_pretrained(tmp_path / 'saved')
  assert_same(ours(TEXTS, PAIRS), theirs(TEXTS, PAIRS, padding=True, return_tensors='np'))


def test_module_imports_neither_transformers_nor_torch():
  code = 'import sys, transformer_jax.tokenizer; print(sorted({"transformers", "torch"} & set(sys.modules)))'
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == '[]'


# ------------------------------------------------------------------------------------------------- errors
def test_an_empty_directory_names_the_files_looked_for(tmp_path):
  with pytest.raises(TokenizerError) as error:
    Tokenizer.from_directory(tmp_path)
  message = str(error.value)
  assert str(tmp_path) in message and '\n' not in message
  for file in ('tokenizer.json', 'vocab.txt', 'vocab.json + merges.txt'):
    assert file in message


@pytest.mark.parametrize(
  'file, content',
  [
    ('tokenizer.json', '{"version": "1.0", "model": {'),
    ('tokenizer.json', '{"version": "1.0", "model": {"type": "Nonsense"}}'),
    ('tokenizer_config.json', '{"tokenizer_class": '),
    ('tokenizer_config.json', '["not", "an", "object"]'),
  ],
  ids=['truncated-tokenizer-json', 'unknown-model', 'truncated-config', 'config-not-an-object'],
)
def test_corrupt_files_are_named(directories, tmp_path, file, content):
  for source in directories['bert-uncased-json'].iterdir():
    (tmp_path / source.name).write_bytes(source.read_bytes())
  (tmp_path / file).write_text(content)
  with pytest.raises(TokenizerError) as error:
    load_tokenizer(tmp_path)
  assert str(tmp_path / file) in str(error.value) and '\n' not in str(error.value)


def test_padding_gpt2_without_a_pad_token_says_how_to_set_one(loaded):
  ours, theirs = loaded['gpt2-no-pad-json']
  assert ours.pad_id is None
  with pytest.raises(
    TokenizerError, match='has no padding token; set one .GPT-2 uses its eos token'
  ):
    ours(TEXTS)
  with pytest.raises(ValueError):  # transformers refuses too
    theirs(TEXTS, padding=True)
  theirs.pad_token = theirs.eos_token
  try:
    expected = theirs(TEXTS, padding=True, return_tensors='np')
  finally:
    theirs.pad_token = None
  assert_same(ours(TEXTS, pad_id=ours.eos_id), expected)
  ours.pad_token = ours.eos_token
  try:
    assert_same(ours(TEXTS), expected)
  finally:
    ours.pad_token = None


def test_rows_of_different_lengths_need_padding(loaded):
  ours, _ = loaded['bert-uncased-json']
  with pytest.raises(ValueError, match='pass padding=True'):
    ours(TEXTS, padding=False)
  assert ours(TEXTS[:1], padding=False)['input_ids'].shape == (1, len(ours.encode(TEXTS[0])))
  with pytest.raises(ValueError, match='max_length'):
    ours(TEXTS, padding='max_length', max_length=4)
