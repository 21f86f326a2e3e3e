"""``init_from``: training from tiny random Hugging Face checkpoints (saved with ``save_pretrained``, tokenizers
trained here), per-pattern learning rates, resume, ``train.export`` back to ``transformers``, and every bad start
ending in one message with nothing written."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers
from train_helpers import tiny_config, tiny_fields

from train.metrics import read_metrics
from train.pretrained_start import RUNTIME_FIELDS
from train.runs import export, load_run
from train.sample import respond
from train.steps import eval_step_fn, evaluate
from train.tasks import build_task
from train.trainer import train_and_evaluate
from transformer_jax.convert import load_hf
from transformer_jax.convert.engine import to_loop_layout

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBJECTS = ['the film', 'this book', 'our trip', 'the food', 'that song']
GOOD, BAD = ['good', 'great', 'lovely', 'fine'], ['bad', 'awful', 'dull', 'poor']


def reviews(count: int, seed: int = 0) -> list[tuple[str, str]]:
  """Texts whose label is decided by one word: 'upbeat' with a good word, 'gloomy' with a bad one."""
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(count):
    upbeat = bool(rng.integers(2))
    word = rng.choice(GOOD if upbeat else BAD)
    rows.append((f'{rng.choice(SUBJECTS)} was {word} today', 'upbeat' if upbeat else 'gloomy'))
  return rows


def corpus() -> str:
  return '\n'.join(text for text, _ in reviews(400, seed=1)) + '\n'


def _bert_tokenizer():
  raw = RawTokenizer(models.WordPiece(unk_token='[UNK]'))
  raw.normalizer = normalizers.BertNormalizer(lowercase=True)
  raw.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  raw.decoder = decoders.WordPiece()
  specials = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']
  raw.train_from_iterator(
    corpus().splitlines(), trainers.WordPieceTrainer(vocab_size=90, special_tokens=specials)
  )
  tokens = dict(unk_token='[UNK]', pad_token='[PAD]', cls_token='[CLS]', sep_token='[SEP]')
  return transformers.BertTokenizerFast(tokenizer_object=raw, mask_token='[MASK]', **tokens)


def _gpt2_tokenizer():
  raw = RawTokenizer(models.BPE())
  raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  raw.decoder = decoders.ByteLevel()
  end = '<|endoftext|>'
  trainer = trainers.BpeTrainer(
    vocab_size=300, special_tokens=[end], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
  )
  raw.train_from_iterator(corpus().splitlines(), trainer)
  return transformers.PreTrainedTokenizerFast(
    tokenizer_object=raw, bos_token=end, eos_token=end, unk_token=end
  )


def bert_config(tok, **overrides):
  return transformers.BertConfig(
    **{
      'vocab_size': len(tok)
      + 3,  # more embedding rows than tokens, as published checkpoints often have
      'hidden_size': 12,
      'num_hidden_layers': 2,
      'num_attention_heads': 3,
      'intermediate_size': 20,
      'max_position_embeddings': 40,
      'pad_token_id': tok.pad_token_id,
      **overrides,
    }
  )


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
  """Hugging Face directories: BERT as a classifier, a masked LM and a bare encoder (one tokenizer), and GPT-2."""
  torch.manual_seed(0)
  root = tmp_path_factory.mktemp('hf')
  bert, gpt2 = _bert_tokenizer(), _gpt2_tokenizer()
  end = gpt2.eos_token_id
  made = {
    'classifier': (transformers.BertForSequenceClassification(bert_config(bert)), bert),
    'mlm': (transformers.BertForMaskedLM(bert_config(bert)), bert),
    'encoder': (transformers.BertModel(bert_config(bert)), bert),
    'labelled': (
      transformers.BertForSequenceClassification(
        bert_config(bert, id2label={0: 'upbeat', 1: 'gloomy'}, label2id={'upbeat': 0, 'gloomy': 1})
      ),
      bert,
    ),
    'gpt2': (
      transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
          vocab_size=len(gpt2) + 4,
          n_positions=40,
          n_embd=12,
          n_layer=2,
          n_head=3,
          bos_token_id=end,
          eos_token_id=end,
        )
      ),
      gpt2,
    ),
  }
  for name, (model, tok) in made.items():
    model.save_pretrained(root / name)
    tok.save_pretrained(root / name)
  return root


@pytest.fixture(scope='module')
def data_files(tmp_path_factory):
  root = tmp_path_factory.mktemp('data')
  (root / 'reviews.csv').write_text(''.join(f'{t},{label}\n' for t, label in reviews(160)))
  (root / 'corpus.txt').write_text(corpus())
  return root


def config_from(task: str, init_from, **overrides):
  """The tiny run settings of ``task`` with ``init_from``: the model's size is the checkpoint's, so only the
  runtime fields of the tiny model are kept."""
  fields = {
    k: v
    for k, v in tiny_fields(task).items()
    if not k.startswith('model.') or k.split('.')[1] in RUNTIME_FIELDS
  }
  return tiny_config(task, fields, init_from=str(init_from), **overrides)


def hf_inputs(directory, texts):
  tok = transformers.AutoTokenizer.from_pretrained(directory)
  tok.pad_token = tok.pad_token or tok.eos_token  # GPT-2 pads with its end token
  batch = tok(texts, padding=True)
  return np.array(batch['input_ids']), np.array(batch['attention_mask'])


def max_logit_difference(model, params, hf_model, ids, mask) -> float:
  with torch.no_grad():
    theirs = hf_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
  ours = jax.jit(lambda p, i, v: model.apply({'params': p}, i, valid=v))(params, ids, mask > 0)
  real = mask.astype(bool) if theirs.ndim == 3 else slice(None)  # padded positions predict nothing
  return float(np.abs(np.asarray(ours)[real] - theirs.numpy()[real]).max())


def run_cli(*argv) -> subprocess.CompletedProcess:
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  return subprocess.run(
    [sys.executable, '-m', *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
  )


def test_classify_fine_tunes_exports_and_reloads_in_transformers(checkpoints, data_files, tmp_path):
  """A new head for the data's string labels, trained at its own learning rate with layer 0 frozen; the export
  loads in transformers' AutoModel and pipeline with the same logits and label names."""
  workdir, out = tmp_path / 'run', tmp_path / 'hf'
  config = config_from(
    'classify',
    checkpoints / 'classifier',
    num_train_steps=40,
    eval_every_steps=40,
    checkpoint_every_steps=40,
    batch_size=16,
    eval_batches=0,
    learning_rate=2e-2,
    param_lr='classifier=5e-2,bert/encoder/layers_0=0',
    **{'data.path': str(data_files / 'reviews.csv'), 'data.seq_len': 12},
  )
  summary = train_and_evaluate(config, str(workdir))
  assert summary['eval']['accuracy'] >= 0.9, summary['eval']
  _, start = load_hf(checkpoints / 'classifier')
  trained = summary['state'].params['bert']['encoder']
  for frozen, original in zip(
    jax.tree.leaves(trained['layers_0']), jax.tree.leaves(start['bert']['encoder']['layers_0'])
  ):
    np.testing.assert_array_equal(frozen, original)
  assert not np.allclose(
    trained['layers_1']['ffn']['fc_in']['kernel'],
    start['bert']['encoder']['layers_1']['ffn']['fc_in']['kernel'],
  )

  assert export(str(workdir), str(out)) == 'AutoModelForSequenceClassification'
  hf_model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
  assert hf_model.config.id2label == {0: 'gloomy', 1: 'upbeat'}
  texts = ['the film was lovely today', 'our trip was awful', 'this book was poor and dull today']
  ids, mask = hf_inputs(out, texts)
  task, params = load_run(str(workdir))
  assert max_logit_difference(task.model, params, hf_model, ids, mask) < 1e-4
  ours = [
    task.labels.name(int(i)) for i in task.predict(params, task.encode_texts(texts)).argmax(-1)
  ]
  pipe = transformers.pipeline('text-classification', model=str(out))
  assert [r['label'] for r in pipe(texts)] == ours == ['upbeat', 'gloomy', 'gloomy']

  answer = respond(task, params, 'that song was great today', jax.random.PRNGKey(0))
  assert answer['output'] == answer['label'] == 'upbeat'
  assert list(answer['probabilities']) == ['gloomy', 'upbeat']
  assert answer['probabilities']['upbeat'] > 0.5


def test_lm_fine_tunes_gpt2_and_exports(checkpoints, data_files, tmp_path):
  workdir, out = tmp_path / 'run', tmp_path / 'hf'
  config = config_from(
    'lm',
    checkpoints / 'gpt2',
    num_train_steps=30,
    eval_every_steps=30,
    checkpoint_every_steps=30,
    eval_batches=0,
    **{'data.path': str(data_files / 'corpus.txt')},
  )
  task = build_task(config, str(tmp_path / 'probe'))
  _, start = load_hf(checkpoints / 'gpt2')
  before = evaluate(jax.jit(eval_step_fn(task)), start, task.eval_batches(), True)['loss']
  summary = train_and_evaluate(config, str(workdir))
  assert summary['eval']['loss'] < before - 1.0, (summary['eval']['loss'], before)

  assert export(str(workdir), str(out)) == 'AutoModelForCausalLM'
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  ids, mask = hf_inputs(out, ['the film was good', 'our trip was dull today'])
  task, params = load_run(str(workdir))
  assert max_logit_difference(task.model, params, hf_model, ids, mask) < 1e-4
  assert task.continue_text(params, 'the food', jax.random.PRNGKey(0)).startswith('the food')


@pytest.fixture(scope='module')
def mlm_run(checkpoints, data_files, tmp_path_factory):
  """A finished 6-step continued pretraining of the masked LM: ``(workdir, summary)``."""
  workdir = tmp_path_factory.mktemp('mlm_run')
  config = config_from(
    'mlm', checkpoints / 'mlm', num_train_steps=6, **{'data.path': str(data_files / 'corpus.txt')}
  )
  return workdir, train_and_evaluate(config, str(workdir))


def test_mlm_continues_pretraining_and_exports_a_masked_lm(mlm_run, tmp_path):
  (workdir, summary), out = mlm_run, tmp_path / 'hf'
  assert summary['step'] == 6 and np.isfinite(summary['eval']['loss'])
  assert export(str(workdir), str(out)) == 'AutoModelForMaskedLM'
  hf_model = transformers.AutoModelForMaskedLM.from_pretrained(out).eval()
  ids, mask = hf_inputs(out, ['the film was [MASK] today', 'our [MASK] was dull'])
  task, params = load_run(str(workdir))
  assert max_logit_difference(task.model, params, hf_model, ids, mask) < 1e-4


@pytest.mark.parametrize(
  'task, source, overrides, new',
  [
    ('mlm', 'mlm', {}, []),
    ('mlm', 'encoder', {}, ['mlm_bias', 'mlm_dense', 'mlm_norm']),  # no MLM head: a fresh one
    ('mlm', 'classifier', {}, ['mlm_bias', 'mlm_dense', 'mlm_norm']),
    ('classify', 'mlm', {}, ['bert/pooler', 'classifier']),  # a masked LM has no pooler
    ('classify', 'encoder', {}, ['classifier']),
    # its labels are LABEL_0 and LABEL_1, not the data's: a new head
    ('classify', 'classifier', {}, ['classifier']),
    ('classify', 'labelled', {}, []),  # its labels are the data's: the head is kept, in its order
    ('lm', 'gpt2', {'model.scan_layers': True}, []),
  ],
)
def test_the_start_takes_every_weight_the_checkpoint_has(
  task, source, overrides, new, checkpoints, data_files, tmp_path
):
  data = 'reviews.csv' if task == 'classify' else 'corpus.txt'
  config = config_from(
    task, checkpoints / source, **{'data.path': str(data_files / data)}, **overrides
  )
  built = build_task(config, str(tmp_path))
  fresh = built.init_params(jax.random.PRNGKey(0))
  flat = lambda tree: traverse_util.flatten_dict(to_loop_layout(tree), sep='/')  # noqa: E731
  _, loaded = load_hf(checkpoints / source)
  checkpoint = flat(loaded if 'bert' in loaded or task == 'lm' else {'bert': loaded})
  started = set()
  for name, value in flat(built.start_params(fresh)).items():
    expected = checkpoint.get(name)
    if expected is None or name.split('/')[0] in built.pretrained.new:
      started.add(name.rsplit('/', 1)[0])
      expected = flat(fresh)[name]
    np.testing.assert_array_equal(value, expected, err_msg=name)
  assert sorted(started) == new
  if source == 'labelled':
    assert built.labels.names == ['upbeat', 'gloomy']


def test_a_workdir_is_a_start_too(checkpoints, data_files, mlm_run, tmp_path):
  """A classifier fine-tuned from a continued-pretraining run: it starts from the run's newest params and its
  tokenizer, with a new head; a BERT workdir cannot start an lm run."""
  corpus, labelled = str(data_files / 'corpus.txt'), str(data_files / 'reviews.csv')
  workdir, summary = mlm_run
  trained = summary['state'].params
  config = config_from('classify', workdir, **{'data.path': labelled})
  built = build_task(config, str(tmp_path / 'classify'))
  fresh = built.init_params(jax.random.PRNGKey(0))
  started = built.start_params(fresh)
  pairs = [(started['bert']['encoder'], trained['bert']['encoder'])]
  pairs += [(started['classifier'], fresh['classifier'])]  # a masked LM has no classifier to give
  _, original = load_hf(checkpoints / 'mlm')
  kernel = lambda params: params['bert']['encoder']['layers_0']['ffn']['fc_in']['kernel']  # noqa: E731
  assert not np.allclose(
    kernel(trained), kernel(original)
  )  # the run's weights, not the checkpoint it began from
  for ours, expected in pairs:
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(expected)):
      np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match='needs a decoder-only checkpoint'):
    build_task(config_from('lm', workdir, **{'data.path': corpus}), str(tmp_path / 'lm'))
  assert not (tmp_path / 'lm').exists()


def losses(workdir) -> list[float]:
  return [r['loss'] for r in read_metrics(str(workdir)) if r['split'] == 'train']


def test_resume_restores_the_checkpoint_without_reading_init_from(
  checkpoints, data_files, tmp_path
):
  source = tmp_path / 'gpt2'
  shutil.copytree(checkpoints / 'gpt2', source)
  fields = {'data.path': str(data_files / 'corpus.txt'), 'model.dropout_rate': 0.1}
  config = lambda steps: config_from(  # noqa: E731
    'lm', source, num_train_steps=steps, decay_steps=8, checkpoint_every_steps=2, **fields
  )
  straight = train_and_evaluate(config(8), str(tmp_path / 'straight'))
  assert train_and_evaluate(config(4), str(tmp_path / 'resumed'))['step'] == 4
  shutil.rmtree(source)  # a resume needs the workdir alone
  resumed = train_and_evaluate(config(8), str(tmp_path / 'resumed'))
  assert resumed['step'] == 8 and losses(tmp_path / 'straight') == losses(tmp_path / 'resumed')
  for a, b in zip(
    jax.tree.leaves(straight['state'].params), jax.tree.leaves(resumed['state'].params)
  ):
    np.testing.assert_array_equal(a, b)
  assert sorted(os.listdir(tmp_path / 'resumed')) == [
    'checkpoints',
    'config.json',
    'data',
    'init_from.json',
    'metrics.jsonl',
    'tensorboard',
    'tokenizer',
  ]


def _without_tokenizer(checkpoints, tmp_path):
  path = tmp_path / 'bare'
  shutil.copytree(checkpoints / 'classifier', path)
  for name in ('tokenizer.json', 'tokenizer_config.json'):
    (path / name).unlink()
  return path


def _small_embedding(checkpoints, tmp_path):
  """A BERT with fewer embedding rows than its tokenizer has tokens."""
  tok = transformers.AutoTokenizer.from_pretrained(checkpoints / 'classifier')
  path = tmp_path / 'small'
  transformers.BertModel(bert_config(tok, vocab_size=len(tok) - 10)).save_pretrained(path)
  tok.save_pretrained(path)
  return path


def _one_class(data_files, tmp_path):
  path = tmp_path / 'one.csv'
  path.write_text(''.join(f'{text},upbeat\n' for text, _ in reviews(40)))
  return str(path)


# (id, task, init_from given the dirs, overrides given the dirs, part of the message)
BAD_STARTS = [
  (
    'no_tokenizer',
    'classify',
    _without_tokenizer,
    {},
    'no tokenizer in',
  ),
  (
    'tokenizer_beyond_embedding',
    'classify',
    _small_embedding,
    {},
    'tokens but the model embeds only',
  ),
  (
    'architecture_override',
    'classify',
    lambda c, t: c / 'classifier',
    {'model.d_model': 24},
    'sets the architecture: drop model.d_model=24 (the checkpoint gives 12)',
  ),
  (
    'one_class',
    'classify',
    lambda c, t: c / 'classifier',
    {'data.path': _one_class},
    "the data has one label only ('upbeat')",
  ),
  (
    'gpt2_for_classify',
    'classify',
    lambda c, t: c / 'gpt2',
    {},
    "holds a 'gpt2' model (GPT2LMHeadModel); the classify task needs a BERT checkpoint",
  ),
  ('bert_for_lm', 'lm', lambda c, t: c / 'mlm', {}, 'the lm task needs a decoder-only checkpoint'),
  (
    'param_lr_typo',
    'classify',
    lambda c, t: c / 'classifier',
    {'param_lr': 'clasifier=1e-3'},
    "param_lr pattern 'clasifier' matches no parameter",
  ),
]


@pytest.mark.parametrize(
  'task, source, overrides, message', [c[1:] for c in BAD_STARTS], ids=[c[0] for c in BAD_STARTS]
)
def test_a_bad_start_is_one_clear_error_and_writes_nothing(
  task, source, overrides, message, checkpoints, data_files, tmp_path
):
  fields = {'data.path': str(data_files / ('reviews.csv' if task == 'classify' else 'corpus.txt'))}
  fields.update({k: v(data_files, tmp_path) if callable(v) else v for k, v in overrides.items()})
  config = config_from(task, source(checkpoints, tmp_path), **fields)
  workdir = tmp_path / 'work'
  with pytest.raises(ValueError) as raised:
    train_and_evaluate(config, str(workdir))
  assert message in str(raised.value) and '\n' not in str(raised.value)
  assert not workdir.exists()


def test_the_command_line_reports_a_bad_start_in_one_line(checkpoints, data_files, tmp_path):
  workdir = tmp_path / 'work'
  result = run_cli(
    'train',
    '--config=train/configs/classify.py',
    f'--workdir={workdir}',
    f'--config.init_from={checkpoints / "gpt2"}',
    f'--config.data.path={data_files / "reviews.csv"}',
  )
  assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1 and 'the classify task needs a BERT checkpoint' in errors[0]
  assert not workdir.exists()
