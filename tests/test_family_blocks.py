"""Blocks the coming families need (RMSNorm, gated FFNs, grouped-query attention, no biases), each against the
Hugging Face PyTorch code it must match."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm, eager_attention_forward
from transformers.models.t5.modeling_t5 import T5LayerNorm

from transformer_jax import GPT, BlockConfig, GPTConfig
from transformer_jax.modules import FeedForward, MultiHeadAttention, RMSNorm, dot_product_attention

B, T, D, F = 2, 5, 12, 20
# A decoder with 6 query heads of 4 over 2 key/value heads and rotary positions (Llama's attention).
GROUPED_DECODER = dict(
  vocab_size=23,
  max_len=16,
  d_model=24,
  num_heads=6,
  num_kv_heads=2,
  d_ff=20,
  fused_qkv=False,
  position_encoding='none',
  rope_theta=10000.0,
)


def random_input(shape, seed=0):
  # a writable copy
  return np.array(jax.random.normal(jax.random.key(seed), shape) * 2.0 + 0.5, np.float32)


def t(x):
  return torch.from_numpy(np.array(x, np.float32))


# ---------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize(
  'reference, plus_one',
  [(LlamaRMSNorm, False), (T5LayerNorm, False), (GemmaRMSNorm, True)],
  ids=['llama', 't5', 'gemma_one_plus_weight'],
)
def test_rms_norm_matches_hugging_face(reference, plus_one):
  x, eps = random_input((B, T, D)), 1e-3  # a large eps, so where it enters shows
  norm = RMSNorm(epsilon=eps, scale_plus_one=plus_one)
  scale = random_input((D,), 1) * 0.3
  params = {'params': {'scale': jnp.asarray(scale)}}
  torch_norm = reference(D, eps=eps)
  with torch.no_grad():
    torch_norm.weight.copy_(t(scale))
    expected = torch_norm(t(x)).numpy()
  np.testing.assert_allclose(norm.apply(params, x), expected, atol=1e-5, rtol=1e-5)


def test_rms_norm_initialises_to_the_identity_scale_in_both_forms():
  x = random_input((B, T, D))
  plain, one_plus = RMSNorm(), RMSNorm(scale_plus_one=True)
  a = plain.apply(plain.init(jax.random.key(0), x), x)
  b = one_plus.apply(one_plus.init(jax.random.key(0), x), x)
  np.testing.assert_allclose(a, b, atol=1e-6)
  np.testing.assert_allclose(np.sqrt(np.mean(np.asarray(a) ** 2, -1)), 1.0, atol=1e-3)


def test_rms_norm_keeps_float32_statistics_for_bf16_inputs():
  x = random_input((B, T, D)) * 300.0  # squares overflow bf16's precision, not float32's
  norm = RMSNorm(dtype=jnp.bfloat16)
  params = norm.init(jax.random.key(0), x)
  out = norm.apply(params, jnp.asarray(x, jnp.bfloat16))
  assert out.dtype == jnp.bfloat16
  reference = x / np.sqrt(np.mean(x.astype(np.float64) ** 2, -1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(np.asarray(out, np.float32), reference, rtol=1e-2, atol=1e-2)


# ---------------------------------------------------------------- gated FFN


@pytest.mark.parametrize(
  'activation, torch_act',
  [
    ('silu', torch.nn.functional.silu),
    ('gelu_tanh', lambda h: torch.nn.functional.gelu(h, approximate='tanh')),
  ],
  ids=['swiglu_llama', 'geglu_t5_v1_1'],
)
def test_gated_ffn_matches_the_gate_times_up_formula(activation, torch_act):
  """Llama's ``down(act(gate(x)) * up(x))`` and T5 v1.1's ``wo(gelu_new(wi_0 x) * wi_1 x)``, no biases."""
  x = random_input((B, T, D))
  ffn = FeedForward(F, activation, gated=True, use_bias=False)
  params = ffn.init(jax.random.key(0), x)['params']
  assert set(params) == {'fc_in', 'fc_gate', 'fc_out'} and 'bias' not in params['fc_in']
  w = {k: t(v['kernel']) for k, v in params.items()}  # (in, out)
  expected = (torch_act(t(x) @ w['fc_gate']) * (t(x) @ w['fc_in'])) @ w['fc_out']
  np.testing.assert_allclose(
    ffn.apply({'params': params}, x), expected.numpy(), atol=1e-5, rtol=1e-5
  )


# ---------------------------------------------------------------- grouped-query attention


@pytest.mark.parametrize(
  'heads, kv_heads', [(6, 2), (6, 1), (6, 6)], ids=['grouped', 'multi_query', 'multi_head']
)
def test_grouped_attention_matches_hugging_face_repeat_kv(heads, kv_heads):
  K, S = 4, 7
  q, k, v = (
    random_input((B, T, heads, K), 1),
    random_input((B, S, kv_heads, K), 2),
    random_input((B, S, kv_heads, K), 3),
  )
  mask = np.array(jax.random.bernoulli(jax.random.key(4), 0.7, (B, 1, T, S)))
  mask[..., 0] = True
  ours = dot_product_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask))

  class Module(torch.nn.Module):
    num_key_value_groups = heads // kv_heads

  additive = torch.where(torch.from_numpy(mask), 0.0, torch.finfo(torch.float32).min)
  expected, _ = eager_attention_forward(
    Module().eval(),
    t(q).transpose(1, 2),
    t(k).transpose(1, 2),
    t(v).transpose(1, 2),
    additive,
    scaling=K**-0.5,
  )
  np.testing.assert_allclose(ours, expected.numpy(), atol=1e-5, rtol=1e-5)


def test_grouped_attention_projects_and_caches_only_the_kv_heads():
  cfg = GPTConfig(**GROUPED_DECODER, num_layers=2, dropout_rate=0.0, attention_dropout_rate=0.0)
  model, ids = GPT(cfg), np.asarray(jax.random.randint(jax.random.key(0), (B, 9), 0, 23))
  params = jax.jit(model.init)(jax.random.key(1), ids)['params']
  attention = params['decoder']['layers_0']['self_attention']
  assert attention['query']['kernel'].shape == (24, 6, 4)
  assert attention['key']['kernel'].shape == attention['value']['kernel'].shape == (24, 2, 4)
  full = jax.jit(model.apply)({'params': params}, ids)
  positions = jnp.broadcast_to(jnp.arange(9), (B, 9))

  @jax.jit
  def step(cache, ids, positions):
    return model.apply(
      {'params': params, 'cache': cache},
      ids,
      positions=positions,
      method=GPT.decode_step,
      mutable=['cache'],
    )

  shapes = jax.eval_shape(
    lambda: model.apply(
      {'params': params},
      jnp.zeros((B, 9), jnp.int32),
      positions=positions,
      method=GPT.decode_step,
      mutable=['cache'],
    )[1]['cache']
  )
  cache = jax.tree.map(jnp.zeros_like, shapes)
  # (B, S, G, K)
  assert cache['decoder']['layers_0']['self_attention']['cached_key'].shape == (
    B,
    9,
    2,
    4,
  )
  logits, variables = step(cache, ids[:, :6], positions[:, :6])  # prefill, then one token at a time
  steps = [logits]
  for j in range(6, 9):
    logits, variables = step(variables['cache'], ids[:, j : j + 1], positions[:, j : j + 1])
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5, rtol=1e-5)


def test_attention_refuses_kv_heads_that_do_not_divide_the_heads():
  with pytest.raises(ValueError, match='num_kv_heads must be a positive divisor of num_heads=6'):
    BlockConfig(d_model=24, num_heads=6, num_kv_heads=4)
  with pytest.raises(ValueError, match='grouped-query attention'):
    BlockConfig(d_model=24, num_heads=6, num_kv_heads=2, fused_qkv=True)
  x = random_input((B, T, 24))
  with pytest.raises(ValueError, match='num_kv_heads=4 must divide num_heads=6'):
    MultiHeadAttention(num_heads=6, num_kv_heads=4).init(jax.random.key(0), x)


# ---------------------------------------------------------------- no biases, RMSNorm and SwiGLU in a whole model


def test_a_llama_shaped_gpt_has_no_biases_but_the_ones_asked_for():
  cfg = dict(
    **GROUPED_DECODER,
    num_layers=1,
    norm_type='rms_norm',
    gated_ffn=True,
    activation='silu',
    use_bias=False,
    tie_output=False,
  )
  ids = np.zeros((1, 3), np.int32)

  def tree(**kw):
    return jax.eval_shape(GPT(GPTConfig(**cfg, **kw)).init, jax.random.key(0), ids)['params']

  llama, qwen2 = tree(qkv_bias=False), tree(qkv_bias=True)

  def names(tree):
    return {
      '/'.join(k.key for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
    }

  assert not [n for n in names(llama) if n.endswith('bias')]
  assert sorted(n for n in names(qwen2) if n.endswith('bias')) == [
    f'decoder/layers_0/self_attention/{p}/bias' for p in ('key', 'query', 'value')
  ]
  assert llama['decoder']['final_norm'].keys() == {'scale'}
  assert llama['decoder']['layers_0']['ffn'].keys() == {'fc_in', 'fc_gate', 'fc_out'}


def test_the_old_norm_variant_name_still_builds_the_same_config():
  assert BlockConfig(norm_variant='seed').norm_variant == 'unbiased_std'


# ---------------------------------------------------------------- T5's relative position bias


@pytest.mark.parametrize('decoder', [False, True], ids=['encoder_bidirectional', 'decoder_causal'])
@pytest.mark.parametrize(
  'q_len, kv_len, past',
  [(5, 7, 0), (1, 40, 39), (3, 200, 197)],
  ids=['short', 'one_cached_step', 'past_max_distance'],
)
def test_relative_position_bias_matches_t5(decoder, q_len, kv_len, past):
  from transformers import T5Config
  from transformers.models.t5.modeling_t5 import T5Attention

  from transformer_jax.modules.relative_position import RelativePositionBias

  # odd sizes: few exact buckets, so long distances hit the log range
  heads, buckets, max_distance = (
    3,
    10,
    24,
  )
  config = T5Config(
    d_model=12,
    d_kv=4,
    num_heads=heads,
    relative_attention_num_buckets=buckets,
    relative_attention_max_distance=max_distance,
    is_decoder=decoder,
  )
  torch_attention = T5Attention(config, has_relative_attention_bias=True, layer_idx=0).eval()
  ours = RelativePositionBias(
    heads, bidirectional=not decoder, num_buckets=buckets, max_distance=max_distance
  )
  table = torch_attention.relative_attention_bias.weight.detach().numpy()  # (buckets, H)
  got = ours.apply({'params': {'embedding': jnp.asarray(table)}}, q_len, kv_len, past)
  with torch.no_grad():
    expected = torch_attention.compute_bias(q_len, kv_len, past_seen_tokens=past).numpy()
  assert got.shape == (1, heads, q_len, kv_len)
  np.testing.assert_array_equal(got, expected)


def test_an_additive_bias_shifts_the_logits_before_the_softmax():
  K, S, H = 4, 7, 3
  q, k, v = (
    random_input((B, T, H, K), 1),
    random_input((B, S, H, K), 2),
    random_input((B, S, H, K), 3),
  )
  bias = random_input((1, H, T, S), 4)
  got = dot_product_attention(
    jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), bias=jnp.asarray(bias)
  )
  logits = np.einsum('bthk,bshk->bhts', q, k) / np.sqrt(K) + bias
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  np.testing.assert_allclose(got, np.einsum('bhts,bshk->bthk', weights, v), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- BART's embeddings: positions offset by 2, a norm


def test_learned_positions_with_an_offset_match_bart():
  from transformers.models.bart.modeling_bart import BartLearnedPositionalEmbedding

  from transformer_jax.modules import LearnedPositionalEmbedding

  max_len, positions = 9, np.array([[0, 1, 2, 3, 4], [4, 5, 6, 7, 8]])
  torch_positions = BartLearnedPositionalEmbedding(max_len, D)
  ours = LearnedPositionalEmbedding(max_len, D, offset=2)
  table = torch_positions.weight.detach().numpy()
  assert table.shape == (max_len + 2, D)
  got = ours.apply({'params': {'embedding': jnp.asarray(table)}}, jnp.asarray(positions))
  with torch.no_grad():
    # rows 2..6
    expected = torch_positions(torch.zeros(2, 5), position_ids=torch.tensor(positions[0]))
  np.testing.assert_array_equal(got[0], expected[0].numpy())
  np.testing.assert_array_equal(got[1], table[positions[1] + 2])
  with pytest.raises(ValueError, match='positions out of range'):
    ours.apply({'params': {'embedding': jnp.asarray(table)}}, jnp.asarray([[0, 9]]))


def test_an_embedding_norm_normalises_the_summed_embeddings():
  from transformer_jax import Transformer, TransformerConfig

  cfg = TransformerConfig(
    src_vocab_size=13,
    tgt_vocab_size=17,
    max_len=9,
    num_layers=1,
    d_model=D,
    num_heads=3,
    d_ff=F,
    position_encoding='learned',
    position_offset=2,
    embed_norm=True,
    dropout_rate=0.0,
    attention_dropout_rate=0.0,
  )
  model = Transformer(cfg)
  src, tgt = np.ones((B, 7), np.int32), np.ones((B, T), np.int32)
  params = jax.jit(model.init)(jax.random.key(0), src, tgt)['params']
  assert {'source_embed_norm', 'target_embed_norm'} <= set(params)
  assert params['source_positions']['embedding'].shape == (9 + 2, D)
  embedded = model.apply({'params': params}, src, method=lambda m, ids: m.source.embed_source(ids))
  # LayerNorm at init: zero mean, unit var
  np.testing.assert_allclose(np.asarray(embedded).mean(-1), 0.0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(embedded).std(-1), 1.0, atol=1e-3)
