"""T5 v1.0 (ReLU, tied head rescaled by d_model ** -0.5) and v1.1 (gated GELU, a head of its own) as the Transformer
preset against transformers' T5: logits, the encoder alone, gradients, both directions of the directory format,
cached and greedy decoding, scanned layers, dtypes and the config errors. Tiny random models of odd shapes, built and
saved once per module, all offline."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import transformer_jax.nnx as tnnx  # noqa: E402
from transformer_jax import EncoderModel, Transformer, TransformerConfig, convert  # noqa: E402
from transformer_jax.convert import ConversionError  # noqa: E402
from transformer_jax.convert.engine import to_model_layout  # noqa: E402
from transformer_jax.convert.t5 import T5  # noqa: E402
from transformer_jax.generation import translate  # noqa: E402

B, S, T, V, D = 2, 7, 5, 101, 48
SRC_LENGTHS, TGT_LENGTHS = (7, 4), (5, 3)  # row 1 of each batch is right-padded
VARIANTS = ('v1_0', 'v1_1')


def hf_config(variant: str, **overrides):
  # num_decoder_layers = num_layers: transformers 5.24's T5 generate fails on unequal counts
  shape = dict(vocab_size=V, d_model=D, d_kv=16, num_heads=3, d_ff=40, num_layers=2)
  positions = dict(relative_attention_num_buckets=8, relative_attention_max_distance=20)
  ffn = 'relu' if variant == 'v1_0' else 'gated-gelu'
  head = dict(
    feed_forward_proj=ffn, tie_word_embeddings=variant == 'v1_0', decoder_start_token_id=0
  )
  other = dict(num_decoder_layers=2, dropout_rate=0.0, attn_implementation='eager')
  return transformers.T5Config(**{**shape, **positions, **head, **other, **overrides})


def hf_t5(variant: str):
  torch.manual_seed(0)
  model = transformers.T5ForConditionalGeneration(hf_config(variant)).eval()
  if variant == 'v1_1':
    # transformers 5 ties lm_head to the shared table until a checkpoint holds a different one: give it one
    with torch.no_grad():
      model.lm_head.weight = torch.nn.Parameter(torch.randn(V, D) * D**-0.5)
  return model


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """variant -> (HF model, its directory, our (model, params) loaded from it)."""
  out = {}
  for variant in VARIANTS:
    hf_model, path = hf_t5(variant), tmp_path_factory.mktemp(variant)
    hf_model.save_pretrained(path)
    out[variant] = hf_model, path, convert.load_hf(path)
  return out


def batch():
  """Right-padded source and teacher-forced target ids, each target starting with T5's start token 0 (= pad)."""
  rng = np.random.default_rng(0)
  src_valid = np.arange(S)[None] < np.array(SRC_LENGTHS)[:, None]  # (B, S)
  tgt_valid = np.arange(T)[None] < np.array(TGT_LENGTHS)[:, None]  # (B, T)
  src = np.where(src_valid, rng.integers(2, V, (B, S)), 0)
  tgt = np.where(tgt_valid, rng.integers(2, V, (B, T)), 0)
  tgt[:, 0] = 0
  return src, src_valid, tgt, tgt_valid


def hf_inputs(src, src_valid, tgt=None, tgt_valid=None) -> dict:
  masks = lambda valid: torch.as_tensor(valid.astype(np.int64))
  inputs = dict(input_ids=torch.as_tensor(src), attention_mask=masks(src_valid))
  if tgt is None:
    return inputs
  return inputs | dict(
    decoder_input_ids=torch.as_tensor(tgt), decoder_attention_mask=masks(tgt_valid)
  )


def hf_logits(hf_model, *batch):
  with torch.no_grad():
    return hf_model(**hf_inputs(*batch)).logits.numpy()


def our_logits(model, params, src, src_valid, tgt):
  """The default masks: source validity from pad_id, target padding from pad_id with the start token real."""
  forward = jax.jit(lambda p, s, t: model.apply({'params': p}, s, t))
  with jax.default_matmul_precision('highest'):
    return np.asarray(forward(params, jnp.asarray(src), jnp.asarray(tgt)))


def max_difference(got, expected, where=...):
  return float(np.abs(np.asarray(got) - np.asarray(expected))[where].max())


@pytest.mark.parametrize('variant', VARIANTS)
def test_logits_match_transformers_on_padded_batches(saved, variant):
  hf_model, _, (model, params) = saved[variant]
  cfg = model.config
  assert (cfg.tie_output, cfg.scale_decoder_output, cfg.gated_ffn) == (
    (True, True, False) if variant == 'v1_0' else (False, False, True)
  )
  src, src_valid, tgt, tgt_valid = batch()
  got = our_logits(model, params, src, src_valid, tgt)
  # only real target positions: the padded ones attend to different keys in the two masks
  assert max_difference(got, hf_logits(hf_model, *batch()), tgt_valid) < 1e-5
  nnx_model = tnnx.from_linen(
    model, params
  )  # what the converter's NNX load holds: the same numbers
  forward = nnx.jit(lambda m, s, t: m(s, t))
  with jax.default_matmul_precision('highest'):
    np.testing.assert_array_equal(forward(nnx_model, jnp.asarray(src), jnp.asarray(tgt)), got)


def test_the_encoder_alone_matches_t5_encoder_model(saved, tmp_path):
  """T5EncoderModel <-> EncoderModel both ways, and the encoder taken out of a full model is the same one."""
  _, path, (full, full_params) = saved['v1_1']
  hf_encoder = transformers.T5EncoderModel.from_pretrained(path, attn_implementation='eager').eval()
  hf_encoder.save_pretrained(tmp_path / 'hf')
  model, params = convert.load_hf(tmp_path / 'hf')
  assert isinstance(model, EncoderModel)
  src, src_valid, _, _ = batch()

  def hf_hidden(hf_model):
    with torch.no_grad():
      return hf_model(**hf_inputs(src, src_valid)).last_hidden_state.numpy()

  with jax.default_matmul_precision('highest'):
    got = model.apply({'params': params}, jnp.asarray(src))  # (B, S, D)
    memory = full.apply({'params': full_params}, jnp.asarray(src), method=Transformer.encode)
  assert got.shape == (B, S, D)
  assert max_difference(got, hf_hidden(hf_encoder)) < 1e-5
  taken = {k: full_params[k] for k in params}
  jax.tree.map(np.testing.assert_array_equal, taken, params)
  np.testing.assert_array_equal(memory, got)
  encoder = tnnx.load_hf(
    tmp_path / 'hf'
  )  # FlaxT5EncoderModel's successor in NNX: the same hidden states
  assert isinstance(encoder, tnnx.EncoderModel)
  with jax.default_matmul_precision('highest'):
    np.testing.assert_array_equal(encoder(jnp.asarray(src)), got)
  convert.save_hf(model, params, tmp_path / 'ours')
  config = json.loads((tmp_path / 'ours' / 'config.json').read_text())
  assert config['architectures'] == ['T5EncoderModel']
  reloaded = transformers.T5EncoderModel.from_pretrained(
    tmp_path / 'ours', attn_implementation='eager'
  ).eval()
  assert max_difference(hf_hidden(reloaded), hf_hidden(hf_encoder)) == 0


@pytest.mark.parametrize('variant', VARIANTS)
def test_gradients_match_torch(saved, variant):
  """d loss / d params of every parameter, for a loss that weighs each real logit differently, on the padded batch.
  Our gradients take the parameters' torch names through the converter's table."""
  hf_model, _, (model, params) = saved[variant]
  src, src_valid, tgt, tgt_valid = batch()
  weights = np.random.default_rng(1).normal(size=(B, T, V)).astype(np.float32)
  weights *= tgt_valid[..., None]

  def loss(p):
    return jnp.mean(model.apply({'params': p}, jnp.asarray(src), jnp.asarray(tgt)) * weights)

  with jax.default_matmul_precision('highest'):
    grads = convert.to_t5(model, jax.jit(jax.grad(loss))(params))
  hf_model.zero_grad()
  (hf_model(**hf_inputs(*batch())).logits * torch.as_tensor(weights)).mean().backward()
  # tied copies once: shared.weight collects all their gradients
  named = dict(hf_model.named_parameters())
  assert ('lm_head.weight' in named) == (variant == 'v1_1')
  for name, parameter in named.items():
    expected = parameter.grad.numpy()
    assert max_difference(grads[name], expected) / np.abs(expected).max() < 1e-4, name


@pytest.mark.parametrize('variant', VARIANTS)
def test_export_round_trip(saved, tmp_path, variant):
  """save_hf -> from_pretrained gives the same logits; load_hf(save_hf(load_hf(dir))) gives the same params."""
  hf_model, _, (model, params) = saved[variant]
  convert.save_hf(model, params, tmp_path)
  reloaded = transformers.T5ForConditionalGeneration.from_pretrained(
    tmp_path, attn_implementation='eager'
  ).eval()
  assert (reloaded.lm_head.weight is reloaded.shared.weight) == (variant == 'v1_0')
  assert max_difference(hf_logits(reloaded, *batch()), hf_logits(hf_model, *batch())) == 0
  again, again_params = convert.load_hf(tmp_path)
  assert again.config == model.config
  jax.tree.map(np.testing.assert_array_equal, again_params, params)
  _, direct = convert.from_t5(hf_model)  # from the module as from its directory
  jax.tree.map(np.testing.assert_array_equal, direct, params)
  if variant == 'v1_0':  # T5Model: the same names without the head
    names = set(transformers.T5Model(hf_model.config).state_dict())
    assert set(convert.to_t5(model, params, architecture='T5Model')) == names


def step_by_step(model, params, src, src_valid, tgt):
  """``decode_step`` fed one target token at a time (a cache of ``T`` slots) -> ``(B, T, V)`` logits."""
  memory = model.apply({'params': params}, src, src_valid=src_valid, method=Transformer.encode)

  def step(cache, tokens, memory, t):
    positions = jnp.full(tokens.shape, t)
    variables = {'params': params, 'cache': cache}
    kwargs = dict(positions=positions, memory_valid=src_valid, method=Transformer.decode_step)
    logits, variables = model.apply(variables, tokens, memory, **kwargs, mutable=['cache'])
    return logits, variables['cache']

  _, cache = step({}, tgt, memory, 0)  # buffers of T slots, zeroed
  cache, step = jax.tree.map(jnp.zeros_like, cache), jax.jit(step)
  logits = [step(cache, tgt[:, :1], memory, 0)]
  for t in range(1, tgt.shape[1]):
    logits.append(step(logits[-1][1], tgt[:, t : t + 1], None, t))
  return jnp.concatenate([out for out, _ in logits], axis=1)


@pytest.mark.parametrize('scan', [False, True], ids=['loop', 'scan'])
def test_cached_decoding_equals_the_full_decode(saved, scan):
  """The decoder's relative positions continue at the cache index: every step sees the bias of its position."""
  _, _, (model, params) = saved['v1_0']
  if scan:
    model, params = scanned(model, params)
  src, src_valid, tgt, _ = (jnp.asarray(x) for x in batch())
  with jax.default_matmul_precision('highest'):
    full = model.apply(
      {'params': params}, src, tgt, src_valid=src_valid, tgt_valid=jnp.ones(tgt.shape, bool)
    )
    cached = step_by_step(model, params, src, src_valid, tgt)
  assert max_difference(cached, full) < 1e-5


def test_greedy_translate_equals_hf_generate(saved):
  """Greedy decoding on the padded source batch, token for token. transformers returns the start token first and
  stops once every row has ended; translate returns max_len tokens after the start, pad (0) after a row's end. The
  random model never emits T5's eos (1), so the end token is one that row 0 emits, for a row that ends early."""
  hf_model, _, (model, params) = saved['v1_1']
  src, src_valid, _, _ = batch()
  steps = 8
  options = dict(num_beams=1, do_sample=False, max_new_tokens=steps)

  def generate(eos_id):
    with torch.no_grad():
      return hf_model.generate(**hf_inputs(src, src_valid), **options, eos_token_id=eos_id).numpy()

  eos = int(generate(1)[0, 3])
  expected = generate(eos)
  assert (expected[:, 0] == 0).all() and eos in expected[0]
  with jax.default_matmul_precision('highest'):
    got = np.asarray(
      translate(model, params, src, src_valid=src_valid, max_len=steps, bos_id=0, eos_id=eos)
    )
  produced = expected.shape[1] - 1
  assert got.shape == (B, steps)
  np.testing.assert_array_equal(got[:, :produced], expected[:, 1:])
  assert (got[:, produced:] == 0).all()  # transformers stops early only once every row has ended


def scanned(model, params):
  config = model.config.replace(scan_layers=True)
  return Transformer(config), to_model_layout(params, config)


@pytest.mark.parametrize('variant', VARIANTS)
def test_scanned_and_rematerialised_layers_give_the_same_logits(saved, variant):
  _, _, (model, params) = saved[variant]
  src, src_valid, tgt, tgt_valid = batch()
  expected = our_logits(model, params, src, src_valid, tgt)
  scan_model, scan_params = scanned(model, params)
  remat = lambda m: m.clone(config=m.config.replace(remat_policy='full'))
  for m, p in ((scan_model, scan_params), (remat(scan_model), scan_params), (remat(model), params)):
    assert max_difference(our_logits(m, p, src, src_valid, tgt), expected) < 1e-6


@pytest.mark.parametrize('stored', ['float16', 'bfloat16'])
def test_half_precision_checkpoints_load(saved, tmp_path, stored):
  hf_model, _, (model, params) = saved['v1_1']
  half = hf_t5('v1_1').to(getattr(torch, stored))
  half.save_pretrained(tmp_path)
  half_model, half_params = convert.load_hf(tmp_path)
  assert {x.dtype for x in jax.tree.leaves(half_params)} == {jnp.dtype(stored)}
  wo = half.encoder.block[1].layer[1].DenseReluDense.wo.weight.float().detach().numpy()
  ours = half_params['encoder']['layers_1']['ffn']['fc_out']['kernel']
  np.testing.assert_array_equal(np.asarray(ours, np.float32).T, wo)
  src, src_valid, tgt, tgt_valid = batch()
  logits = our_logits(half_model, half_params, src, src_valid, tgt)
  assert logits.dtype == np.float32
  assert max_difference(logits, our_logits(model, params, src, src_valid, tgt), tgt_valid) < 0.1


# ----------------------------------------------------------------------------------------------- errors


def test_a_head_dimension_other_than_d_model_over_heads_is_refused(tmp_path):
  transformers.T5ForConditionalGeneration(hf_config('v1_0', d_kv=8)).save_pretrained(tmp_path)
  with pytest.raises(ConversionError) as error:
    convert.load_hf(tmp_path)
  message = str(error.value)
  assert '\n' not in message
  assert 'd_kv=8 with num_heads=3 is an attention 24 wide, but ours is d_model=48 wide' in message


@pytest.mark.parametrize(
  'fields, message',
  [
    (dict(relative_buckets=3), 'relative_buckets must be at least 4'),
    (dict(relative_buckets=8, relative_max_distance=4), 'relative_max_distance must exceed'),
    (dict(relative_max_distance=20.5), 'must be integers'),
    (dict(attention_scale=0.0), 'attention_scale must be positive'),
    (dict(decoder_start_id=V), f'decoder_start_id={V} is outside the target vocabulary'),
    (dict(position_encoding='relativ'), 'position_encoding must be one of'),
  ],
  ids=['few_buckets', 'short_distance', 'float_distance', 'zero_scale', 'start_id', 'typo'],
)
def test_invalid_fields_are_refused(fields, message):
  with pytest.raises(ValueError, match=message):
    TransformerConfig.t5(src_vocab_size=V, tgt_vocab_size=V, **fields)


def test_what_t5_cannot_express_is_refused():
  config = TransformerConfig.t5_v1_1(
    src_vocab_size=V, tgt_vocab_size=V, d_model=D, num_heads=3, d_ff=40, num_layers=1
  )
  T5.hf_config(config, 'T5ForConditionalGeneration')
  with pytest.raises(ConversionError, match='T5 cannot express') as error:
    T5.hf_config(config.replace(use_bias=True, num_kv_heads=1, embed_norm=True), 'T5Model')
  for field in ('use_bias=True', 'grouped_query=True', 'embed_norm=True'):
    assert field in str(error.value)
  with pytest.raises(ConversionError, match='the exact GELU'):
    T5.hf_config(config.replace(activation='gelu'), 'T5ForConditionalGeneration')
  with pytest.raises(ConversionError, match='T5Model has no head'):
    T5.table(config, 'T5Model')
  with pytest.raises(ConversionError, match="does not export as 'T5EncoderModel'"):
    convert.to_t5(Transformer(config), {}, architecture='T5EncoderModel')
