"""Llama, Mistral and Qwen2 from Hugging Face: logits and every gradient on a left-padded batch, the export round
trip, greedy and beam decoding against ``generate``, and the configs we refuse. Tiny random models of odd shape
(d_model 48, 6 query heads of 8 over 2 key/value heads, FFN 40, 2 layers, vocabulary 101) with perturbed weights,
saved to a temp dir. Prompts of 13 tokens and 8 new ones meet Mistral's window of 5 in the prompt and in cached
decoding."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import transformer_jax.nnx as tnnx  # noqa: E402
from transformer_jax import generation  # noqa: E402
from transformer_jax.convert import ConversionError, from_llama, load_hf, save_hf  # noqa: E402
from transformer_jax.convert.engine import export_state  # noqa: E402
from transformer_jax.convert.hf_directory import SPECS  # noqa: E402

SHAPE = dict(
  hidden_size=48,
  num_attention_heads=6,
  num_key_value_heads=2,
  head_dim=8,
  intermediate_size=40,
  num_hidden_layers=2,
  vocab_size=101,
  max_position_embeddings=64,
  rms_norm_eps=1e-5,  # not the default, so a dropped eps shows
  bos_token_id=1,
  eos_token_id=2,
  pad_token_id=0,
)
# A short original context, so that llama3 scaling changes the frequencies these positions see.
LLAMA3 = dict(
  rope_type='llama3',
  rope_theta=500000.0,
  factor=8.0,
  low_freq_factor=1.0,
  high_freq_factor=4.0,
  original_max_position_embeddings=16,
)
MODELS = {
  'llama': ('LlamaConfig', 'LlamaForCausalLM', dict(rope_theta=500000.0)),
  'llama3_tied': (
    'LlamaConfig',
    'LlamaForCausalLM',
    dict(rope_parameters=LLAMA3, tie_word_embeddings=True),
  ),
  'llama_linear': (
    'LlamaConfig',
    'LlamaForCausalLM',
    dict(rope_parameters=dict(rope_type='linear', rope_theta=10000.0, factor=2.0)),
  ),
  'mistral': ('MistralConfig', 'MistralForCausalLM', dict(rope_theta=10000.0, sliding_window=5)),
  'qwen2': ('Qwen2Config', 'Qwen2ForCausalLM', dict(rope_theta=10000.0, tie_word_embeddings=False)),
}
B, T = 2, 13
VALID = np.array([[True] * T, [False] * 4 + [True] * (T - 4)])  # the second row left-padded


def _hf_model(name, seed=0):
  config_cls, model_cls, options = MODELS[name]
  torch.manual_seed(seed)
  config = getattr(transformers, config_cls)(**SHAPE, **options)
  model = getattr(transformers, model_cls)(config).eval()
  with torch.no_grad():
    for p in model.parameters():  # norm weights and biases too: none stays at its init
      p.add_(0.1 * torch.randn_like(p))
  return model


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  root = tmp_path_factory.mktemp('llama')
  for name in MODELS:
    _hf_model(name).save_pretrained(root / name)
  return root


def _load_hf_model(path):
  model_cls = getattr(transformers, MODELS[path.name][1])
  return model_cls.from_pretrained(path, attn_implementation='eager').eval()


def _batch():
  ids = np.asarray(jax.random.randint(jax.random.key(1), (B, T), 3, SHAPE['vocab_size']))
  ids = np.where(VALID, ids, 0)
  # positions count real tokens, as generate() numbers a left-padded prompt on both sides
  positions = np.maximum(np.cumsum(VALID, axis=1) - 1, 0)
  return ids, positions


def _ours(model, params, ids, positions):
  return model.apply({'params': params}, ids, valid=VALID, positions=positions)


def _theirs(hf_model, ids, positions):
  return hf_model(
    input_ids=torch.tensor(ids),
    attention_mask=torch.tensor(VALID.astype(np.int64)),
    position_ids=torch.tensor(positions),
  ).logits


@pytest.mark.parametrize('name', sorted(MODELS))
def test_logits_match_transformers(saved, name):
  model, params = load_hf(saved / name)
  ids, positions = _batch()
  with jax.default_matmul_precision('highest'):
    ours = np.asarray(_ours(model, params, ids, positions))
  with torch.no_grad():
    theirs = _theirs(_load_hf_model(saved / name), ids, positions).numpy()
  np.testing.assert_allclose(ours[VALID], theirs[VALID], atol=1e-5, rtol=1e-5)
  nnx_model = tnnx.load_hf(saved / name)  # the converter's NNX model: the same numbers
  with jax.default_matmul_precision('highest'):
    np.testing.assert_array_equal(nnx_model(ids, valid=VALID, positions=positions), ours)


def _nll(logp, labels):
  return -np.take_along_axis(logp, labels[..., None], -1)[..., 0]


@pytest.mark.parametrize('name', sorted(MODELS))
def test_gradients_match_transformers(saved, name):
  """Every parameter's gradient of the same loss, ours exported under transformers' names."""
  model, params = load_hf(saved / name)
  ids, positions = _batch()
  labels = np.roll(ids, -1, axis=1)
  weights = VALID.astype(np.float32)

  def loss(p):
    logp = jax.nn.log_softmax(_ours(model, p, ids, positions), -1)
    nll = -jnp.take_along_axis(logp, labels[..., None], -1)[..., 0]
    return (nll * weights).sum() / weights.sum()

  with jax.default_matmul_precision('highest'):
    grads = jax.grad(loss)(params)
  spec = SPECS[json.loads((saved / name / 'config.json').read_text())['model_type']]
  ours = export_state(model, grads, spec.table(model.config, spec.architecture_of(model)))

  hf_model = _load_hf_model(saved / name)
  logp = torch.log_softmax(_theirs(hf_model, ids, positions), -1)
  nll = -logp.gather(-1, torch.tensor(labels)[..., None])[..., 0]
  mask = torch.tensor(weights)
  ((nll * mask).sum() / mask.sum()).backward()
  theirs = {n: p.grad.numpy() for n, p in hf_model.named_parameters()}
  assert set(theirs) <= set(ours)
  for key, grad in theirs.items():
    np.testing.assert_allclose(ours[key], grad, atol=2e-6, rtol=1e-4, err_msg=key)


@pytest.mark.parametrize('name', sorted(MODELS))
def test_export_round_trip(saved, tmp_path, name):
  """Ours -> a directory transformers loads with the same logits -> ours again, bit for bit."""
  model, params = load_hf(saved / name)
  save_hf(model, params, tmp_path)
  written = json.loads((tmp_path / 'config.json').read_text())
  original = json.loads((saved / name / 'config.json').read_text())
  assert written['model_type'] == original['model_type']
  assert written['architectures'] == original['architectures']
  again_model, again = load_hf(tmp_path)
  assert again_model.config == model.config
  jax.tree.map(np.testing.assert_array_equal, again, params)
  ids, positions = _batch()
  reloaded = getattr(transformers, original['architectures'][0]).from_pretrained(
    tmp_path, attn_implementation='eager'
  )
  with torch.no_grad():
    before, after = (
      _theirs(m, ids, positions).numpy() for m in (_load_hf_model(saved / name), reloaded)
    )
  np.testing.assert_array_equal(after, before)


def _hf_generate(hf_model, ids, eos_id, **options):
  with torch.no_grad():
    out = hf_model.generate(
      torch.tensor(ids),
      attention_mask=torch.tensor(VALID.astype(np.int64)),
      do_sample=False,
      max_new_tokens=8,
      eos_token_id=eos_id,
      pad_token_id=0,
      **options,
    )
  return out.numpy()[:, T:]


@pytest.mark.parametrize('name', sorted(MODELS))
def test_greedy_decoding_equals_generate(saved, name):
  """Left-padded prompts, cached decoding on both sides; the end token is one row 0 emits, so that row stops early
  and is padded while the other goes on."""
  model, params = load_hf(saved / name)
  hf_model = _load_hf_model(saved / name)
  ids, _ = _batch()
  eos_id = int(_hf_generate(hf_model, ids, None)[0, 3])
  theirs = _hf_generate(hf_model, ids, eos_id)
  with jax.default_matmul_precision('highest'):
    ours = generation.generate(
      model,
      params,
      ids,
      prompt_valid=VALID,
      max_new_tokens=8,
      temperature=0,
      eos_id=eos_id,
      pad_id=0,
    )
  # generate() stops once every row has ended; ours pads to max_new_tokens
  ours = np.asarray(ours)
  np.testing.assert_array_equal(ours[:, : theirs.shape[1]], theirs)
  assert (ours[:, theirs.shape[1] :] == 0).all()


@pytest.mark.parametrize('early_stopping', [False, True])
@pytest.mark.parametrize('name', ['llama', 'mistral', 'qwen2'])
def test_beam_search_equals_generate(saved, name, early_stopping):
  """4 beams on the left-padded batch, the end token one that greedy row 0 emits, so that hypotheses finish at
  different steps."""
  model, params = load_hf(saved / name)
  hf_model = _load_hf_model(saved / name)
  ids, _ = _batch()
  eos_id = int(_hf_generate(hf_model, ids, None)[0, 2])
  search = dict(num_beams=4, early_stopping=early_stopping, length_penalty=1.5)
  theirs = _hf_generate(hf_model, ids, eos_id, **search)
  with jax.default_matmul_precision('highest'):
    beams = generation.beam_search(
      model,
      params,
      ids,
      prompt_valid=VALID,
      max_new_tokens=8,
      beam_size=4,
      length_penalty=1.5,
      early_stopping=early_stopping,
      eos_id=eos_id,
      pad_id=0,
    )
  # transformers fills a finished beam with `pad_token_id or eos_token_id`, so with pad 0 its rows go on with the end
  # token; ours hold pad_id. Rows are compared up to their end token, and ours must be padding after it.
  for mine, hf_row in zip(np.asarray(beams.tokens[:, 0]).tolist(), theirs.tolist()):
    end = mine.index(eos_id) + 1 if eos_id in mine else len(mine)
    assert mine[:end] == hf_row[:end]
    assert all(t == 0 for t in mine[end:])


@pytest.mark.parametrize(
  'options, message',
  [
    (dict(mlp_bias=True), r'unsupported Hugging Face config options: mlp_bias=True'),
    (dict(attention_bias=True), r'unsupported Hugging Face config options: attention_bias=True'),
    (dict(head_dim=12), r'head_dim=12 is not hidden_size / num_attention_heads = 8'),
    (dict(rope_parameters=dict(rope_type='yarn', factor=2.0)), r"unsupported rope_type 'yarn'"),
  ],
  ids=['mlp_bias', 'attention_bias', 'head_dim', 'yarn'],
)
def test_configs_we_cannot_express_are_one_line_errors(options, message):
  config = transformers.LlamaConfig(**{**SHAPE, **options}).to_dict()
  state = {'model.embed_tokens.weight': np.zeros((101, 48), np.float32)}
  with pytest.raises(ConversionError, match=message) as error:
    from_llama(state, config)
  assert '\n' not in str(error.value)


def test_rope_scaling_of_older_configs_reads_as_rope_parameters():
  """Before transformers 5 the base and the scaling were top-level keys, the scaling's kind named ``type``."""
  new = dict(SHAPE, rope_parameters=dict(rope_type='linear', rope_theta=5e5, factor=2.0))
  old = dict(SHAPE, rope_theta=5e5, rope_scaling=dict(type='linear', factor=2.0))
  config = SPECS['llama'].config_from_hf(old)
  assert config == SPECS['llama'].config_from_hf(new)
  assert (config.rope_scaling, config.rope_scaling_factor, config.rope_theta) == (
    'linear',
    2.0,
    5e5,
  )


def test_qwen2_sliding_window_is_refused():
  config = transformers.Qwen2Config(**SHAPE, use_sliding_window=True, sliding_window=4).to_dict()
  with pytest.raises(ConversionError, match='use_sliding_window=True'):
    SPECS['qwen2'].config_from_hf(config)


def test_a_rotary_gpt_llama_cannot_express_is_refused_on_save(saved, tmp_path):
  """GPT-2 takes only learned positions, so a rotary GPT goes to Llama (Qwen2 with Q/K/V biases; the round trip
  checks the architectures), whose check names what it cannot express."""
  model, params = load_hf(saved / 'llama')
  bad = model.clone(config=model.config.replace(norm_type='layer_norm'))
  with pytest.raises(
    ConversionError, match="Llama cannot express this model: norm_type='layer_norm'"
  ):
    save_hf(bad, params, tmp_path)


def test_the_sliding_window_changes_the_logits(saved):
  """The window of 5 is in force: without it, the last positions of 13 see other keys."""
  model, params = load_hf(saved / 'mistral')
  assert model.config.sliding_window == 5
  ids, positions = _batch()
  unwindowed = model.clone(config=model.config.replace(sliding_window=None))
  windowed, full = (np.asarray(_ours(m, params, ids, positions)) for m in (model, unwindowed))
  np.testing.assert_allclose(
    windowed[:, :5], full[:, :5], atol=1e-6
  )  # the first 5 slots see all they can
  assert np.abs(windowed[0, 5:] - full[0, 5:]).min() > 1e-4


def test_a_mistral_without_a_window_is_saved_as_the_llama_it_is(tmp_path):
  mistral = _hf_model('mistral')
  mistral.config.sliding_window = None
  mistral.save_pretrained(tmp_path / 'mistral')
  model, params = load_hf(tmp_path / 'mistral')
  save_hf(model, params, tmp_path / 'saved')
  written = json.loads((tmp_path / 'saved' / 'config.json').read_text())
  assert (written['model_type'], written['architectures']) == ('llama', ['LlamaForCausalLM'])
  config = model.config
  assert config.sliding_window is None
  assert not SPECS['mistral'].describes(config) and SPECS['llama'].describes(config)
  windowed = config.replace(sliding_window=7)
  assert SPECS['mistral'].describes(windowed) and not SPECS['llama'].describes(windowed)
  with pytest.raises(ConversionError, match='Llama cannot express this model: sliding_window=7'):
    SPECS['llama'].hf_config(windowed, 'LlamaForCausalLM')


def test_the_llama_preset_is_llama_3_2_1b():
  """``GPTConfig.llama()`` has the 1,235,814,400 parameters transformers gives Llama 3.2 1B's shape (tied head)."""
  from transformer_jax import GPT, GPTConfig

  model = GPT(GPTConfig.llama())
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))['params']
  assert sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)) == 1_235_814_400
  assert SPECS['llama'].describes(model.config) and model.config.kv_heads == 8
