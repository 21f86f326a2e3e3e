"""``translation`` with ``init_from`` a tiny random BART, Marian or T5 saved by transformers (tokenizers trained
here): the loss falls, BLEU/ROUGE are reported, the batches are framed as transformers frames them, the run resumes
and exports to a directory transformers decodes the same way, and a checkpoint of the wrong family is one clear
error."""

from __future__ import annotations

import json

import numpy as np
import pytest
import sentencepiece
import torch
import transformers
from tokenizer_helpers import train_byte_bpe, train_spm
from train_helpers import tiny_config, tiny_fields

from train.pretrained_start import RUNTIME_FIELDS
from train.runs import export, export_adapter, load_run
from train.sample import respond
from train.steps import eval_step_fn, evaluate
from train.tasks import build_task
from train.trainer import train_and_evaluate
from transformer_jax.convert import load_hf

WORDS = ['red', 'green', 'blue', 'cat', 'dog', 'bird', 'runs', 'sleeps', 'sings', 'now', 'here']


def pairs(count: int, seed: int = 0) -> list[tuple[str, str]]:
  """Three or four words, and the same words in reverse order: learnable in a few steps."""
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(count):
    words = list(rng.choice(WORDS, size=int(rng.integers(3, 5))))
    rows.append((' '.join(words), ' '.join(reversed(words))))
  return rows


def _lines() -> list[str]:
  return [s for pair in pairs(300, seed=1) for s in pair]


def _bart_tokenizer(root):
  vocab, merges = train_byte_bpe(_lines(), 120)
  return transformers.BartTokenizerFast(vocab=vocab, merges=merges)


def _marian_tokenizer(root):
  """One SentencePiece model for both sides, in an opus-mt style vocab.json ('</s>' 0, '<unk>' 1, '<pad>' last)."""
  model = train_spm(_lines(), 40, bos_id=-1, eos_id=-1)
  for name in ('source.spm', 'target.spm'):
    (root / name).write_bytes(model)
  processor = sentencepiece.SentencePieceProcessor(model_proto=model)
  pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
  vocab = ['</s>', '<unk>'] + [p for p in pieces if p not in ('<unk>', '<s>', '</s>')] + ['<pad>']
  (root / 'vocab.json').write_text(json.dumps({p: i for i, p in enumerate(vocab)}))
  files = (str(root / f) for f in ('source.spm', 'target.spm', 'vocab.json'))
  return transformers.MarianTokenizer(*files)


def _t5_tokenizer(root):
  """T5's layout: <pad> 0, </s> 1, <unk> 2 and the sentinels, converted by transformers from spiece.model."""
  spiece = train_spm(_lines(), 40, pad_id=0, eos_id=1, unk_id=2, bos_id=-1)
  (root / 'spiece.model').write_bytes(spiece)
  (root / 'tokenizer_config.json').write_text(json.dumps({'tokenizer_class': 'T5Tokenizer'}))
  return transformers.AutoTokenizer.from_pretrained(root)


SHAPE = dict(
  d_model=24,
  encoder_layers=2,
  decoder_layers=2,
  encoder_attention_heads=3,
  decoder_attention_heads=3,
  encoder_ffn_dim=40,
  decoder_ffn_dim=40,
  max_position_embeddings=32,
)


def _model(family: str, vocab: int):
  if family == 'bart':
    return transformers.BartForConditionalGeneration(
      transformers.BartConfig(vocab_size=vocab, **SHAPE)
    )
  if family == 'marian':
    ids = dict(pad_token_id=vocab - 1, decoder_start_token_id=vocab - 1, eos_token_id=0)
    # swish: what published Marian checkpoints use
    config = transformers.MarianConfig(
      vocab_size=vocab, activation_function='swish', **ids, **SHAPE
    )
    return transformers.MarianMTModel(config)
  config = transformers.T5Config(
    vocab_size=vocab,
    d_model=24,
    d_kv=8,
    num_heads=3,
    d_ff=40,
    num_layers=2,
    num_decoder_layers=2,
    feed_forward_proj='gated-gelu',
    decoder_start_token_id=0,
  )
  return transformers.T5ForConditionalGeneration(config)


FAMILIES = {'bart': _bart_tokenizer, 'marian': _marian_tokenizer, 't5': _t5_tokenizer}


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
  """A tiny random model of each family with its tokenizer, and a GPT-2 (a family translation does not take)."""
  root = tmp_path_factory.mktemp('hf')
  for family, make_tokenizer in FAMILIES.items():
    (root / family).mkdir()
    tok = make_tokenizer(root / family)
    torch.manual_seed(0)
    # spare embedding rows, as published checkpoints often have; Marian's tokenizer cannot decode them
    spare = 0 if family == 'marian' else 3
    _model(family, len(tok) + spare).save_pretrained(root / family)
    tok.save_pretrained(root / family)
  gpt2 = transformers.GPT2Config(vocab_size=200, n_positions=16, n_embd=12, n_layer=1, n_head=3)
  transformers.GPT2LMHeadModel(gpt2).save_pretrained(root / 'gpt2')
  _bart_tokenizer(None).save_pretrained(root / 'gpt2')
  return root


@pytest.fixture(scope='module')
def data_file(tmp_path_factory):
  path = tmp_path_factory.mktemp('data') / 'pairs.tsv'
  path.write_text(''.join(f'{s}\t{t}\n' for s, t in pairs(240)))
  return path


def config_from(init_from, data_file, **overrides):
  fields = {
    k: v
    for k, v in tiny_fields('translation').items()
    if not k.startswith('model.') or k.split('.')[1] in RUNTIME_FIELDS
  }
  settings = {
    'data.path': str(data_file),
    'data.src_len': 10,
    'data.tgt_len': 10,
    'data.bleu_examples': 16,
    'num_train_steps': 60,
    'eval_every_steps': 60,
    'checkpoint_every_steps': 30,
    'batch_size': 16,
    'eval_batches': 0,
    'learning_rate': 1e-2,
    'warmup_steps': 5,
    **overrides,
  }
  return tiny_config('translation', fields, init_from=str(init_from), **settings)


@pytest.fixture(scope='module', params=list(FAMILIES))
def run(request, checkpoints, data_file, tmp_path_factory):
  """``(family, workdir, summary, held-out loss of the start)`` of a 60-step fine-tuning run."""
  family = request.param
  workdir = tmp_path_factory.mktemp(f'{family}_run')
  config = config_from(checkpoints / family, data_file)
  task = build_task(config, str(tmp_path_factory.mktemp('probe')))
  _, start = load_hf(checkpoints / family)
  before = evaluate(eval_step_fn(task), start, task.eval_batches(), True)['loss']
  return family, workdir, train_and_evaluate(config, str(workdir)), before


def test_fine_tuning_lowers_the_loss_and_reports_bleu_and_rouge(run):
  _, _, summary, before = run
  assert summary['step'] == 60
  assert summary['eval']['loss'] < before - 1.0, (summary['eval']['loss'], before)
  for metric in ('bleu', 'rouge1', 'rouge2', 'rougeL', 'exact_match'):
    assert np.isfinite(summary['eval'][metric]), summary['eval']


@pytest.mark.parametrize('family', list(FAMILIES))
def test_the_batches_frame_pairs_as_transformers_does(checkpoints, data_file, tmp_path, family):
  """Sources and labels are ``tokenizer(sources, text_target=targets)``; the decoder reads the labels behind its
  start token (``shift_tokens_right``)."""
  task = build_task(config_from(checkpoints / family, data_file), str(tmp_path))
  tok = transformers.AutoTokenizer.from_pretrained(checkpoints / family)
  sources, targets = zip(*task.val_pairs[:4])
  framed = tok(
    list(sources),
    text_target=list(targets),
    padding='max_length',
    max_length=10,
    truncation=True,
    return_tensors='pt',
  )
  np.testing.assert_array_equal(task.val['sources'][:4], framed['input_ids'].numpy())
  labels = framed['labels']
  np.testing.assert_array_equal(task.val['targets'][:4], labels.numpy())
  start = transformers.AutoConfig.from_pretrained(checkpoints / family).decoder_start_token_id
  shifted = transformers.models.bart.modeling_bart.shift_tokens_right(
    labels, tok.pad_token_id, start
  )
  np.testing.assert_array_equal(task.val['inputs'][:4], shifted.numpy())


def test_export_decodes_like_transformers(run, tmp_path):
  _, workdir, _, _ = run
  assert export(str(workdir), str(tmp_path)) == 'AutoModelForSeq2SeqLM'
  hf_model = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
  tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
  task, params = load_run(str(workdir))
  texts = ['red cat runs now', 'blue bird sings']
  batch = tok(texts, padding=True, return_tensors='pt')
  with torch.no_grad():
    out = hf_model.generate(**batch, max_new_tokens=10, num_beams=1, do_sample=False)
  theirs = tok.batch_decode(out, skip_special_tokens=True)
  ids, valid = task.encode_sources(texts)
  assert task.translate(params, ids, valid=valid) == theirs
  answer = respond(task, params, 'green dog sleeps here', None, beam_size=2)
  ids, valid = task.encode_sources(['green dog sleeps here'])
  expected = task.translate(params, ids, beam_size=2, valid=valid)[0]
  assert answer['output'] == answer['translation'] == expected


def test_resume_continues_from_the_checkpoint(checkpoints, data_file, run):
  family, workdir, _, _ = run
  config = config_from(checkpoints / family, data_file, num_train_steps=62)
  resumed = train_and_evaluate(config, str(workdir))
  # restored at step 60, then two steps trained (a fresh start would train 62)
  assert resumed['step'] == 62
  assert resumed['train_tokens'] == 2 * config.batch_size * config.data.tgt_len


def test_a_checkpoint_of_another_family_is_one_clear_error(checkpoints, data_file, tmp_path):
  with pytest.raises(ValueError, match="holds a 'gpt2' model .* needs a BART, Marian or T5"):
    build_task(config_from(checkpoints / 'gpt2', data_file), str(tmp_path / 'w'))
  lm = tiny_config('lm', {}, init_from=str(checkpoints / 'bart'))
  with pytest.raises(
    ValueError, match="holds a 'bart' model .* the lm task needs a decoder-only checkpoint"
  ):
    build_task(lm, str(tmp_path / 'w2'))
  assert not (tmp_path / 'w').exists() and not (tmp_path / 'w2').exists()


@pytest.mark.parametrize('family', ['bart', 't5'])
def test_lora_fine_tuning_exports_an_adapter_peft_loads(checkpoints, data_file, tmp_path, family):
  """Adapters on the encoder's, the decoder's and the cross-attention's projections and on the FFN output; peft's
  model on the transformers base gives our logits on a validation batch."""
  peft = pytest.importorskip('peft')
  lora = {'lora.rank': 3, 'lora.targets': 'query|value|fc_out'}
  steps = dict(num_train_steps=6, eval_every_steps=6, checkpoint_every_steps=6)
  train_and_evaluate(config_from(checkpoints / family, data_file, **steps, **lora), str(tmp_path))
  export_adapter(str(tmp_path), str(tmp_path / 'adapter'))
  base = transformers.AutoModelForSeq2SeqLM.from_pretrained(checkpoints / family)
  hf_model = peft.PeftModel.from_pretrained(base, tmp_path / 'adapter').eval()
  task, params = load_run(str(tmp_path))
  batch = {k: v[:4] for k, v in task.val.items()}
  ours = np.asarray(task.logits(params, batch, deterministic=True))
  names = dict(sources='input_ids', inputs='decoder_input_ids')
  names.update(source_valid='attention_mask', input_valid='decoder_attention_mask')
  with torch.no_grad():
    theirs = hf_model(**{names[k]: torch.tensor(np.asarray(batch[k])) for k in names if k in batch})
  real = np.asarray(batch['weights']) > 0
  np.testing.assert_allclose(ours[real], theirs.logits.numpy()[real], atol=1e-5)
