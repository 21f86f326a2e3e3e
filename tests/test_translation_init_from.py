"""``translation`` with ``init_from`` a tiny random BART or Marian saved by transformers (tokenizers trained here):
the loss falls, BLEU/ROUGE are reported, the run resumes, exports to a directory transformers decodes the same way,
and a checkpoint of the wrong family is one clear error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from train_helpers import tiny_config, tiny_fields

from train.pretrained_start import RUNTIME_FIELDS
from train.runs import export, load_run
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


def _bart_tokenizer():
  raw = RawTokenizer(models.BPE())
  raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  raw.decoder = decoders.ByteLevel()
  specials = ['<s>', '<pad>', '</s>', '<unk>', '<mask>']
  trainer = trainers.BpeTrainer(
    vocab_size=120, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
  )
  raw.train_from_iterator([s for pair in pairs(300, seed=1) for s in pair], trainer)
  raw.post_processor = processors.RobertaProcessing(('</s>', 2), ('<s>', 0))
  return transformers.BartTokenizerFast(tokenizer_object=raw)


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
  root = tmp_path_factory.mktemp('hf')
  tok = _bart_tokenizer()
  config = transformers.BartConfig(
    vocab_size=len(tok) + 3,
    d_model=24,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=3,
    decoder_attention_heads=3,
    encoder_ffn_dim=40,
    decoder_ffn_dim=40,
    max_position_embeddings=32,
  )
  torch.manual_seed(0)
  transformers.BartForConditionalGeneration(config).save_pretrained(root / 'bart')
  tok.save_pretrained(root / 'bart')
  gpt2 = transformers.GPT2Config(
    vocab_size=len(tok), n_positions=16, n_embd=12, n_layer=1, n_head=3
  )
  transformers.GPT2LMHeadModel(gpt2).save_pretrained(root / 'gpt2')
  tok.save_pretrained(root / 'gpt2')
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


@pytest.fixture(scope='module')
def bart_run(checkpoints, data_file, tmp_path_factory):
  """``(workdir, summary, held-out loss of the start)``."""
  workdir = tmp_path_factory.mktemp('bart_run')
  config = config_from(checkpoints / 'bart', data_file)
  task = build_task(config, str(tmp_path_factory.mktemp('probe')))
  _, start = load_hf(checkpoints / 'bart')
  before = evaluate(eval_step_fn(task), start, task.eval_batches(), True)['loss']
  return workdir, train_and_evaluate(config, str(workdir)), before


def test_fine_tuning_bart_lowers_the_loss_and_reports_bleu_and_rouge(bart_run):
  workdir, summary, before = bart_run
  assert summary['step'] == 60
  assert summary['eval']['loss'] < before - 1.0, (summary['eval']['loss'], before)
  for metric in ('bleu', 'rouge1', 'rouge2', 'rougeL', 'exact_match'):
    assert np.isfinite(summary['eval'][metric]), summary['eval']


def test_the_batches_frame_pairs_as_transformers_does(checkpoints, data_file, tmp_path):
  """Sources and labels are ``tokenizer(sources, text_target=targets)``; the decoder reads the labels behind its
  start token (``shift_tokens_right``)."""
  task = build_task(config_from(checkpoints / 'bart', data_file), str(tmp_path))
  tok = transformers.AutoTokenizer.from_pretrained(checkpoints / 'bart')
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
  start = transformers.BartConfig.from_pretrained(checkpoints / 'bart').decoder_start_token_id
  shifted = transformers.models.bart.modeling_bart.shift_tokens_right(
    labels, tok.pad_token_id, start
  )
  np.testing.assert_array_equal(task.val['inputs'][:4], shifted.numpy())


def test_export_decodes_like_transformers(bart_run, tmp_path):
  workdir, _, _ = bart_run
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
  assert answer == task.translate(params, ids, beam_size=2, valid=valid)[0]


def test_resume_continues_from_the_checkpoint(checkpoints, data_file, bart_run, tmp_path):
  workdir, summary, _ = bart_run
  config = config_from(checkpoints / 'bart', data_file, num_train_steps=62)
  resumed = train_and_evaluate(config, str(workdir))
  assert resumed['step'] == 62


def test_a_checkpoint_of_another_family_is_one_clear_error(checkpoints, data_file, tmp_path):
  with pytest.raises(ValueError, match="holds a 'gpt2' model .* needs a BART, Marian or T5"):
    build_task(config_from(checkpoints / 'gpt2', data_file), str(tmp_path / 'w'))
  lm = tiny_config('lm', {}, init_from=str(checkpoints / 'bart'))
  with pytest.raises(ValueError, match="holds a 'bart' model .* the lm task needs a GPT-2"):
    build_task(lm, str(tmp_path / 'w2'))
  assert not (tmp_path / 'w').exists() and not (tmp_path / 'w2').exists()
