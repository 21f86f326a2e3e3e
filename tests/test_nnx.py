"""transformer_jax.nnx: each model family as an nnx.Module equals its Linen self, bit for bit, in init, logits,
gradients (dropout on), 20 AdamW steps, sown attention weights, logical axes and Orbax checkpoints both ways."""

import functools
import os
import pathlib
import subprocess
import sys
import textwrap
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import transformer_jax.nnx as tnnx
from transformer_jax import BERTConfig, GPTConfig, TransformerConfig, sharding

B, T, S = 2, 5, 4  # batch, source (or GPT) length, target length
V = 29
TINY = dict(num_layers=2, d_model=24, num_heads=3, d_ff=40, max_len=16)
# rotary, RMSNorm, SwiGLU, 6 query heads over 2 key/value heads, Q/K/V biases alone (Qwen2), a sliding window
# (Mistral), scanned and rematerialised layers
LLAMA = GPTConfig.llama(
  **{**TINY, 'num_heads': 6},
  vocab_size=V,
  num_kv_heads=2,
  qkv_bias=True,
  rope_theta=10000.0,
  rope_scaling=None,
  dropout_rate=0.1,
  attention_dropout_rate=0.1,
  sliding_window=3,
  scan_layers=True,
  remat_policy='dots',
)
T5 = TransformerConfig.t5_v1_1(
  src_vocab_size=V, tgt_vocab_size=V, relative_buckets=8, scan_layers=True, **TINY
)
# one layer where the stack is a loop: the bridge is indifferent to depth, and compile time is not
ONE_LAYER = {**TINY, 'num_layers': 1}
BERT_CONFIG = BERTConfig(vocab_size=V, num_labels=3, **ONE_LAYER)


def ids_of(shape, seed, vocab=V):
  return jax.random.randint(jax.random.key(seed), shape, 1, vocab)


SRC, TGT = ids_of((B, T), 1), ids_of((B, S), 2)
PADDED = jnp.arange(T)[None] >= jnp.array([[0], [2]])  # (B, T): the second row left-padded by 2


class Case(NamedTuple):
  family: type
  config: object
  inputs: tuple
  kwargs: dict = {}


CASES = {
  'gpt2': Case(tnnx.GPT, GPTConfig.gpt2(vocab_size=V, **TINY), (SRC,), dict(valid=PADDED)),
  'llama': Case(tnnx.GPT, LLAMA, (SRC,), dict(valid=PADDED)),
  'transformer': Case(
    tnnx.Transformer,
    TransformerConfig(src_vocab_size=31, tgt_vocab_size=V, remat_policy='full', **ONE_LAYER),
    (SRC, TGT),
    dict(src_valid=PADDED),
  ),
  't5': Case(tnnx.Transformer, T5, (SRC, TGT)),
  't5_encoder': Case(tnnx.EncoderModel, T5, (SRC,), dict(src_valid=PADDED)),
  'bert': Case(tnnx.BERT, BERT_CONFIG, (SRC,), dict(token_type_ids=PADDED.astype(jnp.int32))),
  'bert_mlm': Case(tnnx.BERTForMaskedLM, BERT_CONFIG, (SRC,), dict(valid=PADDED)),
  'bert_classify': Case(tnnx.BERTForSequenceClassification, BERT_CONFIG, (SRC,)),
}


def scalar(outputs):
  """A loss every family's outputs give (logits, hidden states, BERT's pair)."""
  return sum(jnp.mean(jnp.square(x)) for x in jax.tree.leaves(outputs))


def assert_trees_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  jax.tree.map(np.testing.assert_array_equal, actual, expected)


@functools.cache
def linen_and_params(name):
  """The Linen model of a case and its params from Linen's own ``init`` (the key ``nnx.Rngs(0)`` initialises with)."""
  case = CASES[name]
  linen = case.family.linen_class(case.config)
  return linen, linen.init(nnx.Rngs(0).params(), *case.inputs)['params']


@pytest.mark.parametrize('name', CASES)
def test_init_and_logits_equal_linen(name):
  case = CASES[name]
  linen, params = linen_and_params(name)
  model = case.family(case.config, rngs=nnx.Rngs(0))
  assert_trees_equal(tnnx.to_linen(model)[1], params)
  expected = linen.apply({'params': params}, *case.inputs, **case.kwargs)
  assert_trees_equal(model(*case.inputs, **case.kwargs), expected)
  # a call's own dropout stream draws fold_in(key, 0): the key Linen is given
  dropped = model(*case.inputs, **case.kwargs, deterministic=False, rngs=nnx.Rngs(dropout=7))
  rngs = {'dropout': jax.random.fold_in(jax.random.key(7), 0)}
  linen_dropped = linen.apply(
    {'params': params}, *case.inputs, **case.kwargs, deterministic=False, rngs=rngs
  )
  assert_trees_equal(dropped, linen_dropped)
  assert not np.array_equal(jax.tree.leaves(dropped)[0], jax.tree.leaves(expected)[0])


# One case per model class that trains differently: the decoder with every Llama knob, the encoder-decoder (remat),
# the T5 encoder, a BERT with a head; the init and logits test above covers every case.
@pytest.mark.parametrize('name', ['llama', 'transformer', 't5_encoder', 'bert_classify'])
def test_gradients_and_twenty_adamw_steps_equal_linen_optax(name):
  """Dropout on, from the model's own stream: the bridge forks the streams it is given and draws one key per call,
  fold_in(forked key, call), which the Linen step derives the same way inside its program."""
  case = CASES[name]
  linen, params = linen_and_params(name)
  model = tnnx.from_linen(linen, params, rngs=nnx.Rngs(dropout=1))
  tx = optax.adamw(1e-2, weight_decay=0.1)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def nnx_step(model, optimizer):
    loss_fn = lambda m: scalar(m(*case.inputs, **case.kwargs, deterministic=False))  # noqa: E731
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss, nnx.to_pure_dict(grads)

  @jax.jit
  def linen_step(params, opt_state, step):
    rngs = {'dropout': jax.random.fold_in(dropout_key, step)}

    def loss_fn(p):
      outputs = linen.apply(
        {'params': p}, *case.inputs, **case.kwargs, deterministic=False, rngs=rngs
      )
      return scalar(outputs)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, grads

  dropout_key, opt_state, losses = nnx.Rngs(dropout=1).fork().dropout.key[...], tx.init(params), []
  for step in range(20):
    loss, grads = nnx_step(model, optimizer)
    params, opt_state, linen_loss, linen_grads = linen_step(params, opt_state, jnp.uint32(step))
    assert float(loss) == float(linen_loss), step
    assert_trees_equal(grads, linen_grads)
    losses.append(float(loss))
  assert len(set(losses)) > 1  # the steps moved the params
  assert_trees_equal(tnnx.to_linen(model)[1], params)


@pytest.mark.parametrize('name', CASES)
def test_logical_axis_names_survive(name):
  case = CASES[name]
  model = case.family(case.config, rngs=nnx.Rngs(0))
  axes = tnnx.logical_axes(model)
  assert axes == sharding.logical_axes(tnnx.to_linen(model)[0], *case.inputs)
  specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model, nnx.Param)))
  assert specs == jax.tree.map(
    lambda names: jax.P(*names), axes, is_leaf=lambda x: type(x) is tuple
  )


def test_from_linen_holds_the_arrays_and_to_linen_gives_them_back():
  case = CASES['llama']
  linen = case.family.linen_class(case.config)
  params = linen.init(jax.random.key(3), SRC)['params']
  model = tnnx.from_linen(linen, params)
  same = jax.tree.map(lambda a, b: a is b, tnnx.to_linen(model)[1], params)
  assert all(jax.tree.leaves(same))
  assert tnnx.to_linen(model)[0] is model.to_nnx__module
  bert = tnnx.from_linen(*tnnx.to_linen(tnnx.BERT(BERT_CONFIG, rngs=nnx.Rngs(0), add_pooler=False)))
  assert bert(SRC)[1] is None  # the Linen module's other fields carry over
  with pytest.raises(ValueError, match='missing decoder/layers_0/ffn/fc_in/kernel'):
    tnnx.from_linen(linen.clone(config=LLAMA.replace(scan_layers=False)), params)
  with pytest.raises(ValueError, match=r'token_embed/embedding has shape \(29, 24\).*\(30, 24\)'):
    tnnx.GPT(LLAMA.replace(vocab_size=30), params=params)
  with pytest.raises(TypeError, match='no NNX model for Dense'):
    tnnx.from_linen(nn.Dense(3), {})


@pytest.mark.parametrize('name', ['llama', 'transformer'])
def test_sown_attention_weights(name):
  case = CASES[name]
  model = case.family(case.config, rngs=nnx.Rngs(0))
  linen, params = tnnx.to_linen(model)
  nnx.jit(lambda m: m(*case.inputs, **case.kwargs, mutable=['intermediates']))(model)
  sown = nnx.to_pure_dict(nnx.pop(model, nnx.Intermediate))
  _, expected = jax.jit(
    lambda p: linen.apply({'params': p}, *case.inputs, **case.kwargs, mutable=['intermediates'])
  )(params)
  assert_trees_equal(sown, expected['intermediates'])
  assert not nnx.state(model, nnx.Intermediate)  # popped: the next call starts afresh


@pytest.mark.parametrize('name', ['llama', 'bert_mlm'])
def test_orbax_checkpoints_both_ways(name, tmp_path):
  case = CASES[name]
  linen, linen_params = linen_and_params(name)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / 'linen', linen_params)
  abstract = nnx.eval_shape(lambda: case.family(case.config, rngs=nnx.Rngs(0)))
  checkpointer.wait_until_finished()

  # Linen params -> an NNX model (zeros until then): restored as the pure tree to_linen gives, put in place
  model = tnnx.from_linen(linen, jax.tree.map(jnp.zeros_like, linen_params))
  tnnx.load_params(model, checkpointer.restore(tmp_path / 'linen', tnnx.to_linen(abstract)[1]))
  assert_trees_equal(tnnx.to_linen(model)[1], linen_params)

  # an NNX state (its leaves one `value` deeper than the Linen tree's) -> Linen params
  checkpointer.save(tmp_path / 'nnx', nnx.state(model, nnx.Param))
  checkpointer.wait_until_finished()
  state = checkpointer.restore(tmp_path / 'nnx', nnx.state(abstract, nnx.Param))
  restored = nnx.to_pure_dict(state)
  assert_trees_equal(restored, linen_params)
  assert_trees_equal(linen.apply({'params': restored}, *case.inputs), model(*case.inputs))


SHARDED = """
import jax, numpy as np, optax
from flax import nnx
import transformer_jax.nnx as tnnx
from transformer_jax import sharding
from tests.test_nnx import LLAMA, SRC
jax.config.update('jax_default_matmul_precision', 'highest')
model = tnnx.GPT(LLAMA, rngs=nnx.Rngs(0))
linen, params = tnnx.to_linen(model)
expected = jax.jit(lambda p: linen.apply({'params': p}, SRC))(params)
mesh = sharding.make_mesh(data=1, fsdp=2, tensor=2)
tnnx.shard(model, mesh)
want = sharding.param_shardings(params, sharding.logical_axes(linen, SRC), mesh)
got = jax.tree.map(lambda x: x.sharding, tnnx.to_linen(model)[1])
assert got == want
# FSDP x tensor parallel where the sizes divide: the FFN's (L, D, F) input kernels
spec = jax.P(None, 'fsdp', 'tensor')
assert got['decoder']['layers']['ffn']['fc_in']['kernel'].spec == spec
adam = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param).opt_state[0]  # made after: laid out alike
assert adam.mu['decoder']['layers']['ffn']['fc_in']['kernel'][...].sharding.spec == spec
with jax.set_mesh(mesh):
  logits = nnx.jit(lambda m: m(SRC))(model)
np.testing.assert_allclose(logits, expected, atol=1e-6, rtol=0)
print('ok')
"""


def test_shard_places_params_by_their_logical_axes():
  """On 4 simulated devices (a fresh process): the NNX model's params get the Linen path's shardings."""
  flags = os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=4'
  result = subprocess.run(
    [sys.executable, '-c', textwrap.dedent(SHARDED)],
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, 'XLA_FLAGS': flags},
    cwd=pathlib.Path(__file__).parents[1],
  )
  assert result.returncode == 0 and result.stdout.strip().endswith('ok'), result.stderr[-3000:]
