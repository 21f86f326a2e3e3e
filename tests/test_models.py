"""The three model families: shapes, parameter counts, causality, padding, dtypes, scan/remat, bad input."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax import (
  BERT,
  GPT,
  BERTConfig,
  BERTForMaskedLM,
  BERTForSequenceClassification,
  GPTConfig,
  Transformer,
  TransformerConfig,
)
from transformer_jax.modules import TokenEmbedding, stack_layers

B, T, S, H, K, F, L = 2, 5, 7, 3, 4, 20, 2
D = H * K
SRC_V, TGT_V, V = 31, 37, 41
TINY = dict(
  num_layers=L,
  d_model=D,
  num_heads=H,
  d_ff=F,
  max_len=16,
  dropout_rate=0.1,
  attention_dropout_rate=0.1,
)


def tiny_transformer(**kw):
  return TransformerConfig(**{**TINY, 'src_vocab_size': SRC_V, 'tgt_vocab_size': TGT_V, **kw})


def tiny_gpt(**kw):
  return GPTConfig(**{**TINY, 'vocab_size': V, **kw})


def tiny_bert(**kw):
  return BERTConfig(**{**TINY, 'vocab_size': V, 'num_labels': 3, **kw})


def ids_of(shape, vocab, seed, low=1):
  return jax.random.randint(jax.random.key(seed), shape, low, vocab)


SRC = ids_of((B, S), SRC_V, 1).at[0, 4:].set(0)  # row 0 padded after 4 tokens
TGT = ids_of((B, T), TGT_V, 2).at[1, 3:].set(0)  # row 1 padded after 3 tokens
IDS = ids_of((B, T), V, 3)


def n_params(params):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def shapes_of(model, *args):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), *args))['params']


def init(model, *args):
  """Variables from a compiled ``init`` (eager init dispatches op by op and is many times slower)."""
  return jax.jit(model.init)(jax.random.key(0), *args)


# ---------------------------------------------------------------- closed-form parameter counts


def layer_count(cfg, cross: bool):
  d, f = cfg.d_model, cfg.d_ff
  attention = 3 * d * d + (3 * d if cfg.qkv_bias else 0) + d * d + d
  ffn = d * f + f + f * d + d
  norms = (3 if cross else 2) * 2 * d
  return attention * (2 if cross else 1) + ffn + norms


def transformer_count(cfg):
  d = cfg.d_model
  embed = cfg.src_vocab_size * d + (0 if cfg.share_embeddings else cfg.tgt_vocab_size * d)
  positions = 2 * cfg.max_len * d if cfg.position_encoding == 'learned' else 0
  final = 2 * 2 * d if cfg.final_norm else 0
  out = (0 if cfg.tie_output else cfg.tgt_vocab_size * d) + (
    cfg.tgt_vocab_size if cfg.output_bias else 0
  )
  return (
    embed
    + positions
    + cfg.num_layers * layer_count(cfg, False)
    + cfg.decoder_layers * layer_count(cfg, True)
    + final
    + out
  )


def gpt_count(cfg):
  d = cfg.d_model
  out = (0 if cfg.tie_output else cfg.vocab_size * d) + (cfg.vocab_size if cfg.output_bias else 0)
  return (
    cfg.vocab_size * d + cfg.max_len * d + cfg.num_layers * layer_count(cfg, False) + 2 * d + out
  )


def bert_count(cfg, pooler=True):
  d = cfg.d_model
  embed = (cfg.vocab_size + cfg.max_len + cfg.type_vocab_size) * d + 2 * d
  return embed + cfg.num_layers * layer_count(cfg, False) + (d * d + d if pooler else 0)


@pytest.mark.parametrize(
  'cfg',
  [
    tiny_transformer(),
    tiny_transformer(
      share_embeddings=True, src_vocab_size=TGT_V, tie_output=True, output_bias=False
    ),
    tiny_transformer(
      position_encoding='learned', final_norm=True, num_decoder_layers=3, qkv_bias=False
    ),
  ],
  ids=['separate', 'shared_tied', 'learned_final_norm_3dec'],
)
def test_transformer_parameter_count(cfg):
  src = SRC if cfg.src_vocab_size == SRC_V else SRC % TGT_V
  assert n_params(shapes_of(Transformer(cfg), src, TGT)) == transformer_count(cfg)


@pytest.mark.parametrize(
  'cfg', [tiny_gpt(), GPTConfig.course(vocab_size=V, **TINY)], ids=['gpt2_style', 'course']
)
def test_gpt_parameter_count(cfg):
  assert n_params(shapes_of(GPT(cfg), IDS)) == gpt_count(cfg)


def test_gpt2_small_has_124_439_808_parameters():
  cfg = GPTConfig.gpt2('small')
  count = n_params(shapes_of(GPT(cfg), jnp.zeros((1, 4), jnp.int32)))
  assert count == gpt_count(cfg) == 124_439_808


def test_bert_parameter_counts():
  cfg = tiny_bert()
  assert n_params(shapes_of(BERT(cfg), IDS)) == bert_count(cfg)
  mlm = shapes_of(BERTForMaskedLM(cfg), IDS)
  assert n_params(mlm) == bert_count(cfg, pooler=False) + D * D + D + 2 * D + V
  cls = shapes_of(BERTForSequenceClassification(cfg), IDS)
  assert n_params(cls) == bert_count(cfg) + D * 3 + 3
  base = BERTConfig.base()
  assert (
    n_params(shapes_of(BERT(base), jnp.zeros((1, 4), jnp.int32))) == bert_count(base) == 109_482_240
  )


# ---------------------------------------------------------------- shapes and dtypes


def init_apply(model, *args):
  variables = init(model, *args)
  return variables, jax.jit(model.apply)(variables, *args)


def test_output_shapes():
  variables, logits = init_apply(Transformer(tiny_transformer()), SRC, TGT)
  assert logits.shape == (B, T, TGT_V) and logits.dtype == jnp.float32
  memory = Transformer(tiny_transformer()).apply(variables, SRC, method=Transformer.encode)
  assert memory.shape == (B, S, D)
  _, logits = init_apply(GPT(tiny_gpt()), IDS)
  assert logits.shape == (B, T, V)
  _, (seq, pooled) = init_apply(BERT(tiny_bert()), IDS)
  assert seq.shape == (B, T, D) and pooled.shape == (B, D)
  _, mlm = init_apply(BERTForMaskedLM(tiny_bert()), IDS)
  assert mlm.shape == (B, T, V)
  _, cls = init_apply(BERTForSequenceClassification(tiny_bert()), IDS)
  assert cls.shape == (B, 3)


@pytest.mark.parametrize('family', ['transformer', 'gpt', 'bert_mlm'])
def test_bf16_compute_keeps_float32_params_and_logits(family):
  model, args = {
    'transformer': (lambda c: Transformer(tiny_transformer(**c)), (SRC, TGT)),
    'gpt': (lambda c: GPT(tiny_gpt(**c)), (IDS,)),
    'bert_mlm': (lambda c: BERTForMaskedLM(tiny_bert(**c)), (IDS,)),
  }[family]
  full = model({})
  half = model({'dtype': 'bfloat16'})
  variables = init(full, *args)
  half_variables = init(half, *args)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(half_variables))
  out32, out16 = full.apply(variables, *args), half.apply(variables, *args)
  assert out16.dtype == jnp.float32
  np.testing.assert_allclose(out16, out32, atol=0.15)  # bf16 has ~3 significant digits
  assert not np.allclose(out16, out32, atol=1e-6)  # and really computed in bf16


def test_bf16_param_storage():
  cfg = tiny_gpt(param_dtype='bfloat16', dtype='bfloat16')
  variables = init(GPT(cfg), IDS)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(variables))
  assert GPT(cfg).apply(variables, IDS).dtype == jnp.float32


def test_jit_and_eager_agree():
  model = Transformer(tiny_transformer())
  variables = init(model, SRC, TGT)
  np.testing.assert_allclose(
    jax.jit(model.apply)(variables, SRC, TGT), model.apply(variables, SRC, TGT), atol=1e-6
  )


# ---------------------------------------------------------------- causality and padding


def embedding_gradient(model, variables, embed_name, args, reduce, shape):
  """d reduce(model output) / d (output of the TokenEmbedding named ``embed_name``), of ``shape``."""

  def reduced(delta):
    def add_delta(next_fun, fargs, fkwargs, context):
      out = next_fun(*fargs, **fkwargs)
      if (
        isinstance(context.module, TokenEmbedding)
        and context.module.name == embed_name
        and context.method_name == '__call__'
      ):
        return out + delta
      return out

    with nn.intercept_methods(add_delta):
      return reduce(model.apply(variables, *args))

  return np.asarray(jax.jit(jax.grad(reduced))(jnp.zeros(shape)))


@pytest.mark.parametrize('family', ['gpt', 'transformer_decoder'])
def test_causality_through_gradients(family):
  if family == 'gpt':
    model, args, name = GPT(tiny_gpt()), (IDS,), 'token_embed'
  else:  # an unpadded target, so every past position is a real token
    model, args, name = (
      Transformer(tiny_transformer()),
      (SRC, ids_of((B, T), TGT_V, 4)),
      'target_embed',
    )
  variables = init(model, *args)
  for t in range(T):
    grad = embedding_gradient(
      model, variables, name, args, lambda out, t=t: out[:, t].sum(), (B, T, D)
    )
    assert np.all(grad[:, t + 1 :] == 0), f'position {t} sees the future'
    assert np.all(np.abs(grad[:, : t + 1]).sum(-1) > 0), f'position {t} ignores its past'


def test_encoder_sees_every_real_source_token_and_no_padding():
  model = Transformer(tiny_transformer())
  variables = init(model, SRC, TGT)
  grad = embedding_gradient(model, variables, 'source_embed', (SRC, TGT), jnp.sum, (B, S, D))
  real = np.asarray(SRC != 0)
  assert np.all(np.abs(grad).sum(-1)[real] > 0)
  assert np.all(grad[~real] == 0), 'padded source tokens influence the output'


@pytest.mark.parametrize('family', ['gpt', 'transformer'])
def test_prefix_outputs_do_not_depend_on_later_tokens(family):
  if family == 'gpt':
    model = GPT(tiny_gpt())
    variables = init(model, IDS)
    full, prefix = jax.jit(model.apply)(variables, IDS), jax.jit(model.apply)(variables, IDS[:, :3])
  else:
    model = Transformer(tiny_transformer())
    tgt = ids_of((B, T), TGT_V, 5)
    variables = init(model, SRC, tgt)
    full, prefix = (
      jax.jit(model.apply)(variables, SRC, tgt),
      jax.jit(model.apply)(variables, SRC, tgt[:, :3]),
    )
  np.testing.assert_allclose(full[:, :3], prefix, atol=1e-5)


def test_transformer_padding_does_not_change_outputs():
  model = Transformer(tiny_transformer())
  variables = init(model, SRC, TGT)
  base = jax.jit(model.apply)(variables, SRC, TGT)
  more_src = jnp.pad(SRC, ((0, 0), (0, 3)))
  more_tgt = jnp.pad(TGT, ((0, 0), (0, 2)))
  padded = jax.jit(model.apply)(variables, more_src, more_tgt)
  real = np.asarray(TGT != 0)
  np.testing.assert_allclose(np.asarray(padded[:, :T])[real], np.asarray(base)[real], atol=1e-5)


def test_gpt_left_padding_with_shifted_positions_equals_unpadded():
  model = GPT(tiny_gpt())
  variables = init(model, IDS)
  base = jax.jit(model.apply)(variables, IDS)
  padded = jnp.concatenate([jnp.zeros((B, 2), IDS.dtype), IDS], axis=1)
  valid = jnp.arange(T + 2)[None, :] >= 2
  positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
  out = jax.jit(model.apply)(
    variables, padded, valid=jnp.broadcast_to(valid, padded.shape), positions=positions
  )
  np.testing.assert_allclose(out[:, 2:], base, atol=1e-5)


@pytest.mark.parametrize('head', ['bert', 'bert_mlm', 'bert_cls'])
def test_bert_padding_does_not_change_outputs(head):
  model = {'bert': BERT, 'bert_mlm': BERTForMaskedLM, 'bert_cls': BERTForSequenceClassification}[
    head
  ](tiny_bert())
  variables = init(model, IDS)
  base = jax.jit(model.apply)(variables, IDS)
  padded = jax.jit(model.apply)(variables, jnp.pad(IDS, ((0, 0), (0, 4))))
  if head == 'bert':
    np.testing.assert_allclose(padded[0][:, :T], base[0], atol=1e-5)
    np.testing.assert_allclose(padded[1], base[1], atol=1e-5)
  elif head == 'bert_mlm':
    np.testing.assert_allclose(padded[:, :T], base, atol=1e-5)
  else:
    np.testing.assert_allclose(padded, base, atol=1e-5)


def test_bert_token_types_matter():
  model = BERT(tiny_bert())
  variables = init(model, IDS)
  a = jax.jit(model.apply)(variables, IDS)[0]
  b = jax.jit(model.apply)(variables, IDS, token_type_ids=jnp.ones_like(IDS))[0]
  assert not np.allclose(a, b)


# ---------------------------------------------------------------- scan, remat, dropout


def to_scan_layout(params, stacks):
  """Loop-layout params -> scan layout for the stacks named in ``stacks`` (name -> number of layers)."""
  return {k: stack_layers(v, stacks[k]) if k in stacks else v for k, v in params.items()}


@pytest.mark.parametrize(
  'variant',
  [dict(scan_layers=True), dict(remat_policy='full'), dict(remat_policy='dots', scan_layers=True)],
  ids=['scan', 'remat', 'scan_remat_dots'],
)
@pytest.mark.parametrize('family', ['transformer', 'gpt'])
def test_scan_and_remat_equal_the_plain_stack(family, variant):
  if family == 'transformer':
    make, args, stacks = (
      (lambda **c: Transformer(tiny_transformer(**c))),
      (SRC, TGT),
      {'encoder': L, 'decoder': L},
    )
  else:
    make, args, stacks = (lambda **c: GPT(tiny_gpt(**c))), (IDS,), {'decoder': L}
  plain = make()
  params = init(plain, *args)['params']
  other = make(**variant)
  other_params = to_scan_layout(params, stacks) if variant.get('scan_layers') else params
  assert jax.tree.map(jnp.shape, shapes_of(other, *args)) == jax.tree.map(jnp.shape, other_params)
  np.testing.assert_allclose(
    jax.jit(other.apply)({'params': other_params}, *args),
    jax.jit(plain.apply)({'params': params}, *args),
    atol=1e-5,
  )
  loss = lambda m: lambda p: jnp.mean(m.apply({'params': p}, *args) ** 2)  # noqa: E731
  g_plain = jax.jit(jax.grad(loss(plain)))(params)
  g_other = jax.jit(jax.grad(loss(other)))(other_params)
  expected = to_scan_layout(g_plain, stacks) if variant.get('scan_layers') else g_plain
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), g_other, expected)


def test_dropout_is_off_when_deterministic_and_reproducible_from_the_rng():
  model = GPT(tiny_gpt(dropout_rate=0.3, attention_dropout_rate=0.3))
  variables = init(model, IDS)
  det_a = model.apply(variables, IDS, rngs={'dropout': jax.random.key(1)})
  det_b = model.apply(variables, IDS, rngs={'dropout': jax.random.key(2)})
  np.testing.assert_array_equal(det_a, det_b)
  train = lambda seed: model.apply(
    variables,
    IDS,
    deterministic=False,  # noqa: E731
    rngs={'dropout': jax.random.key(seed)},
  )
  np.testing.assert_array_equal(train(1), train(1))
  assert not np.allclose(train(1), train(2))
  assert not np.allclose(train(1), det_a)


# ---------------------------------------------------------------- bad input


def test_out_of_range_token_ids_are_named():
  gpt = GPT(tiny_gpt())
  variables = init(gpt, IDS)
  with pytest.raises(ValueError, match=rf'out of range.*\[{V}\].*\[0, {V}\)'):
    gpt.apply(variables, IDS.at[0, 2].set(V))
  model = Transformer(tiny_transformer())
  variables = init(model, SRC, TGT)
  with pytest.raises(ValueError, match=rf'out of range.*\[0, {TGT_V}\)'):
    model.apply(variables, SRC, TGT.at[0, 0].set(TGT_V + 3))
  with pytest.raises(ValueError, match='out of range.*-1'):
    model.apply(variables, SRC.at[1, 1].set(-1), TGT)
  bert = BERT(tiny_bert())
  variables = init(bert, IDS)
  with pytest.raises(ValueError, match=r'out of range.*\[0, 2\)'):
    bert.apply(variables, IDS, token_type_ids=jnp.full_like(IDS, 2))


def test_bad_ids_under_jit_give_nan_not_plausible_logits():
  gpt = GPT(tiny_gpt())
  variables = init(gpt, IDS)
  out = jax.jit(gpt.apply)(variables, IDS.at[0, 2].set(V + 5))
  assert np.isnan(np.asarray(out)[0, 2:]).all()


@pytest.mark.parametrize('family', ['gpt', 'transformer_source', 'transformer_target', 'bert'])
def test_sequence_longer_than_max_len_is_rejected(family):
  long = ids_of((B, 17), 10, 7)
  with pytest.raises(ValueError, match='length 17 exceeds the model maximum max_len=16'):
    if family == 'gpt':
      init(GPT(tiny_gpt()), long)
    elif family == 'bert':
      init(BERT(tiny_bert()), long)
    elif family == 'transformer_source':
      init(Transformer(tiny_transformer()), long, TGT)
    else:
      init(Transformer(tiny_transformer()), SRC, long)


def test_validity_mask_of_wrong_shape_is_rejected():
  gpt = GPT(tiny_gpt())
  variables = init(gpt, IDS)
  with pytest.raises(ValueError, match=r'validity mask has shape \(2, 4\), expected \(2, 5\)'):
    gpt.apply(variables, IDS, valid=jnp.ones((B, T - 1), bool))
  model = Transformer(tiny_transformer())
  variables = init(model, SRC, TGT)
  with pytest.raises(ValueError, match='source validity mask'):
    model.apply(variables, SRC, TGT, src_valid=jnp.ones((B, S + 1), bool))


def test_ids_must_be_two_dimensional():
  with pytest.raises(ValueError, match=r'must have shape \(B, T\)'):
    init(GPT(tiny_gpt()), IDS[0])


@pytest.mark.parametrize(
  'make,message',
  [
    (lambda: tiny_gpt(d_model=14), 'd_model=14 is not divisible by num_heads=3'),
    (lambda: tiny_gpt(num_layers=0), 'num_layers must be a positive integer'),
    (lambda: tiny_gpt(activation='swish'), 'activation must be one of'),
    (lambda: tiny_gpt(dropout_rate=1.0), r'dropout_rate must lie in \[0, 1\)'),
    (lambda: tiny_gpt(norm_variant='rms'), 'norm_variant'),
    (lambda: tiny_gpt(remat_policy='some'), 'remat_policy'),
    (lambda: tiny_gpt(dtype='float33'), 'not a dtype name'),
    (lambda: tiny_gpt(pad_id=V), 'pad_id'),
    (
      lambda: tiny_transformer(share_embeddings=True),
      'share_embeddings needs src_vocab_size == tgt_vocab_size',
    ),
    (lambda: tiny_transformer(d_model=9, num_heads=3), 'even d_model'),
    (lambda: tiny_transformer(position_encoding='rotary'), 'position_encoding'),
    (lambda: tiny_bert(pre_norm=True), 'post-norm'),
    (lambda: tiny_bert(num_labels=0), 'num_labels'),
  ],
  ids=[
    'heads',
    'layers',
    'activation',
    'dropout',
    'norm',
    'remat',
    'dtype',
    'pad_id',
    'share',
    'odd_sinusoid',
    'position',
    'bert_prenorm',
    'labels',
  ],
)
def test_impossible_configs_are_rejected(make, message):
  with pytest.raises(ValueError, match=message):
    make()


def test_presets_build():
  assert GPTConfig.gpt2('medium').d_model == 1024
  with pytest.raises(ValueError, match='unknown GPT-2 size'):
    GPTConfig.gpt2('huge')
  course = TransformerConfig.course()
  assert course.norm_variant == 'unbiased_std' and course.norm_eps == 1e-6 and not course.pre_norm
  base = TransformerConfig.base()
  assert base.share_embeddings and base.tie_output
  assert BERTConfig.large().num_layers == 24
  assert GPTConfig.course().qkv_bias is False
  assert GPTConfig.from_dict(tiny_gpt().to_dict()) == tiny_gpt()
  with pytest.raises(ValueError, match='unknown GPTConfig fields'):
    GPTConfig.from_dict({'n_embd': 3})
