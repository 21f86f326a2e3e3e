"""``transformer_jax.pretrained`` on the Llama family (Llama, Mistral, Qwen2) with the tokenizers their checkpoints
ship, against transformers: tiny random models saved with ``save_pretrained`` next to tokenizers trained here.

The tokenizers: a Llama 3 style byte-level BPE (``PreTrainedTokenizerFast``, which transformers runs as saved), a
Llama 2 style ``LlamaTokenizer`` (BPE with byte fallback and Metaspace, which transformers rebuilds), once as
transformers 5 saves it and once in the older file layout of the Hub's Llama 2 checkpoints (a normalizer puts the
'▁' in, which transformers replaces by its Metaspace for a Llama but runs as saved for a Mistral), and a
``Qwen2Tokenizer`` (which transformers rebuilds for any Qwen2 model, even from a file that names another class).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as RawTokenizer

from transformer_jax import pretrained
from transformer_jax.tokenizer import load_tokenizer

CORPUS = [
  'The film was a wonderful surprise, and the actors were great.',
  'Café crème and jalapeño: über good!',
  'Numbers like 3.14 and 2048 appear here, with   extra   spaces.',
  '東京 is a city; emoji 🙂 too.',
  'line one\nline two\n\n  indented line',
  'the quick brown fox jumps over the lazy dog',
] * 4
# Leading and repeated spaces, newlines, digits, composed and decomposed accents, unseen characters (bytes), and
# special tokens inside the text.
TRICKY = [
  'Hello world',
  ' leading space',
  '  two  spaces\n\nnewlines\n  indented',
  'digits 3.14159 and 2048!',
  'Café crème, 東京 🙂 and e\u0301',
  'unseen ß ∑ ☃',
  'Hi</s>there <s> x',
  'a<|begin_of_text|>b<|end_of_text|> c',
  '<|im_start|>user\nhi<|im_end|>',
  '',
]
PROMPTS = ['The film was', 'the quick brown fox jumps over the']
SHAPE = dict(
  hidden_size=48,
  num_hidden_layers=2,
  num_attention_heads=6,
  num_key_value_heads=2,
  intermediate_size=40,
  max_position_embeddings=64,
)
LLAMA3_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
  r'|\s+(?!\S)|\s+'
)
QWEN2_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
  r'|\s+(?!\S)|\s+'
)
BYTES = pre_tokenizers.ByteLevel.alphabet()


def _byte_bpe(split: str, specials: list[str], normalizer=None) -> RawTokenizer:
  """A byte-level BPE after `split`, as Llama 3 and Qwen2 have, trained on the corpus."""
  raw = RawTokenizer(models.BPE())
  raw.normalizer = normalizer
  raw.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Split(Regex(split), behavior='isolated'),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]
  )
  raw.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=300, special_tokens=specials, initial_alphabet=BYTES, show_progress=False
  )
  raw.train_from_iterator(CORPUS, trainer)
  return raw


def _vocab_and_merges(raw: RawTokenizer) -> tuple[dict, list[tuple[str, str]]]:
  model = json.loads(raw.to_str())['model']
  return model['vocab'], [tuple(m) for m in model['merges']]


def _llama3_tokenizer():
  """Llama 3's layout: byte-level BPE, a post-processor that puts <|begin_of_text|> first, no padding token."""
  bos, eos = '<|begin_of_text|>', '<|end_of_text|>'
  raw = _byte_bpe(LLAMA3_SPLIT, [bos, eos])
  template = processors.TemplateProcessing(
    single=f'{bos} $A', pair=f'{bos} $A {bos}:1 $B:1', special_tokens=[(bos, raw.token_to_id(bos))]
  )
  raw.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), template])
  return transformers.PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=bos, eos_token=eos)


def _llama2_tokenizer():
  """Llama 2's layout: <unk> <s> </s>, the 256 byte pieces, then BPE pieces over '▁'-joined words."""
  raw = RawTokenizer(models.BPE(byte_fallback=True, fuse_unk=True))
  raw.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme='first', split=False)
  raw.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, show_progress=False))
  pieces, merges = _vocab_and_merges(raw)
  vocab = {
    t: i for i, t in enumerate(['<unk>', '<s>', '</s>'] + [f'<0x{b:02X}>' for b in range(256)])
  }
  for piece in sorted(pieces, key=pieces.get):
    vocab.setdefault(piece, len(vocab))
  return transformers.LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)


def _as_on_the_hub(path) -> None:
  """Rewrites a saved LlamaTokenizer's tokenizer.json as the Hub's Llama 2 (and Mistral 7B) checkpoints have it: the
  '▁' put in by a normalizer (before each piece of text between added tokens), no pre-tokenizer, <unk> in the BPE."""
  file = path / 'tokenizer.json'
  saved = json.loads(file.read_text())
  prepend = {'type': 'Prepend', 'prepend': '▁'}
  replace = {'type': 'Replace', 'pattern': {'String': ' '}, 'content': '▁'}
  saved['normalizer'] = {'type': 'Sequence', 'normalizers': [prepend, replace]}
  saved['pre_tokenizer'] = None
  saved['model']['unk_token'] = '<unk>'
  file.write_text(json.dumps(saved, ensure_ascii=False))
  config = json.loads((path / 'tokenizer_config.json').read_text())
  config.update(
    add_bos_token=True, add_eos_token=False, legacy=False, tokenizer_class='LlamaTokenizer'
  )
  (path / 'tokenizer_config.json').write_text(json.dumps(config))


def _qwen2_tokenizer():
  raw = _byte_bpe(QWEN2_SPLIT, ['<|endoftext|>', '<|im_start|>', '<|im_end|>'], normalizers.NFC())
  vocab, merges = _vocab_and_merges(raw)
  return transformers.Qwen2Tokenizer(
    vocab=vocab, merges=merges, extra_special_tokens=['<|im_start|>', '<|im_end|>']
  )


def _gpt2_style_tokenizer():
  """A byte-level BPE with GPT-2's pre-tokenizer and no normalizer, named PreTrainedTokenizerFast: transformers still
  gives a Qwen2 model its Qwen2Tokenizer (NFC, one digit at a time)."""
  raw = RawTokenizer(models.BPE())
  raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  raw.decoder = decoders.ByteLevel()
  specials = ['<|endoftext|>', '<|im_start|>', '<|im_end|>']
  trainer = trainers.BpeTrainer(
    vocab_size=300, special_tokens=specials, initial_alphabet=BYTES, show_progress=False
  )
  raw.train_from_iterator(CORPUS, trainer)
  return transformers.PreTrainedTokenizerFast(
    tokenizer_object=raw, eos_token='<|endoftext|>', pad_token='<|endoftext|>'
  )


# name -> (tokenizer, model class, config class, more config, rewrite of the saved tokenizer, family we expect)
CASES = {
  'llama3': (_llama3_tokenizer, 'LlamaForCausalLM', 'LlamaConfig', {}, None, None),
  'llama2': (_llama2_tokenizer, 'LlamaForCausalLM', 'LlamaConfig', {}, None, 'llama'),
  'llama2_hub': (_llama2_tokenizer, 'LlamaForCausalLM', 'LlamaConfig', {}, _as_on_the_hub, 'llama'),
  # No window: saved back as a Llama, whose LlamaTokenizer would rebuild what this one runs as saved.
  'mistral': (
    _llama2_tokenizer,
    'MistralForCausalLM',
    'MistralConfig',
    dict(sliding_window=None),
    _as_on_the_hub,
    None,
  ),
  'qwen2': (_qwen2_tokenizer, 'Qwen2ForCausalLM', 'Qwen2Config', {}, None, 'qwen2'),
  'qwen2_generic': (_gpt2_style_tokenizer, 'Qwen2ForCausalLM', 'Qwen2Config', {}, None, 'qwen2'),
}


@pytest.fixture(scope='module')
def dirs(tmp_path_factory):
  """name -> a directory with a tiny random model of the case's class and its tokenizer."""
  out = {}
  for seed, (name, (make, model_cls, config_cls, more, rewrite, _)) in enumerate(CASES.items()):
    tok = make()
    config = getattr(transformers, config_cls)(
      **SHAPE,
      **more,
      vocab_size=len(tok),
      bos_token_id=tok.bos_token_id,
      eos_token_id=tok.eos_token_id,
      pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # norm weights and biases too: none stays at its init
      for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.2)
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    if rewrite:
      rewrite(path)
    out[name] = path
  return out


def _hf(path):
  return transformers.AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize('name', CASES)
def test_tokenizer_matches_autotokenizer(dirs, name):
  ours, theirs = load_tokenizer(dirs[name]), _hf(dirs[name])
  assert ours.family == CASES[name][-1]
  assert ours.vocab_size == len(theirs)
  for token in ('bos', 'eos', 'unk', 'pad'):
    assert getattr(ours, f'{token}_token') == getattr(theirs, f'{token}_token'), token
    assert getattr(ours, f'{token}_id') == getattr(theirs, f'{token}_token_id'), token
  assert ours.padding_side == theirs.padding_side
  for text in TRICKY:
    ids = theirs.encode(text)
    assert ours.encode(text) == ids, text
    assert ours.encode(text, add_special_tokens=False) == theirs.encode(
      text, add_special_tokens=False
    )
    for skip in (True, False):
      assert ours.decode(ids, skip) == theirs.decode(ids, skip_special_tokens=skip), (text, skip)
  if theirs.pad_token is None:
    theirs.pad_token = theirs.eos_token
  batch = theirs(TRICKY[:5], padding=True, padding_side='left', return_tensors='np')
  mine = ours(TRICKY[:5], padding_side='left', pad_id=theirs.pad_token_id)
  np.testing.assert_array_equal(mine['input_ids'], batch['input_ids'])
  np.testing.assert_array_equal(mine['attention_mask'], batch['attention_mask'])


def test_llama_tokenizers_put_bos_first_and_differ_where_transformers_rebuilds(dirs):
  """The Llama 2 layout adds <s> (its post-processor); its Hub file, rebuilt for a Llama, gives the text after an
  added token no '▁' (transformers' Metaspace), run as saved for a Mistral it does (the file's normalizer)."""
  for name in ('llama3', 'llama2', 'llama2_hub', 'mistral'):
    tok = load_tokenizer(dirs[name])
    assert tok.encode('Hello world')[0] == tok.bos_id
    assert tok.encode('Hello world', add_special_tokens=False)[0] != tok.bos_id
  llama, mistral = load_tokenizer(dirs['llama2_hub']), load_tokenizer(dirs['mistral'])
  assert llama.encode('Hi</s>there') != mistral.encode('Hi</s>there')


def _hf_generate(path, prompts, max_new_tokens, **options):
  """transformers' greedy continuations of a left-padded batch: the texts and the new tokens."""
  tok = _hf(path)
  tok.padding_side = 'left'
  if (
    tok.pad_token is None
  ):  # Llama checkpoints have none: pad with the end token, as our generate_text does
    tok.pad_token = tok.eos_token
  model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
  batch = tok(prompts, padding=True, return_tensors='pt')
  options.setdefault('pad_token_id', tok.pad_token_id)
  with torch.no_grad():
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, **options)
  new = out[:, batch['input_ids'].shape[1] :]
  return tok.batch_decode(out, skip_special_tokens=True), new.tolist()


@pytest.mark.parametrize('name', CASES)
def test_generate_text_greedy_matches_hf_generate(dirs, name):
  model = pretrained.load(dirs[name])
  texts, _ = _hf_generate(dirs[name], PROMPTS, 8)
  assert model.generate_text(PROMPTS, max_new_tokens=8) == texts


@pytest.mark.parametrize('name', ['llama3', 'qwen2'])
def test_generate_text_matches_the_pipeline(dirs, name):
  """Byte-level decoding: the pipeline's text (it decodes the new tokens alone) is ours."""
  pipe = transformers.pipeline('text-generation', model=str(dirs[name]), tokenizer=str(dirs[name]))
  ours = pretrained.load(dirs[name]).generate_text(PROMPTS, max_new_tokens=8)
  for prompt, text in zip(PROMPTS, ours):
    assert pipe(prompt, max_new_tokens=8, do_sample=False)[0]['generated_text'] == text


@pytest.mark.parametrize('name', ['llama2', 'qwen2'])
def test_rows_stop_at_any_end_token(dirs, name, tmp_path):
  """Rows that end early, at the one end token of config.json or at any of a list (Llama 3.1 style), as
  transformers stops them; the end tokens here are ones the model emits."""
  _, new = _hf_generate(dirs[name], PROMPTS, 8)
  first, second = new[0][2], next(t for t in new[1][1:] if t not in new[0][:3])
  for ends in (first, [first, second]):
    for file in ('config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json'):
      (tmp_path / file).write_bytes((dirs[name] / file).read_bytes())
    config = json.loads((tmp_path / 'config.json').read_text())
    (tmp_path / 'config.json').write_text(json.dumps({**config, 'eos_token_id': ends}))
    texts, stopped = _hf_generate(tmp_path, PROMPTS, 8, eos_token_id=ends)
    assert stopped[0] != new[0]  # padded after its end token
    assert pretrained.load(tmp_path).generate_text(PROMPTS, max_new_tokens=8) == texts
  with pytest.raises(ValueError, match='one end token'):
    pretrained.load(tmp_path).generate_text(PROMPTS, max_new_tokens=8, num_beams=2)


def test_without_a_pad_token_the_end_token_pads(dirs):
  """Llama checkpoints name no padding token: generate_text pads the prompts with the end token."""
  model = pretrained.load(dirs['llama2'])
  assert model.tokenizer.pad_id is None and model.hf_config.get('pad_token_id') is None
  short, long_ = model.generate_text(PROMPTS, max_new_tokens=8)
  assert [short, long_] == [model.generate_text(p, max_new_tokens=8) for p in PROMPTS]


@pytest.mark.parametrize('name', CASES)
def test_save_reloads_in_transformers_with_the_same_logits_and_ids(dirs, name, tmp_path):
  model = pretrained.load(dirs[name])
  model.save(tmp_path)
  hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  tok = _hf(tmp_path)
  for text in TRICKY:
    ids = tok.encode(text)
    assert model.tokenizer.encode(text) == ids, text
    assert tok.decode(ids, skip_special_tokens=True) == model.tokenizer.decode(ids)
  for text in PROMPTS:
    with torch.no_grad():
      expected = hf(torch.tensor([tok.encode(text)])).logits.numpy()
    np.testing.assert_allclose(model.logits([text]), expected, atol=1e-4)
  assert pretrained.load(tmp_path).generate_text(PROMPTS, max_new_tokens=8) == (
    model.generate_text(PROMPTS, max_new_tokens=8)
  )
