"""Hugging Face GPT-2 and BERT: forward parity (modules and directories on disk), HF dir -> ours -> HF dir, dtypes,
and every error path. All offline: tiny random models are built and saved to temporary directories."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from transformer_jax import convert  # noqa: E402
from transformer_jax.convert import ConversionError  # noqa: E402
from transformer_jax.convert.gpt2 import gpt2_hf_config  # noqa: E402

B, T, H, K, V, F = 2, 5, 3, 4, 37, 20
D = H * K


def gpt2(head=True, layers=2, **overrides):
  config = transformers.GPT2Config(
    n_layer=layers,
    n_head=H,
    n_embd=D,
    vocab_size=V,
    n_positions=16,
    bos_token_id=0,
    eos_token_id=0,
    attn_pdrop=0.0,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_implementation='eager',
    **overrides,
  )
  torch.manual_seed(0)
  return (transformers.GPT2LMHeadModel if head else transformers.GPT2Model)(config).eval()


BERT_HEADS = {
  'BertModel': transformers.BertModel,
  'BertForMaskedLM': transformers.BertForMaskedLM,
  'BertForSequenceClassification': transformers.BertForSequenceClassification,
}


def bert(architecture='BertModel', layers=2):
  config = transformers.BertConfig(
    num_hidden_layers=layers,
    num_attention_heads=H,
    hidden_size=D,
    intermediate_size=F,
    vocab_size=V,
    max_position_embeddings=16,
    num_labels=3,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    attn_implementation='eager',
  )
  torch.manual_seed(0)
  model = BERT_HEADS[architecture](config).eval()
  with torch.no_grad():  # random, non-trivial biases and norms, so that a mix-up of them shows
    for name, p in model.named_parameters():
      if 'LayerNorm' in name or name.endswith('bias'):
        p.add_(0.1 * torch.randn_like(p))
  return model


def batch(rng):
  """Ids and a right-padded ``(B, T)`` attention mask (row 1 has 3 real tokens)."""
  ids = rng.integers(1, V, (B, T))
  mask = (np.arange(T)[None] < np.array([[T], [3]])).astype(np.int64)
  return ids, mask


def hf_outputs(model, ids, mask, token_types=None):
  """The numbers to compare, by class: logits, or the last hidden state and pooled output."""
  kwargs = dict(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask))
  if token_types is not None:
    kwargs['token_type_ids'] = torch.as_tensor(token_types)
  with torch.no_grad():
    out = model(**kwargs)
  if hasattr(out, 'logits'):
    return [out.logits.numpy()]
  extra = [out.pooler_output.numpy()] if getattr(out, 'pooler_output', None) is not None else []
  return [out.last_hidden_state.numpy(), *extra]


def our_outputs(model, params, ids, mask, token_types=None, hidden=False):
  """Ours, jitted, matching :func:`hf_outputs`; ``hidden``: GPT's hidden states (a ``GPT2Model``'s output)."""
  kwargs = dict(valid=jnp.asarray(mask.astype(bool)))
  if hidden:
    kwargs['method'] = model.hidden_states
  if token_types is not None:
    kwargs['token_type_ids'] = jnp.asarray(token_types)
  out = jax.jit(lambda p, i: model.apply({'params': p}, i, **kwargs))(params, jnp.asarray(ids))
  return [np.asarray(o) for o in (out if isinstance(out, tuple) else (out,))]


def assert_close(got, expected, atol):
  assert len(got) == len(expected)
  for g, e in zip(got, expected):
    assert g.shape == e.shape
    np.testing.assert_allclose(g, e, atol=atol, rtol=0)


SOURCES = {
  'gpt2_lm_head': lambda: gpt2(head=True),
  'gpt2_model': lambda: gpt2(head=False),
  **{f'bert_{name}': (lambda name=name: bert(name)) for name in BERT_HEADS},
}


@pytest.mark.parametrize('source', sorted(SOURCES))
def test_module_forward_parity(rng, source):
  """Converted from the module: logits / hidden states / pooled output within 1e-5, with padding in the batch."""
  hf_model = SOURCES[source]()
  model, params = (convert.from_bert if source.startswith('bert') else convert.from_gpt2)(hf_model)
  ids, mask = batch(rng)
  token_types = rng.integers(0, 2, ids.shape) if source.startswith('bert') else None
  got = our_outputs(model, params, ids, mask, token_types, hidden=source == 'gpt2_model')
  assert_close(got, hf_outputs(hf_model, ids, mask, token_types), 1e-5)


@pytest.mark.parametrize('source', sorted(SOURCES))
def test_hf_dir_round_trip(rng, tmp_path, source):
  """HF dir -> load_hf -> same numbers -> save_hf -> from_pretrained -> same numbers again."""
  hf_model = SOURCES[source]()
  hf_model.save_pretrained(tmp_path / 'hf')
  model, params = convert.load_hf(tmp_path / 'hf')
  ids, mask = batch(rng)
  expected = hf_outputs(hf_model, ids, mask)
  assert_close(our_outputs(model, params, ids, mask, hidden=source == 'gpt2_model'), expected, 1e-5)
  if source == 'gpt2_model':
    return  # save_hf writes GPT as GPT2LMHeadModel; the head-model source covers the way back
  convert.save_hf(model, params, tmp_path / 'ours')
  reloaded = type(hf_model).from_pretrained(tmp_path / 'ours', attn_implementation='eager').eval()
  assert_close(hf_outputs(reloaded, ids, mask), expected, 1e-5)


@pytest.mark.parametrize('weights', ['bin', 'sharded_safetensors', 'sharded_bin'])
def test_load_hf_file_layouts(rng, tmp_path, weights):
  hf_model = gpt2()
  hf_model.save_pretrained(
    tmp_path,
    safe_serialization=not weights.endswith('bin'),
    max_shard_size='5KB' if weights.startswith('sharded') else '5GB',
  )
  assert bool(list(tmp_path.glob('*.index.json'))) == weights.startswith('sharded')
  model, params = convert.load_hf(tmp_path)
  ids, mask = batch(rng)
  assert_close(our_outputs(model, params, ids, mask), hf_outputs(hf_model, ids, mask), 1e-5)


@pytest.mark.parametrize('stored', ['float16', 'bfloat16'])
@pytest.mark.parametrize('requested', [None, 'float32'], ids=['keep', 'to_float32'])
def test_load_hf_dtypes(tmp_path, stored, requested):
  """Half-precision checkpoints load; params keep the stored dtype or take the requested one, values unchanged."""
  hf_model = gpt2().to(getattr(torch, stored))
  hf_model.save_pretrained(tmp_path)
  model, params = convert.load_hf(tmp_path, dtype=requested)
  expected = jnp.dtype(requested or stored)
  assert {x.dtype for x in jax.tree.leaves(params)} == {expected}
  assert jnp.dtype(model.config.param_dtype) == expected
  ours = params['decoder']['layers_1']['ffn']['fc_in']['kernel']
  # Conv1D: already (in, out)
  theirs = hf_model.transformer.h[1].mlp.c_fc.weight.float().detach().numpy()
  np.testing.assert_array_equal(np.asarray(ours, np.float32), theirs)


def test_twelve_layer_gpt2_parity(rng):
  hf_model = gpt2(layers=12)
  model, params = convert.from_gpt2(hf_model)
  ids, mask = batch(rng)
  assert_close(our_outputs(model, params, ids, mask), hf_outputs(hf_model, ids, mask), 1e-4)


# ----------------------------------------------------------------------------------------------- error paths


def test_missing_extra_and_misshapen_weights_are_all_named():
  hf_model = gpt2()
  state = dict(hf_model.state_dict())
  del state['transformer.h.0.ln_1.weight'], state['transformer.h.1.mlp.c_fc.bias']
  state['transformer.h.0.attn.c_attn.weight'] = torch.zeros(D, 3 * D + 1)
  state['transformer.h.1.ln_2.bias'] = torch.zeros(D + 2)
  state['transformer.extra.weight'] = torch.zeros(3)
  state['lm_head.extra'] = torch.zeros(2, 2)
  with pytest.raises(ConversionError) as err:
    convert.from_gpt2(state, hf_model.config)
  message = str(err.value)
  for line in [
    'missing: transformer.h.0.ln_1.weight (expected shape (12,))',
    'missing: transformer.h.1.mlp.c_fc.bias (expected shape (48,))',
    'unexpected: transformer.extra.weight (found shape (3,))',
    'unexpected: lm_head.extra (found shape (2, 2))',
    'wrong shape: transformer.h.0.attn.c_attn.weight: expected (12, 36), found (12, 37)',
    'wrong shape: transformer.h.1.ln_2.bias: expected (12,), found (14,)',
  ]:
    assert line in message, message


def test_export_checks_our_params_too():
  model, params = convert.from_bert(bert())
  del params['pooler']['bias']
  params['encoder']['layers_0']['ffn']['fc_in']['kernel'] = jnp.zeros((D, F + 1))
  with pytest.raises(
    ConversionError, match=r'missing: pooler/bias[\s\S]*wrong shape: encoder/layers_0/ffn/fc_in'
  ):
    convert.to_bert(model, params)


def test_blocks_gpt2_does_not_have_are_refused_on_export():
  """A Llama-shaped GPT would load into GPT-2's names and compute something else: its export is refused, naming
  each field. Key/value heads equal to the query heads are plain multi-head attention and pass."""
  model, params = convert.from_gpt2(gpt2())
  plain = model.config.replace(num_kv_heads=model.config.num_heads)
  gpt2_hf_config(plain)
  llama = plain.replace(
    num_kv_heads=1, norm_type='rms_norm', gated_ffn=True, use_bias=False, fused_qkv=False
  )
  with pytest.raises(ConversionError, match='GPT-2 cannot express') as error:
    gpt2_hf_config(llama)
  for field in ('norm_type', 'gated_ffn', 'use_bias', 'grouped_query=True'):
    assert field in str(error.value)


def test_untied_head_is_refused():
  hf_model = gpt2()
  state = {k: v.clone() for k, v in hf_model.state_dict().items()}
  state['lm_head.weight'] += 1.0
  with pytest.raises(ConversionError, match='lm_head.weight differs from transformer.wte.weight'):
    convert.from_gpt2(state, hf_model.config)


def saved(tmp_path, edit, sharded=False):
  gpt2().save_pretrained(tmp_path, max_shard_size='5KB' if sharded else '5GB')
  edit(tmp_path)
  return tmp_path


def edit_config(**fields):
  def edit(path):
    config = json.loads((path / 'config.json').read_text())
    (path / 'config.json').write_text(json.dumps({**config, **fields}))

  return edit


def drop_config_keys(*keys):
  def edit(path):
    config = json.loads((path / 'config.json').read_text())
    (path / 'config.json').write_text(
      json.dumps({k: v for k, v in config.items() if k not in keys})
    )

  return edit


def drop_a_shard(path):
  sorted(path.glob('model-*.safetensors'))[0].unlink()


BROKEN_DIRS = {
  'unsupported_model_type': (edit_config(model_type='rwkv'), "unsupported model_type 'rwkv'"),
  'unsupported_architecture': (
    edit_config(architectures=['GPT2DoubleHeadsModel']),
    r"unsupported architectures \['GPT2DoubleHeadsModel'\]",
  ),
  'missing_shard': (drop_a_shard, 'lists shards that are missing'),
  'config_without_sizes': (
    drop_config_keys('n_layer', 'n_embd'),
    'the gpt2 config lacks n_embd, n_layer',
  ),
  'corrupt_index': (
    lambda p: next(p.glob('*.index.json')).write_text('{"weight_map": '),
    'is not a valid shard index',
  ),
  'corrupt_weights': (
    lambda p: (p / 'model.safetensors').write_bytes(b'\x08not a safetensors file'),
    'cannot read weights file .*model.safetensors',
  ),
  'truncated_weights': (
    lambda p: (p / 'model.safetensors').write_bytes((p / 'model.safetensors').read_bytes()[:900]),
    'cannot read weights file',
  ),
  'corrupt_config': (
    lambda p: (p / 'config.json').write_text('{"model_type": '),
    'config.json is not valid JSON',
  ),
  'missing_config': (lambda p: (p / 'config.json').unlink(), 'config.json is missing'),
  'missing_weights': (lambda p: (p / 'model.safetensors').unlink(), 'no weights in'),
}


@pytest.mark.parametrize('case', sorted(BROKEN_DIRS))
def test_broken_directories(tmp_path, case):
  edit, message = BROKEN_DIRS[case]
  with pytest.raises(ConversionError, match=message):
    convert.load_hf(saved(tmp_path, edit, sharded=case in ('missing_shard', 'corrupt_index')))


def test_unsupported_options_are_refused(tmp_path):
  with pytest.raises(ConversionError, match='scale_attn_by_inverse_layer_idx=True'):
    convert.from_gpt2(gpt2(scale_attn_by_inverse_layer_idx=True))
  model, params = convert.from_gpt2(gpt2())
  with pytest.raises(ConversionError, match='tie_output=False'):
    convert.save_hf(model.clone(config=model.config.replace(tie_output=False)), params, tmp_path)
