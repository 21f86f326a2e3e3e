"""LoRA runs of ``python -m train`` (``lora.rank > 0``): from a tiny Llama checkpoint (with its tokenizer), from
GPT-2 and from a BERT classifier whose head is new. The frozen weights stay bit-equal, only the adapters (and a new
head) get optimizer moments, checkpoints hold no frozen weight and resume exactly, and both exports (merged weights,
a PEFT adapter directory) give transformers' and peft's logits."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util
from test_init_from import (  # noqa: F401  (checkpoints, data_files: the fixtures)
  _gpt2_tokenizer,
  checkpoints,
  config_from,
  data_files,
  hf_inputs,
  max_logit_difference,
)
from train_helpers import tiny_config

from train.checkpoint import Checkpoints
from train.runs import export, export_adapter, load_run, load_state
from train.trainer import check_config, train_and_evaluate
from transformer_jax.convert import load_hf

peft = pytest.importorskip('peft')

LORA = {'lora.rank': 4, 'lora.alpha': 8.0, 'lora.targets': 'query|value|fc_out'}


def _flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree), sep='/')


@pytest.fixture(scope='module')
def llama_dir(tmp_path_factory):
  torch.manual_seed(0)
  tok = _gpt2_tokenizer()
  config = transformers.LlamaConfig(
    vocab_size=len(tok) + 3,
    hidden_size=24,
    num_attention_heads=6,
    num_key_value_heads=2,
    intermediate_size=28,
    num_hidden_layers=2,
    max_position_embeddings=40,
    bos_token_id=tok.bos_token_id,
    eos_token_id=tok.eos_token_id,
  )
  root = tmp_path_factory.mktemp('llama')
  transformers.LlamaForCausalLM(config).save_pretrained(root)
  tok.save_pretrained(root)
  return root


@pytest.fixture(scope='module')
def llama_run(llama_dir, data_files, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('llama_lora')
  config = config_from(
    'lm',
    llama_dir,
    num_train_steps=12,
    eval_every_steps=12,
    checkpoint_every_steps=12,
    learning_rate=2e-2,
    **LORA,
    **{'data.path': str(data_files / 'corpus.txt')},
  )
  return workdir, train_and_evaluate(config, str(workdir))


def test_only_the_adapters_train(llama_dir, llama_run):
  _, summary = llama_run
  state = summary['state']
  _, start = load_hf(llama_dir)
  frozen = _flat(state.frozen)
  assert frozen.keys() == _flat(start).keys()  # every weight of the model is frozen
  for name, value in _flat(start).items():
    np.testing.assert_array_equal(frozen[name], value, err_msg=name)
  adapters = _flat(state.params['lora'])
  assert {k.split('/')[-2] for k in adapters} == {'query', 'value', 'fc_out'}
  assert any(np.abs(v).max() > 0 for k, v in adapters.items() if k.endswith('lora_b'))
  # Adam's moments mirror the adapters alone: nothing of a frozen weight's size is held
  shapes = sorted(v.shape for v in adapters.values())
  moments = sorted(x.shape for x in jax.tree.leaves(state.opt_state) if np.ndim(x))
  assert moments == sorted(shapes * 2)


def test_checkpoints_hold_the_adapters_and_name_the_base(llama_dir, llama_run):
  workdir, _ = llama_run
  with Checkpoints.reader(str(workdir)) as checkpoints:
    saved = checkpoints.saved_params()
    meta = checkpoints.latest_meta()
  assert set(saved) <= {'lora', 'params'} and not jax.tree.leaves(saved.get('params', {}))
  assert _flat(saved['lora']).keys() == _flat(summary_adapters(llama_run)).keys()
  assert meta['lora_base'] == str(llama_dir)


def summary_adapters(run):
  return run[1]['state'].params['lora']


def test_the_peft_export_loads_onto_the_base_with_our_logits(llama_dir, llama_run, tmp_path):
  workdir, _ = llama_run
  assert 'PeftModel.from_pretrained' in export_adapter(str(workdir), str(tmp_path / 'adapter'))
  base = transformers.AutoModelForCausalLM.from_pretrained(llama_dir)
  hf_model = peft.PeftModel.from_pretrained(base, tmp_path / 'adapter').eval()
  task, params = load_run(str(workdir))
  ids, mask = hf_inputs(llama_dir, ['the film was good', 'our trip was dull today'])
  assert max_logit_difference(task.model, params, hf_model, ids, mask) < 1e-5


def test_the_merged_export_loads_in_transformers(llama_dir, llama_run, tmp_path):
  workdir, _ = llama_run
  assert export(str(workdir), str(tmp_path / 'hf')) == 'AutoModelForCausalLM'
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'hf').eval()
  assert hf_model.config.model_type == 'llama'
  task, params = load_run(str(workdir))
  ids, mask = hf_inputs(llama_dir, ['the food was fine'])
  assert max_logit_difference(task.model, params, hf_model, ids, mask) < 1e-5
  _, start = load_hf(llama_dir)
  merged = _flat(params)
  changed = [k for k, v in _flat(start).items() if not np.array_equal(merged[k], v)]
  assert changed and all(k.split('/')[-2] in ('query', 'value', 'fc_out') for k in changed)


def test_a_resumed_lora_run_equals_a_straight_one(tmp_path):
  def config(steps):
    return tiny_config('lm', None, num_train_steps=steps, **LORA, **{'lora.dropout': 0.1})

  straight = train_and_evaluate(config(6), str(tmp_path / 'straight'))
  assert train_and_evaluate(config(3), str(tmp_path / 'resumed'))['step'] == 3
  resumed = train_and_evaluate(config(6), str(tmp_path / 'resumed'))
  jax.tree.map(np.testing.assert_array_equal, resumed['state'].params, straight['state'].params)
  _, state = load_state(str(tmp_path / 'resumed'))
  jax.tree.map(np.testing.assert_array_equal, state.frozen, straight['state'].frozen)


def test_gpt2_adapts_its_fused_projection(checkpoints, data_files, tmp_path):
  config = config_from(
    'lm',
    checkpoints / 'gpt2',
    **{'lora.rank': 2, 'lora.targets': 'qkv', 'data.path': str(data_files / 'corpus.txt')},
  )
  summary = train_and_evaluate(config, str(tmp_path / 'run'))
  made = _flat(summary['state'].params['lora'])
  assert made['decoder/layers_0/self_attention/qkv/lora_b'].shape == (2, 3, 3, 4)  # (r, 3, H, K)
  export_adapter(str(tmp_path / 'run'), str(tmp_path / 'adapter'))
  base = transformers.AutoModelForCausalLM.from_pretrained(checkpoints / 'gpt2')
  hf_model = peft.PeftModel.from_pretrained(base, tmp_path / 'adapter').eval()
  task, params = load_run(str(tmp_path / 'run'))
  ids, mask = hf_inputs(checkpoints / 'gpt2', ['the film was good', 'our trip'])
  assert max_logit_difference(task.model, params, hf_model, ids, mask) < 1e-5


def test_a_new_classification_head_trains_in_full(checkpoints, data_files, tmp_path):
  """BERT's bare encoder has no head for these labels: it trains in full beside the adapters, and so does the token
  table that ``lora.train_also`` names (a random tiny encoder knows no words); every other weight stays."""
  config = config_from(
    'classify',
    checkpoints / 'encoder',
    num_train_steps=40,
    eval_every_steps=40,
    checkpoint_every_steps=40,
    batch_size=16,
    eval_batches=0,
    learning_rate=3e-2,
    **{'lora.rank': 4, 'lora.targets': 'query|key|value|out|fc_in|fc_out'},
    **{'lora.train_also': 'bert/token_embed'},
    **{'data.path': str(data_files / 'reviews.csv'), 'data.seq_len': 12},
  )
  summary = train_and_evaluate(config, str(tmp_path / 'run'))
  state = summary['state']
  assert set(_flat(state.params['params'])) == {
    'bert/token_embed/embedding',
    'classifier/bias',
    'classifier/kernel',
  }
  _, start = load_hf(checkpoints / 'encoder')
  frozen = _flat(state.frozen)
  for name, value in _flat({'bert': start}).items():
    if name != 'bert/token_embed/embedding':
      np.testing.assert_array_equal(frozen[name], value, err_msg=name)
  assert summary['eval']['accuracy'] >= 0.9, summary['eval']
  task, params = load_run(str(tmp_path / 'run'))  # merged: what sample and export use
  texts = ['the film was lovely today', 'our trip was awful']
  assert task.predict(params, task.encode_texts(texts)).argmax(-1).tolist() == [1, 0]
  with pytest.raises(ValueError, match='also trains whole modules'):
    export_adapter(str(tmp_path / 'run'), str(tmp_path / 'adapter'))


@pytest.mark.parametrize(
  'overrides, message',
  [
    ({'lora.rank': -1}, 'lora: rank must be a positive integer'),
    ({'lora.rank': 4, 'lora.dropout': 1.0}, r'lora: dropout must lie in \[0, 1\)'),
    ({'lora.rank': 4, 'lora.targets': '('}, 'is not a regular expression'),
  ],
)
def test_bad_lora_settings_are_config_errors(overrides, message):
  with pytest.raises(ValueError, match=message):
    check_config(tiny_config('lm', None, **overrides))
