"""BART and Marian from Hugging Face: forward and gradient parity on padded batches, both export paths, dtypes,
greedy and beam decoding against ``generate``, fine-tuning, and the conversion errors. Tiny random models of odd
shape (2 encoder and 3 decoder layers, d_model 48, 3 heads, vocabularies 101 and 97) are saved to temp dirs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import transformer_jax.nnx as tnnx  # noqa: E402
from transformer_jax import generation  # noqa: E402
from transformer_jax.convert import ConversionError, load_hf, save_hf  # noqa: E402
from transformer_jax.convert.bart import (  # noqa: E402
  BART,
  MARIAN,
  from_bart,
  from_marian,
  to_bart,
  to_marian,
)
from transformer_jax.convert.engine import export_state  # noqa: E402
from transformer_jax.generation_config import read_generation_config, translate_options  # noqa: E402

SHAPE = dict(
  d_model=48,
  encoder_layers=2,
  decoder_layers=3,
  encoder_attention_heads=3,
  decoder_attention_heads=3,
  encoder_ffn_dim=40,
  decoder_ffn_dim=40,
  max_position_embeddings=64,
  dropout=0.0,
  attention_dropout=0.0,
)
# name -> (class, config); each is saved once per module
MODELS = {
  'bart': (
    transformers.BartForConditionalGeneration,
    transformers.BartConfig(vocab_size=101, **SHAPE),
  ),
  'bart_scaled': (
    transformers.BartForConditionalGeneration,
    transformers.BartConfig(
      vocab_size=101, scale_embedding=True, activation_function='relu', **SHAPE
    ),
  ),
  'bart_base': (transformers.BartModel, transformers.BartConfig(vocab_size=101, **SHAPE)),
  'marian': (
    transformers.MarianMTModel,
    transformers.MarianConfig(
      vocab_size=101,
      pad_token_id=100,
      decoder_start_token_id=100,
      eos_token_id=0,
      scale_embedding=True,
      activation_function='gelu',
      **SHAPE,
    ),
  ),
  # separate vocabularies and an untied head
  'marian_untied': (
    transformers.MarianMTModel,
    transformers.MarianConfig(
      vocab_size=101,
      decoder_vocab_size=97,
      share_encoder_decoder_embeddings=False,
      tie_word_embeddings=False,
      pad_token_id=96,
      decoder_start_token_id=96,
      eos_token_id=0,
      scale_embedding=True,
      **SHAPE,
    ),
  ),
}
HEADED = ['bart', 'bart_scaled', 'marian', 'marian_untied']
EOS_BOOST = {'bart': 1.0, 'marian': 2.0}


def _perturbed(model):
  """Weights far from init (norms not 1/0, a non-zero final_logits_bias), so that a swapped or skipped weight
  shows."""
  torch.manual_seed(1)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
    if hasattr(model, 'final_logits_bias'):
      model.final_logits_bias.normal_(0.0, 0.5)
  return model.eval()


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  root = tmp_path_factory.mktemp('seq2seq')
  for name, (cls, config) in MODELS.items():
    torch.manual_seed(0)
    model = _perturbed(cls(config))
    if hasattr(model, 'final_logits_bias'):
      # ends likely enough that hypotheses finish at different steps
      with torch.no_grad():
        model.final_logits_bias[0, config.eos_token_id] += EOS_BOOST[name.split('_')[0]]
    model.save_pretrained(root / name)
  return root


def _hf(saved, name):
  return MODELS[name][0].from_pretrained(saved / name, attn_implementation='eager').eval()


def _batch(cfg):
  """A padded source batch (S=7) and target batch (T=5) with their validity."""
  src_pad = cfg.pad_id
  src = np.array([[5, 6, 7, 8, 9, 10, 0], [11, 12, 13, 0, src_pad, src_pad, src_pad]])
  tgt = np.array([[cfg.pad_id, 3, 4, 5, 6], [cfg.pad_id, 7, 8, 9, 9]])
  tgt_valid = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)
  return src, src != src_pad, tgt, tgt_valid


def _theirs(hf_model, src, src_valid, tgt, tgt_valid):
  out = hf_model(
    input_ids=torch.tensor(src),
    attention_mask=torch.tensor(src_valid.astype(np.int64)),
    decoder_input_ids=torch.tensor(tgt),
    decoder_attention_mask=torch.tensor(tgt_valid.astype(np.int64)),
  )
  return out


def _ours(model, params, src, src_valid, tgt, tgt_valid):
  with jax.default_matmul_precision('highest'):
    return np.asarray(
      model.apply({'params': params}, src, tgt, src_valid=src_valid, tgt_valid=tgt_valid)
    )


@pytest.mark.parametrize('name', HEADED)
def test_logits_match_transformers_on_padded_batches(saved, name):
  model, params = load_hf(saved / name)
  batch = _batch(model.config)
  with torch.no_grad():
    theirs = _theirs(_hf(saved, name), *batch).logits.numpy()
  real = batch[3]  # padded target positions predict nothing
  ours = _ours(model, params, *batch)
  np.testing.assert_allclose(ours[real], theirs[real], atol=1e-5)
  src, src_valid, tgt, tgt_valid = batch
  nnx_model = tnnx.load_hf(saved / name)  # the converter's NNX model: the same numbers
  with jax.default_matmul_precision('highest'):
    np.testing.assert_array_equal(
      nnx_model(src, tgt, src_valid=src_valid, tgt_valid=tgt_valid), ours
    )


def test_what_each_format_becomes(saved):
  cfg = {name: load_hf(saved / name)[0].config for name in MODELS}
  assert (cfg['bart'].position_encoding, cfg['bart'].position_offset) == ('learned', 2)
  assert cfg['bart'].embed_norm and cfg['bart'].share_embeddings and cfg['bart'].tie_output
  assert not cfg['bart'].scale_embeddings and cfg['bart_scaled'].scale_embeddings
  assert cfg['bart'].output_bias and not cfg['bart_base'].output_bias
  assert cfg['marian'].position_encoding == 'sinusoidal_concat' and not cfg['marian'].embed_norm
  assert (cfg['marian'].num_layers, cfg['marian'].decoder_layers, cfg['marian'].pad_id) == (
    2,
    3,
    100,
  )
  untied = cfg['marian_untied']
  assert (untied.src_vocab_size, untied.tgt_vocab_size) == (101, 97)
  assert not (untied.share_embeddings or untied.tie_output)


def test_bart_model_gives_the_hidden_states(saved):
  """``BartModel`` has no head: our encoder output is its ``encoder_last_hidden_state``, and our logits are its
  decoder states against the shared table."""
  model, params = load_hf(saved / 'bart_base')
  src, src_valid, tgt, tgt_valid = _batch(model.config)
  hf_model = _hf(saved, 'bart_base')
  with torch.no_grad():
    out = _theirs(hf_model, src, src_valid, tgt, tgt_valid)
    logits = out.last_hidden_state @ hf_model.shared.weight.T
  with jax.default_matmul_precision('highest'):
    memory = model.apply({'params': params}, src, src_valid=src_valid, method='encode')
  real = src_valid
  np.testing.assert_allclose(
    np.asarray(memory)[real], out.encoder_last_hidden_state.numpy()[real], atol=1e-5
  )
  ours = _ours(model, params, src, src_valid, tgt, tgt_valid)
  np.testing.assert_allclose(ours[tgt_valid], logits.numpy()[tgt_valid], atol=1e-5)


def _loss(logits, labels, valid):
  logp = jax.nn.log_softmax(logits)
  nll = -jnp.take_along_axis(logp, labels[..., None], -1)[..., 0]
  return (nll * valid).sum() / valid.sum()


@pytest.mark.parametrize('name', ['bart', 'marian_untied'])
def test_gradients_match_transformers(saved, name):
  """Every parameter's gradient of the same loss, ours exported under transformers' names."""
  model, params = load_hf(saved / name)
  src, src_valid, tgt, tgt_valid = _batch(model.config)
  labels = np.roll(tgt, -1, axis=1) % model.config.tgt_vocab_size

  def loss(p):
    logits = model.apply({'params': p}, src, tgt, src_valid=src_valid, tgt_valid=tgt_valid)
    return _loss(logits, labels, tgt_valid)

  with jax.default_matmul_precision('highest'):
    grads = jax.grad(loss)(params)
  spec = BART if name.startswith('bart') else MARIAN
  ours = export_state(model, grads, spec.table(model.config, spec.architecture_of(model)))

  hf_model = _hf(saved, name)
  out = _theirs(hf_model, src, src_valid, tgt, tgt_valid)
  logp = torch.log_softmax(out.logits, -1)
  nll = -logp.gather(-1, torch.tensor(labels)[..., None])[..., 0]
  valid = torch.tensor(tgt_valid, dtype=torch.float32)
  ((nll * valid).sum() / valid.sum()).backward()
  # Marian's sinusoid tables take gradients in torch, but are neither saved nor ours to train
  theirs = {n: p.grad.numpy() for n, p in hf_model.named_parameters() if 'embed_positions' not in n}
  assert set(theirs) <= set(ours)
  for key, grad in theirs.items():
    np.testing.assert_allclose(ours[key], grad, atol=2e-6, rtol=1e-4, err_msg=key)


@pytest.mark.parametrize('name', ['bart', 'bart_base', 'marian', 'marian_untied'])
def test_export_round_trip(saved, tmp_path, name):
  """Ours -> a directory transformers loads with the same logits -> ours again, bit for bit."""
  model, params = load_hf(saved / name)
  save_hf(model, params, tmp_path)
  config = json.loads((tmp_path / 'config.json').read_text())
  assert config['model_type'] == ('bart' if name.startswith('bart') else 'marian')
  again_model, again = load_hf(tmp_path)
  assert again_model.config == model.config
  jax.tree.map(np.testing.assert_array_equal, again, params)
  hf_model = _hf(saved, name)
  reloaded = type(hf_model).from_pretrained(tmp_path, attn_implementation='eager').eval()
  batch = _batch(model.config)
  with torch.no_grad():
    before, after = (_theirs(m, *batch)[0].numpy() for m in (hf_model, reloaded))
  np.testing.assert_array_equal(after, before)


def test_state_dicts_of_modules_convert_and_export_alike(saved):
  """``from_pretrained`` modules (tied copies and sinusoid tables included) and our ``to_*`` state dicts."""
  for name, from_hf, to_hf in (('bart', from_bart, to_bart), ('marian', from_marian, to_marian)):
    hf_model = _hf(saved, name)
    model, params = from_hf(hf_model)
    state = to_hf(model, params, as_torch=True)
    theirs = hf_model.state_dict()
    # every tensor comes back equal, tied copies included; only the sinusoid tables are not ours to export
    assert sorted(k for k in theirs if k not in state) == (
      [] if name == 'bart' else sorted(k for k in theirs if 'embed_positions' in k)
    )
    for key, tensor in state.items():
      np.testing.assert_array_equal(tensor.numpy(), theirs[key].numpy(), err_msg=key)


@pytest.mark.parametrize('dtype', ['bfloat16', 'float16'])
def test_half_precision_checkpoints_load_in_their_dtype(saved, tmp_path, dtype):
  hf_model = _hf(saved, 'bart').to(getattr(torch, dtype))
  hf_model.save_pretrained(tmp_path)
  _, params = load_hf(tmp_path)
  leaves = jax.tree.leaves(params)
  assert {leaf.dtype for leaf in leaves} == {jnp.dtype(dtype)}
  shared = hf_model.model.shared.weight.detach().float().numpy()
  np.testing.assert_array_equal(np.asarray(params['source_embed']['embedding'], np.float32), shared)


def _generate(hf_model, src, src_valid, **options):
  with torch.no_grad():
    out = hf_model.generate(
      input_ids=torch.tensor(src),
      attention_mask=torch.tensor(src_valid.astype(np.int64)),
      do_sample=False,
      **options,
    )
  return out.numpy()[:, 1:]  # after the start token


# generate() settings, each decoded by both sides from the checkpoint's generation_config.json plus these
GREEDY = {
  'plain': {},
  'min_length': {'min_length': 5},
  'no_repeat_ngram': {'no_repeat_ngram_size': 2},
  'bad_words': {'bad_words_ids': [[73], [98, 98], [5, 6, 7]]},
  'forced_bos': {'forced_bos_token_id': 5},
  'forced_eos': {'forced_eos_token_id': 'eos'},
}
BEAMS = {
  'early_stopping': {'early_stopping': True},
  'heuristic_stop': {'early_stopping': False},
  'never_stop': {'early_stopping': 'never'},
  'long_penalty': {'early_stopping': False, 'length_penalty': 2.0},
  'short_penalty': {'early_stopping': True, 'length_penalty': 0.5},
  'constrained': {'min_length': 4, 'no_repeat_ngram_size': 2, 'bad_words_ids': [[73]]},
  'forced_ends': {'forced_bos_token_id': 5, 'forced_eos_token_id': 'eos', 'early_stopping': True},
}
CASES = [(n, 1, c) for n, c in GREEDY.items()] + [(n, 4, c) for n, c in BEAMS.items()]


@pytest.mark.parametrize('name', ['bart', 'marian'])
@pytest.mark.parametrize('case, beams, settings', CASES, ids=[c[0] for c in CASES])
def test_decoding_equals_generate(saved, name, case, beams, settings):
  """Padded sources, 10 new tokens; ours take the settings through translate_options, as a user would."""
  model, params = load_hf(saved / name)
  hf_model = _hf(saved, name)
  src, src_valid, _, _ = _batch(model.config)
  eos = hf_model.config.eos_token_id
  settings = {k: eos if v == 'eos' else v for k, v in settings.items()}
  settings = {'num_beams': beams, 'max_new_tokens': 10, 'forced_eos_token_id': None, **settings}
  theirs = _generate(hf_model, src, src_valid, **settings)
  options = translate_options(read_generation_config(saved / name), **settings)
  ours = np.asarray(generation.translate(model, params, src, src_valid=src_valid, **options))
  np.testing.assert_array_equal(ours[:, : theirs.shape[1]], theirs)
  assert np.all(ours[:, theirs.shape[1] :] == options['pad_id'])  # transformers trims the padding


def test_generation_config_becomes_translate_options(saved):
  options = translate_options(read_generation_config(saved / 'marian'))
  assert options == dict(
    max_len=20,  # generate()'s default of 20 new tokens
    bos_id=100,
    eos_id=0,
    pad_id=100,
    beam_size=1,
    length_penalty=1.0,
    early_stopping=False,
    no_repeat_ngram_size=0,
    min_new_tokens=0,
    bad_words_ids=None,
    forced_bos_id=None,
    forced_eos_id=0,
  )
  assert translate_options(read_generation_config(saved / 'marian'), max_length=12)['max_len'] == 11
  with pytest.raises(ValueError, match='unsupported generation settings: repetition_penalty=1.3'):
    translate_options({}, repetition_penalty=1.3)
  with pytest.raises(ValueError, match='lack decoder_start_token_id'):
    translate_options({'eos_token_id': 2})


def test_fine_tuning_lowers_the_loss(saved):
  """Twenty AdamW steps on one batch of the loaded Marian, with dropout on."""
  model, params = load_hf(saved / 'marian')
  src, src_valid, tgt, tgt_valid = _batch(model.config)
  labels = np.roll(tgt, -1, axis=1)
  optimizer = optax.adamw(3e-3)

  @jax.jit
  def step(params, opt_state, rng):
    def loss(p):
      logits = model.apply(
        {'params': p},
        src,
        tgt,
        src_valid=src_valid,
        tgt_valid=tgt_valid,
        deterministic=False,
        rngs={'dropout': rng},
      )
      return _loss(logits, labels, tgt_valid)

    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  opt_state, losses = optimizer.init(params), []
  for i in range(20):
    params, opt_state, value = step(params, opt_state, jax.random.PRNGKey(i))
    losses.append(float(value))
  assert losses[-1] < 0.5 * losses[0], losses


def test_unequal_stacks_are_one_clear_error(saved, tmp_path):
  config = json.loads((saved / 'bart' / 'config.json').read_text())
  (tmp_path / 'config.json').write_text(json.dumps({**config, 'decoder_ffn_dim': 44}))
  (tmp_path / 'model.safetensors').symlink_to(saved / 'bart' / 'model.safetensors')
  with pytest.raises(ConversionError, match='encoder_ffn_dim=40 but decoder_ffn_dim=44'):
    load_hf(tmp_path)


def test_a_model_neither_format_expresses_is_refused(saved):
  model, params = load_hf(saved / 'marian')
  pre_norm = type(model)(model.config.replace(pre_norm=True, final_norm=True))
  with pytest.raises(ConversionError, match='Marian cannot express this model: pre_norm=True'):
    save_hf(pre_norm, params, '/nonexistent')
  other = type(model)(model.config.replace(position_encoding='sinusoidal'))
  with pytest.raises(ConversionError, match='no Hugging Face format for this Transformer'):
    save_hf(other, params, '/nonexistent')
