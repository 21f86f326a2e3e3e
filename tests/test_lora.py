"""LoRA: the adapted forward pass against merged weights and against ``peft`` on the ``transformers`` base (Llama,
GPT-2's Conv1D, BERT), adapter gradients against peft's, the PEFT directory round trip, and the configs we refuse.
Tiny random models of odd shape (d_model 48, 6 heads over 2 KV heads, rank 3)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax import GPT, GPTConfig, lora
from transformer_jax.lora import LoraConfig

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
peft = pytest.importorskip('peft')

from transformer_jax.convert import ConversionError, load_hf  # noqa: E402
from transformer_jax.convert.peft import load_peft, save_peft  # noqa: E402

B, T = 2, 9
VALID = np.array([[True] * T, [False] * 3 + [True] * (T - 3)])
LLAMA = dict(
  hidden_size=48,
  num_attention_heads=6,
  num_key_value_heads=2,
  intermediate_size=40,
  num_hidden_layers=2,
  vocab_size=97,
  max_position_embeddings=32,
  rope_theta=5e5,
)
SETTINGS = LoraConfig(rank=3, alpha=5.0, targets='query|value|fc_out|out')


def _gpt(scan_layers=False):
  shape = dict(
    vocab_size=53, max_len=16, num_layers=3, d_model=24, num_heads=6, num_kv_heads=2, d_ff=20
  )
  rope = dict(rope_theta=1e4, rope_scaling=None)
  return GPT(GPTConfig.llama(**shape, **rope, tie_output=False, scan_layers=scan_layers))


def _perturbed(adapters, seed=2):
  """Trained-looking adapters: B is zero at init, which would hide a wrong product."""
  leaves, tree = jax.tree.flatten(adapters)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(
    tree, [x + 0.3 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  )


@pytest.mark.parametrize('scan_layers', [False, True], ids=['loop', 'scan'])
def test_adapted_forward_equals_merged_weights(scan_layers):
  model = _gpt(scan_layers)
  ids = jnp.arange(10).reshape(2, 5) % 53
  params = model.init(jax.random.key(0), ids)['params']
  adapters = lora.init(model, params, SETTINGS, jax.random.key(1), ids)
  with jax.default_matmul_precision('highest'):
    base = model.apply({'params': params}, ids)
    np.testing.assert_array_equal(lora.apply(model, params, adapters, SETTINGS, ids), base)
    adapters = _perturbed(adapters)
    adapted = lora.apply(model, params, adapters, SETTINGS, ids)
    merged = model.apply({'params': lora.merge(params, adapters, SETTINGS)}, ids)
  np.testing.assert_allclose(adapted, merged, atol=1e-5)
  assert np.abs(adapted - base).max() > 1e-2


def test_targets_pick_the_named_projections_and_their_shapes():
  model = _gpt()
  ids = jnp.zeros((1, 3), jnp.int32)
  params = model.init(jax.random.key(0), ids)['params']
  adapters = lora.init(model, params, SETTINGS, jax.random.key(1), ids)
  layer = adapters['decoder']['layers_1']
  assert set(layer['self_attention']) == {'query', 'value', 'out'}
  assert set(layer['ffn']) == {'fc_out'}
  assert layer['self_attention']['query']['lora_a'].shape == (24, 3)
  assert layer['self_attention']['value']['lora_b'].shape == (3, 2, 4)  # (r, KV heads, head dim)
  assert layer['self_attention']['out']['lora_a'].shape == (6, 4, 3)  # (H, K, r): two input axes
  assert not np.any(layer['ffn']['fc_out']['lora_b'])
  # A differs from layer to layer
  assert not np.allclose(
    adapters['decoder']['layers_0']['self_attention']['query']['lora_a'],
    layer['self_attention']['query']['lora_a'],
  )


def test_targets_that_match_nothing_and_bad_settings_are_one_line_errors():
  model = _gpt()
  ids = jnp.zeros((1, 3), jnp.int32)
  params = model.init(jax.random.key(0), ids)['params']
  with pytest.raises(ValueError, match="LoRA targets 'q_proj' match no projection of GPT"):
    lora.init(model, params, LoraConfig(targets='q_proj'), jax.random.key(1), ids)
  with pytest.raises(ValueError, match='rank must be a positive integer.*dropout must lie'):
    LoraConfig(rank=0, dropout=1.5)


def _hf_llama():
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model


def _hf_gpt2():
  torch.manual_seed(0)
  config = transformers.GPT2Config(n_embd=48, n_head=6, n_layer=2, vocab_size=97, n_positions=32)
  return transformers.GPT2LMHeadModel(config).eval()


def _ids(vocab=97):
  ids = np.asarray(jax.random.randint(jax.random.key(3), (B, T), 1, vocab))
  return np.where(VALID, ids, 0)


FAMILIES = {
  'llama': (_hf_llama, LoraConfig(rank=3, alpha=5.0, targets='query|value|out|fc_gate|fc_out')),
  'gpt2': (_hf_gpt2, LoraConfig(rank=3, alpha=7.0, targets='qkv|fc_in')),
}


@pytest.fixture(scope='module', params=sorted(FAMILIES))
def family(request, tmp_path_factory):
  """A transformers base saved to disk, ours loaded from it, perturbed adapters and their PEFT directory."""
  make, settings = FAMILIES[request.param]
  root = tmp_path_factory.mktemp(request.param)
  make().save_pretrained(root / 'base')
  model, params = load_hf(root / 'base')
  ids = _ids()
  adapters = _perturbed(lora.init(model, params, settings, jax.random.key(1), ids))
  save_peft(model, adapters, settings, root / 'adapter', base_model=str(root / 'base'))
  return request.param, root, model, params, adapters, settings


def _peft_model(root, is_trainable=False):
  base = transformers.AutoModelForCausalLM.from_pretrained(
    root / 'base', attn_implementation='eager'
  )
  return peft.PeftModel.from_pretrained(base, root / 'adapter', is_trainable=is_trainable).eval()


def _positions():
  return np.maximum(np.cumsum(VALID, axis=1) - 1, 0)


def test_peft_loads_our_adapters_with_equal_logits(family):
  name, root, model, params, adapters, settings = family
  ids = _ids()
  with jax.default_matmul_precision('highest'):
    ours = lora.apply(model, params, adapters, settings, ids, valid=VALID, positions=_positions())
  with torch.no_grad():
    theirs = _peft_model(root)(
      input_ids=torch.tensor(ids),
      attention_mask=torch.tensor(VALID.astype(np.int64)),
      position_ids=torch.tensor(_positions()),
    ).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours)[VALID], theirs[VALID], atol=1e-5, rtol=1e-5)
  written = json.loads((root / 'adapter' / 'adapter_config.json').read_text())
  assert written['task_type'] == 'CAUSAL_LM' and written['r'] == 3
  assert written['fan_in_fan_out'] == (name == 'gpt2')  # GPT-2's Conv1D stores (in, out)


def test_adapter_gradients_equal_peft(family):
  """The gradient of one loss with respect to every adapter, ours exported under PEFT's names."""
  name, root, model, params, adapters, settings = family
  ids = _ids()
  labels, weights = np.roll(ids, -1, axis=1), VALID.astype(np.float32)

  def loss(a):
    logits = lora.apply(model, params, a, settings, ids, valid=VALID, positions=_positions())
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), labels[..., None], -1)[..., 0]
    return (nll * weights).sum() / weights.sum()

  with jax.default_matmul_precision('highest'):
    grads = jax.grad(loss)(adapters)
  save_peft(model, grads, settings, root / 'grads')  # the gradients laid out as PEFT's tensors
  from safetensors.numpy import load_file

  ours = load_file(root / 'grads' / 'adapter_model.safetensors')
  hf = _peft_model(root, is_trainable=True)
  out = hf(
    input_ids=torch.tensor(ids),
    attention_mask=torch.tensor(VALID.astype(np.int64)),
    position_ids=torch.tensor(_positions()),
  ).logits
  nll = -torch.log_softmax(out, -1).gather(-1, torch.tensor(labels)[..., None])[..., 0]
  mask = torch.tensor(weights)
  ((nll * mask).sum() / mask.sum()).backward()
  theirs = {
    n.replace('.default', ''): p.grad.numpy() for n, p in hf.named_parameters() if p.requires_grad
  }
  assert set(theirs) == set(ours)
  for key, grad in theirs.items():
    np.testing.assert_allclose(ours[key], grad, atol=2e-6, rtol=1e-4, err_msg=key)


def test_peft_directory_round_trip_is_exact(family):
  name, root, model, params, adapters, settings = family
  config, again = load_peft(model, root / 'adapter')
  assert (config.rank, config.alpha, config.dropout) == (settings.rank, settings.alpha, 0.0)
  jax.tree.map(np.testing.assert_array_equal, again, jax.device_get(adapters))


def test_a_damaged_adapter_file_is_one_line_error(family, tmp_path):
  name, root, model, *_ = family
  (tmp_path / 'adapter_config.json').write_text(
    (root / 'adapter' / 'adapter_config.json').read_text()
  )
  (tmp_path / 'adapter_model.safetensors').write_bytes(b'not safetensors')
  with pytest.raises(ConversionError, match='is not a readable PEFT adapter directory') as error:
    load_peft(model, tmp_path)
  assert '\n' not in str(error.value)
