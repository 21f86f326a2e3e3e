"""Logical axis names and mesh construction (the sharded runs themselves are in test_parallel.py)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from transformer_jax import (
  GPT,
  BERTConfig,
  BERTForMaskedLM,
  BERTForSequenceClassification,
  EncoderModel,
  GPTConfig,
  Transformer,
  TransformerConfig,
)
from transformer_jax.modules.relative_position import RelativePositionBias
from transformer_jax.sharding import (
  Module,
  check_batch_divisible,
  logical_axes,
  make_mesh,
  mesh_shape,
  param_shardings,
)

TINY = dict(num_layers=2, d_model=12, num_heads=3, d_ff=20, max_len=16)
# rotary, RMSNorm, SwiGLU, grouped-query attention, no biases, scanned layers
LLAMA_SHAPED = GPTConfig.llama(
  vocab_size=41,
  num_layers=2,
  d_model=32,
  num_heads=8,
  num_kv_heads=2,
  d_ff=24,
  max_len=16,
  rope_theta=10000.0,
  rope_scaling=None,
  scan_layers=True,
)
IDS = jnp.ones((2, 5), jnp.int32)
# relative position tables in both stacks, RMSNorm, a gated FFN, no biases, an untied head, scanned layers
T5_SHAPED = TransformerConfig.t5_v1_1(
  src_vocab_size=41, tgt_vocab_size=41, relative_buckets=8, scan_layers=True, **TINY
)


def shapes(model, *args):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), *args))['params']


@pytest.mark.parametrize(
  'model,args',
  [
    (GPT(GPTConfig(vocab_size=41, **TINY)), (IDS,)),
    (
      GPT(GPTConfig(vocab_size=41, scan_layers=True, fused_qkv=False, tie_output=False, **TINY)),
      (IDS,),
    ),
    (Transformer(TransformerConfig(src_vocab_size=31, tgt_vocab_size=37, **TINY)), (IDS, IDS)),
    (BERTForMaskedLM(BERTConfig(vocab_size=41, **TINY)), (IDS,)),
    (BERTForSequenceClassification(BERTConfig(vocab_size=41, num_labels=3, **TINY)), (IDS,)),
    (GPT(LLAMA_SHAPED), (IDS,)),
    # what convert.llama loads: Llama without Q/K/V biases, and an untied head
    (GPT(LLAMA_SHAPED.replace(qkv_bias=False, tie_output=False)), (IDS,)),
    (Transformer(T5_SHAPED), (IDS, IDS)),
    (EncoderModel(T5_SHAPED.replace(scan_layers=False)), (IDS,)),
  ],
  ids=[
    'gpt',
    'gpt_scan_untied',
    'transformer',
    'bert_mlm',
    'bert_classifier',
    'llama_shaped',
    'llama_untied_no_qkv_bias',
    't5_shaped',
    't5_encoder',
  ],
)
def test_every_parameter_gets_one_name_per_axis(model, args):
  """The names come from the blocks' metadata; ``init`` itself returns plain arrays."""
  params = shapes(model, *args)
  assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(params))
  axes = logical_axes(model, *args)
  flat = jax.tree_util.tree_leaves_with_path(params)
  for (path, leaf), names in zip(
    flat, jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
  ):
    assert len(names) == leaf.ndim, (path, names)
    keys = [getattr(k, 'key', '') for k in path]
    if 'layers' in keys:
      assert names[0] == 'layers'
    if keys[-1] == 'kernel' and keys[-2] in ('query', 'qkv', 'fc_in'):
      assert names[-len(leaf.shape) + ('layers' in keys)] == 'embed'


def test_shardings_on_a_single_device_mesh_replicate():
  model = GPT(GPTConfig(vocab_size=41, **TINY))
  mesh = make_mesh(devices=jax.devices()[:1])
  for sharding in jax.tree.leaves(
    param_shardings(shapes(model, IDS), logical_axes(model, IDS), mesh)
  ):
    assert all(axis is None for axis in sharding.spec), sharding.spec


@pytest.mark.parametrize(
  'sizes,expected',
  [
    ({}, (8, 1, 1)),
    ({'fsdp': -1}, (1, 8, 1)),
    ({'tensor': -1}, (1, 1, 8)),
    ({'fsdp': -1, 'tensor': 2}, (1, 4, 2)),
    ({'fsdp': 2}, (4, 2, 1)),
    ({'fsdp': 4, 'tensor': 2}, (1, 4, 2)),
    ({'data': 2, 'fsdp': -1}, (2, 4, 1)),
    ({'data': -1, 'tensor': 4}, (2, 1, 4)),
    ({'data': 2, 'fsdp': 4}, (2, 4, 1)),
  ],
  ids=str,
)
def test_mesh_shape_gives_the_rest_to_the_axis_set_to_minus_one(sizes, expected):
  # data left unset takes what the others leave: all of it, or nothing when another axis is -1
  assert mesh_shape(8, **sizes) == expected


@pytest.mark.parametrize(
  'sizes,message',
  [
    ((2, 1, 1), r'mesh data=2 x fsdp=1 x tensor=1 = 2 devices, but 1 are available'),
    ((None, 2, 1), r'1 devices are not divisible by the fixed axes \(2\)'),
    ((-1, -1, 1), r'-1 \(the rest\) on one axis at most; got data=-1, fsdp=-1, tensor=1'),
    ((None, -1, -1), r'on one axis at most; got data=None, fsdp=-1, tensor=-1'),
    ((0, 1, 1), 'positive'),
    ((-1, 3, 1), 'not divisible by the fixed axes'),
  ],
  ids=[
    'too_big',
    'too_big_rest',
    'two_wildcards',
    'two_wildcards_data_unset',
    'zero',
    'indivisible',
  ],
)
def test_impossible_meshes_are_rejected(sizes, message):
  with pytest.raises(ValueError, match=message):
    make_mesh(*sizes, devices=jax.devices()[:1])


def test_batch_must_divide_over_data_axes():
  class FakeMesh:
    shape = {'data': 2, 'fsdp': 2, 'tensor': 2}

  check_batch_divisible(8, FakeMesh())
  with pytest.raises(
    ValueError, match='batch size 6 does not divide across the 4 data-parallel devices'
  ):
    check_batch_divisible(6, FakeMesh())


def test_kv_heads_and_gate_projections_get_tensor_parallel_specs():
  """Grouped-query attention on a 4-way tensor axis: 8 query heads split, 2 key/value heads (fewer than the axis)
  stay whole rather than being padded; the gated FFN's gate splits like its input projection."""
  from jax.sharding import AbstractMesh, PartitionSpec

  from transformer_jax.sharding import DEFAULT_RULES, _spec

  model = GPT(dataclasses.replace(LLAMA_SHAPED, scan_layers=False))
  params, axes = shapes(model, IDS), logical_axes(model, IDS)
  mesh = AbstractMesh((1, 1, 4), ('data', 'fsdp', 'tensor'))
  layer, layer_axes = params['decoder']['layers_0'], axes['decoder']['layers_0']
  spec = lambda *path: _spec(_get(layer_axes, path), _get(layer, path).shape, mesh, DEFAULT_RULES)  # noqa: E731
  assert spec('self_attention', 'query', 'kernel') == PartitionSpec(None, 'tensor', None)
  assert spec('self_attention', 'key', 'kernel') == PartitionSpec(None, None, None)
  assert (
    spec('ffn', 'fc_gate', 'kernel')
    == spec('ffn', 'fc_in', 'kernel')
    == PartitionSpec(None, 'tensor')
  )
  assert spec('ffn', 'fc_out', 'kernel') == PartitionSpec('tensor', None)


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def test_scanned_stack_and_relative_position_table_axes():
  """A scanned stack's parameters gain a leading ``layers`` axis; T5's ``(buckets, H)`` table follows the heads."""
  axes = logical_axes(GPT(LLAMA_SHAPED), IDS)['decoder']['layers']
  assert axes['self_attention']['key']['kernel'] == ('layers', 'embed', 'heads', 'kv')
  assert axes['ffn']['fc_out']['kernel'] == ('layers', 'mlp', 'embed')
  assert axes['self_attention_norm']['scale'] == ('layers', 'embed')
  bias = RelativePositionBias(num_heads=3, bidirectional=True, num_buckets=7)
  assert logical_axes(bias, 5, 5) == {'embedding': (None, 'heads')}
  assert bias.init(jax.random.key(0), 5, 5)['params']['embedding'].shape == (7, 3)


class _Unnamed(Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name='plain')(x)


class _Misnamed(Module):
  @nn.compact
  def __call__(self, x):
    init = nn.with_logical_partitioning(nn.initializers.zeros, ('embed',))
    return x @ self.param('wrong', init, (x.shape[-1], 3))


@pytest.mark.parametrize(
  'module,message',
  [
    (_Unnamed(), r'no logical axis names on plain/bias, plain/kernel \(create them with'),
    (_Misnamed(), r"wrong has 2 dimensions but 1 names \('embed',\)"),
  ],
  ids=['unnamed', 'wrong_count'],
)
def test_a_parameter_without_its_axis_names_is_an_error(module, message):
  with pytest.raises(ValueError, match=message):
    logical_axes(module, jnp.ones((2, 5)))
