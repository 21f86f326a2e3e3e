"""``transformer_jax.pretrained`` against the matching ``transformers.pipeline`` on tiny random checkpoints saved with
``save_pretrained``, with tokenizers trained here; the same jobs on NNX models."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import models, normalizers, pre_tokenizers, trainers

import transformer_jax.nnx as tnnx
from transformer_jax import pretrained
from transformer_jax.convert import ConversionError
from transformer_jax.nnx import train_step as nnx_train_step
from transformer_jax.tokenizer import TokenizerError

CORPUS = [
  'The film was a wonderful surprise, and the actors were great.',
  'A dull, tedious story; I left before the end.',
  'Café crème and jalapeño: über good!',
  'Numbers like 3.14 and 2048 appear here, with   extra   spaces.',
  '東京 is a city; emoji 🙂 too.',
  'the quick brown fox jumps over the lazy dog',
] * 4
LABELS = ('negative', 'neutral', 'positive')


def _bert_tokenizer():
  """transformers' BertTokenizer on a WordPiece vocabulary trained here."""
  raw = RawTokenizer(models.WordPiece(unk_token='[UNK]'))
  raw.normalizer = normalizers.BertNormalizer(lowercase=True)
  raw.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  specials = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']
  raw.train_from_iterator(
    CORPUS, trainers.WordPieceTrainer(vocab_size=150, special_tokens=specials)
  )
  return transformers.BertTokenizer(vocab=raw.get_vocab(), do_lower_case=True)


def _gpt2_tokenizer():
  """transformers' GPT2Tokenizer on a byte-level BPE trained here."""
  raw = RawTokenizer(models.BPE())
  raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  trainer = trainers.BpeTrainer(
    vocab_size=260,
    special_tokens=['<|endoftext|>'],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  raw.train_from_iterator(CORPUS, trainer)
  model = json.loads(raw.to_str())['model']
  merges = [tuple(m.split(' ')) if isinstance(m, str) else tuple(m) for m in model['merges']]
  return transformers.GPT2Tokenizer(vocab=model['vocab'], merges=merges)


def _save(tmp_path_factory, name, model, tokenizer):
  path = tmp_path_factory.mktemp(name)
  model.save_pretrained(path)
  tokenizer.save_pretrained(path)
  return path


@pytest.fixture(scope='module')
def bert_dirs(tmp_path_factory):
  """Directories of a 3-class BERT classifier, a masked LM and a bare encoder sharing one tokenizer."""
  tok = _bert_tokenizer()
  config = transformers.BertConfig(
    vocab_size=len(tok) + 3,  # more embedding rows than tokens, as published checkpoints often have
    hidden_size=12,
    num_hidden_layers=2,
    num_attention_heads=3,
    intermediate_size=20,
    max_position_embeddings=40,
    initializer_range=0.3,  # logits far enough apart that the ranking is not decided by rounding
    id2label=dict(enumerate(LABELS)),
    label2id={name: i for i, name in enumerate(LABELS)},
    pad_token_id=tok.pad_token_id,
  )
  torch.manual_seed(0)
  return {
    name: _save(tmp_path_factory, name, cls(config).eval(), tok)
    for name, cls in [
      ('classifier', transformers.BertForSequenceClassification),
      ('mlm', transformers.BertForMaskedLM),
      ('encoder', transformers.BertModel),
    ]
  }


@pytest.fixture(scope='module')
def gpt2_dir(tmp_path_factory):
  tok = _gpt2_tokenizer()
  end = tok.eos_token_id
  config = transformers.GPT2Config(
    vocab_size=len(tok) + 5,
    n_positions=48,
    n_embd=12,
    n_layer=2,
    n_head=3,
    initializer_range=0.3,
    bos_token_id=end,
    eos_token_id=end,
  )
  torch.manual_seed(1)
  return _save(tmp_path_factory, 'gpt2', transformers.GPT2LMHeadModel(config).eval(), tok)


PROMPTS = ['The film was', 'Café', 'the quick brown fox jumps over']


def test_generate_text_greedy_matches_the_pipeline(gpt2_dir):
  ours = pretrained.load(gpt2_dir).generate_text(PROMPTS, max_new_tokens=7)
  pipe = transformers.pipeline('text-generation', model=str(gpt2_dir), tokenizer=str(gpt2_dir))
  for prompt, text in zip(PROMPTS, ours):
    expected = pipe(prompt, max_new_tokens=7, do_sample=False)[0]['generated_text']
    assert text == expected


def test_generate_text_tokens_match_hf_generate(gpt2_dir):
  """The new tokens themselves (not only their text), each prompt alone in transformers."""
  gpt2 = pretrained.load(gpt2_dir)
  hf = transformers.AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
  tok = transformers.AutoTokenizer.from_pretrained(gpt2_dir)
  continuations = gpt2.generate_text(PROMPTS, max_new_tokens=6, return_full_text=False)
  for prompt, continuation in zip(PROMPTS, continuations):
    ids = tok(prompt, return_tensors='pt').input_ids
    out = hf.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id)
    assert continuation == tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_generate_text_sampling_options(gpt2_dir):
  gpt2 = pretrained.load(gpt2_dir)
  greedy = gpt2.generate_text(PROMPTS, max_new_tokens=7)
  # top_k=1 keeps only the most probable token, so sampling with it is greedy decoding.
  assert gpt2.generate_text(PROMPTS, max_new_tokens=7, temperature=0.8, top_k=1) == greedy
  key, nucleus = jax.random.key(3), dict(max_new_tokens=7, temperature=1.5, top_p=0.9)
  assert gpt2.generate_text(PROMPTS, rng=key, **nucleus) == gpt2.generate_text(
    PROMPTS, rng=key, **nucleus
  )


@pytest.mark.parametrize('early_stopping', [False, True, 'never'])
def test_generate_text_beams_match_hf_generate(gpt2_dir, early_stopping):
  """3 beams, each prompt alone in transformers (its beam search on a left-padded batch pads the positions)."""
  gpt2 = pretrained.load(gpt2_dir)
  hf = transformers.AutoModelForCausalLM.from_pretrained(gpt2_dir).eval()
  tok = transformers.AutoTokenizer.from_pretrained(gpt2_dir)
  options = dict(max_new_tokens=7, num_beams=3, early_stopping=early_stopping)
  beams = gpt2.generate_text(PROMPTS, return_full_text=False, length_penalty=2.0, **options)
  for prompt, continuation in zip(PROMPTS, beams):
    ids = tok(prompt, return_tensors='pt').input_ids
    with torch.no_grad():
      out = hf.generate(
        ids, do_sample=False, pad_token_id=tok.eos_token_id, length_penalty=2.0, **options
      )
    assert continuation == tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


TEXTS = ['a wonderful surprise', 'dull and tedious, I left before the end of it', 'café 🙂']


def test_classify_matches_the_pipeline(bert_dirs):
  bert = pretrained.load(bert_dirs['classifier'])
  assert bert.labels == LABELS
  pipe = transformers.pipeline('text-classification', model=str(bert_dirs['classifier']))
  every = bert.classify(TEXTS, top_k=None)
  for text, ours, best in zip(TEXTS, every, bert.classify(TEXTS)):
    theirs = pipe(text, top_k=None)
    assert [r['label'] for r in ours] == [r['label'] for r in theirs]
    np.testing.assert_allclose([r['score'] for r in ours], [r['score'] for r in theirs], atol=1e-5)
    assert best == ours[0]
  alone, in_batch = bert.classify(TEXTS[0]), bert.classify(TEXTS)[0]
  assert alone['label'] == in_batch['label'] and alone['score'] == pytest.approx(
    in_batch['score'], abs=1e-6
  )
  pair = pipe({'text': TEXTS[0], 'text_pair': TEXTS[1]}, top_k=None)
  ours = bert.classify([TEXTS[0]], [TEXTS[1]], top_k=None)[0]
  np.testing.assert_allclose([r['score'] for r in ours], [r['score'] for r in pair], atol=1e-5)


def test_classifier_logits_match_torch_on_a_padded_batch(bert_dirs):
  bert = pretrained.load(bert_dirs['classifier'])
  hf = transformers.AutoModelForSequenceClassification.from_pretrained(
    bert_dirs['classifier']
  ).eval()
  tok = transformers.AutoTokenizer.from_pretrained(bert_dirs['classifier'])
  with torch.no_grad():
    expected = hf(**tok(TEXTS, padding=True, return_tensors='pt')).logits.numpy()
  with jax.default_matmul_precision('highest'):
    np.testing.assert_allclose(bert.logits(TEXTS), expected, atol=1e-5)


def test_fill_mask_matches_the_pipeline(bert_dirs):
  bert = pretrained.load(bert_dirs['mlm'])
  pipe = transformers.pipeline('fill-mask', model=str(bert_dirs['mlm']))
  for text in ['the film was a [MASK] surprise', 'the [MASK] brown [MASK] jumps']:
    ours, theirs = bert.fill_mask(text, top_k=4), pipe(text, top_k=4)
    if isinstance(theirs[0], dict):
      ours, theirs = [ours], [theirs]
    assert len(ours) == len(theirs)
    for mine, hf in zip(ours, theirs):
      assert [r['token'] for r in mine] == [r['token'] for r in hf]
      assert [r['token_str'] for r in mine] == [r['token_str'] for r in hf]
      np.testing.assert_allclose([r['score'] for r in mine], [r['score'] for r in hf], atol=1e-5)
      # with several masks each sequence fills one mask and keeps the other and the special tokens
      assert [r['sequence'] for r in mine] == [r['sequence'] for r in hf]
  # every token's text, special tokens included, as the pipeline writes it (tokenizer.decode([token])); the model's
  # vocabulary is larger than the tokenizer's, so some guesses are ids no text maps to
  everything = bert.fill_mask('the film was a [MASK] surprise', top_k=10_000)
  known = range(len(pipe.tokenizer))
  assert {r['token']: r['token_str'] for r in everything if r['token'] in known} == {
    t: pipe.tokenizer.decode([t]) for t in known
  }


def test_embed_is_sentence_transformers_mean_pooling(bert_dirs):
  bert = pretrained.load(bert_dirs['encoder'])
  hf = transformers.AutoModel.from_pretrained(bert_dirs['encoder']).eval()
  tok = transformers.AutoTokenizer.from_pretrained(bert_dirs['encoder'])
  batch = tok(TEXTS, padding=True, return_tensors='pt')
  with torch.no_grad():
    hidden = hf(**batch).last_hidden_state
  mask = batch['attention_mask'][..., None].float()
  expected = ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)).numpy()
  with jax.default_matmul_precision('highest'):
    np.testing.assert_allclose(bert.embed(TEXTS), expected, atol=1e-5)
    unit = bert.embed(TEXTS, normalize=True)
  np.testing.assert_allclose(
    unit, expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=1e-5
  )
  # A classifier embeds with its encoder.
  assert pretrained.load(bert_dirs['classifier']).embed(TEXTS).shape == expected.shape


def test_save_reloads_in_transformers_with_labels_and_tokenizer(bert_dirs, tmp_path):
  bert = pretrained.load(bert_dirs['classifier'])
  bert.save(tmp_path)
  hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
  assert [hf.config.id2label[i] for i in range(3)] == list(LABELS)
  tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
  batch = tok(TEXTS, padding=True, return_tensors='pt')
  np.testing.assert_array_equal(batch['input_ids'].numpy(), bert.tokenizer(TEXTS)['input_ids'])
  with torch.no_grad():
    np.testing.assert_allclose(hf(**batch).logits.numpy(), bert.logits(TEXTS), atol=1e-5)
  assert pretrained.load(tmp_path).classify(TEXTS) == bert.classify(TEXTS)


def test_bad_checkpoints_are_refused_in_one_line(bert_dirs, gpt2_dir, tmp_path):
  bare = tmp_path / 'no_tokenizer'
  bare.mkdir()
  for name in ('config.json', 'model.safetensors'):
    shutil.copy(bert_dirs['classifier'] / name, bare / name)
  with pytest.raises(TokenizerError, match='tokenizer.json') as error:
    pretrained.load(bare)
  assert '\n' not in str(error.value)
  # The tokenizer of another model: more tokens than the embedding has rows.
  with pytest.raises(ConversionError, match='tokenizer has .* tokens but the model embeds only'):
    pretrained.load(bert_dirs['classifier'], tokenizer=gpt2_dir)
  gpt2 = pretrained.load(gpt2_dir)
  with pytest.raises(TypeError, match='classify needs a BERTForSequenceClassification'):
    gpt2.classify(['a text'])
  with pytest.raises(ValueError, match=r'needs a \[MASK\] token'):
    pretrained.load(bert_dirs['mlm']).fill_mask('no mask here')


# ----------------------------------------------------------------------------------------------------------------------
# The jobs on NNX models (transformer_jax.nnx.hf)


def test_nnx_model_of_a_job_fine_tunes_and_its_job_generates_and_saves(gpt2_dir, tmp_path):
  """A pretrained GPT-2 as an NNX model: the job's arrays (no copy), three NNX AdamW steps, then the job with the
  tuned arrays generates what the NNX model generates and saves what transformers reloads as the tuned model."""
  job = pretrained.load(gpt2_dir)
  model = tnnx.model_of(job, rngs=nnx.Rngs(dropout=0))  # dropout streams for training
  wte = model.token_embed['embedding']
  assert wte.get_value() is job.params['token_embed']['embedding']
  ids = np.asarray([job.tokenizer.encode(text)[:8] for text in CORPUS[:4]])  # (4, 8)
  optimizer = nnx_train_step.make_optimizer(model, peak_lr=1e-2, warmup_steps=1, total_steps=3)
  losses = [float(nnx_train_step.train_step(model, optimizer, {'ids': ids})) for _ in range(3)]
  assert losses[-1] < losses[0]
  tuned = tnnx.with_model(job, model)
  assert tuned.params['token_embed']['embedding'] is wte.get_value()
  tokens = tnnx.generate(
    model, np.asarray([job.tokenizer.encode('The film was')]), max_new_tokens=5, temperature=0
  )
  text = tuned.generate_text(['The film was'], max_new_tokens=5, return_full_text=False)[0]
  assert text == job.tokenizer.decode(np.asarray(tokens[0]).tolist())
  assert tuned.generate_text(['The film was'], max_new_tokens=5) != job.generate_text(
    ['The film was'], max_new_tokens=5
  )
  tuned.save(tmp_path)
  hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  with torch.no_grad():
    expected = hf(torch.tensor(ids)).logits.numpy()
  with jax.default_matmul_precision('highest'):
    np.testing.assert_allclose(model(ids), expected, atol=1e-5)


def test_nnx_jobs_of_bert_classify_as_before_and_refuse_another_architecture(bert_dirs, gpt2_dir):
  bert = pretrained.load(bert_dirs['classifier'])
  model = tnnx.model_of(bert)
  assert isinstance(model, tnnx.BERTForSequenceClassification)
  assert tnnx.with_model(bert, model).classify(TEXTS) == bert.classify(TEXTS)
  with pytest.raises(ValueError, match='the model is a GPT of another config than the BERTFor'):
    tnnx.with_model(bert, tnnx.model_of(pretrained.load(gpt2_dir)))


def test_nnx_save_hf_reloads_in_transformers(bert_dirs, tmp_path):
  model = tnnx.load_hf(bert_dirs['classifier'])
  tnnx.save_hf(model, tmp_path)
  hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
  ids = np.asarray([[2, 7, 9, 11, 3], [2, 8, 3, 0, 0]])
  valid = ids != 0
  with torch.no_grad():
    expected = hf(
      torch.tensor(ids), attention_mask=torch.tensor(valid.astype(np.int64))
    ).logits.numpy()
  with jax.default_matmul_precision('highest'):
    np.testing.assert_allclose(model(ids, valid=valid), expected, atol=1e-5)
