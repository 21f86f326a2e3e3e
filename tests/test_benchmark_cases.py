"""The training benchmark compares like with like: each case's loss on our model equals its PyTorch counterpart's on
the same weights and batch (every family, both GPT shapes, the SDPA peer), its ``--xla-products`` row really has
XLA's products, and the GPU command runs end to end."""

import argparse
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from benchmarks import train_cases
from benchmarks.harness import XLA_PRODUCTS, product_library_switch
from benchmarks.targets import main as check_targets
from benchmarks.train_throughput import compiled_jax_step
from transformer_jax.convert.bert import to_bert
from transformer_jax.convert.course_models import to_reference_gpt, to_reference_transformer
from transformer_jax.convert.gpt2 import to_gpt2
from transformer_jax.kernels import onednn_matmul

# odd, distinct sizes; the course models' FFN is 4 x d_model wide
SMALL = dict(d_model=12, num_heads=3, d_ff=48)


def shape_args(**fields) -> argparse.Namespace:
  defaults = dict(batch=2, seq=7, dropout=0.0, gpt_shape='course', gpt_layers=2, seq2seq_layers=1)
  return argparse.Namespace(**{**defaults, **fields})


def spread_params(case) -> dict:
  """The case's parameters drawn again with a standard deviation of 0.5: at the init's scale, attention is nearly
  uniform, and a loss would hardly move with swapped queries and keys."""
  params = train_cases.init_params(case)
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(1)
  return tree.unflatten([jnp.asarray(rng.normal(0, 0.5, x.shape), jnp.float32) for x in leaves])


def our_loss(case, params) -> float:
  with jax.default_matmul_precision('highest'):
    call = functools.partial(case.model.apply, {'params': params})
    return float(case.loss(call, jax.tree.map(jnp.asarray, case.batch)))


def torch_loss(case, module) -> float:
  batch = {k: torch.from_numpy(v.astype(np.int64)) for k, v in case.batch.items()}
  with torch.no_grad():
    return float(case.torch_loss(module.eval(), batch))


def losses(case, export) -> tuple[float, float]:
  """``(ours, theirs)``: the case's loss on our model and on its PyTorch model loaded with the same weights."""
  params = spread_params(case)
  theirs = case.torch_model()
  theirs.load_state_dict(export(case.model, params, as_torch=True))
  return our_loss(case, params), torch_loss(case, theirs)


@pytest.mark.parametrize('targets, predicted', [('masked', 3), ('all', 20)])
def test_bert_case_losses_agree(targets, predicted):
  args = argparse.Namespace(bert_layers=1, seq=20, batch=2, dropout=0.0, bert_targets=targets)
  case = train_cases.bert_case(args, dict(vocab_size=101, d_model=12, num_heads=3, d_ff=20))
  assert case.batch['positions'].shape == case.batch['targets'].shape == (2, predicted)
  ours, theirs = losses(case, to_bert)
  np.testing.assert_allclose(ours, theirs, rtol=1e-5)


@pytest.mark.parametrize(
  'gpt_shape, export',
  [('course', to_reference_gpt), ('gpt2-small', to_gpt2)],
  ids=['course', 'gpt2'],
)
def test_gpt_case_losses_agree(gpt_shape, export):
  case = train_cases.gpt_case(shape_args(gpt_shape=gpt_shape), dict(vocab_size=101, **SMALL))
  assert case.batch['ids'].shape == (2, 8)  # seq + 1: inputs and their next tokens
  ours, theirs = losses(case, export)
  np.testing.assert_allclose(ours, theirs, rtol=1e-5)


def sdpa_state(reference: dict, layers: int, heads: int) -> dict:
  """A ``torch_reference.NanoGPT`` state dict -> ``SdpaGPT``'s: its heads' query, key and value rows stacked into
  one ``c_attn``, the rest renamed (module by module, theirs -> ours)."""
  renames = {
    'token_embedding_table': 'wte',
    'position_embedding_table': 'wpe',
    'ln_f': 'ln_f',
    'lm_head': 'head',
  }
  for i in range(layers):
    for theirs, ours in [
      ('ln1', 'ln_1'),
      ('ln2', 'ln_2'),
      ('sa.proj', 'attn.c_proj'),
      ('ffwd.net.0', 'mlp.0'),
      ('ffwd.net.2', 'mlp.2'),
    ]:
      renames[f'blocks.{i}.{theirs}'] = f'blocks.{i}.{ours}'
  state = {}
  for key, value in reference.items():
    module, _, leaf = key.rpartition('.')
    if module in renames:
      state[f'{renames[module]}.{leaf}'] = value
  for i in range(layers):
    rows = [
      reference[f'blocks.{i}.sa.heads.{h}.{part}.weight']
      for part in ('query', 'key', 'value')
      for h in range(heads)
    ]
    state[f'blocks.{i}.attn.c_attn.weight'] = torch.cat(rows)
  return state


def test_sdpa_peer_computes_the_course_gpt():
  case = train_cases.gpt_case(shape_args(), dict(vocab_size=101, **SMALL))
  peer = case.torch_peers['torch sdpa']()
  params = spread_params(case)
  peer.load_state_dict(sdpa_state(to_reference_gpt(case.model, params, as_torch=True), 2, 3))
  np.testing.assert_allclose(our_loss(case, params), torch_loss(case, peer), rtol=1e-5)


def test_seq2seq_case_losses_agree():
  small = dict(src_vocab_size=97, tgt_vocab_size=101, **SMALL)
  case = train_cases.seq2seq_case(shape_args(), small)
  assert case.batch['src'].shape == (2, 7) and case.batch['tgt'].shape == (2, 8)
  assert case.tokens == 2 * 2 * 7  # source and target tokens
  ours, theirs = losses(case, to_reference_transformer)
  np.testing.assert_allclose(ours, theirs, rtol=1e-5)


def test_xla_products_row_compiles_without_the_library(monkeypatch):
  """``--xla-products``: the bf16 step compiled with the library off calls oneDNN nowhere; ours, everywhere it takes a
  product of at least ``MIN_ROWS`` rows; the switch is as it was afterwards."""
  monkeypatch.setenv(onednn_matmul.SWITCH, '1')
  switch = product_library_switch(bf16=True)
  if switch is None:
    pytest.skip('oneDNN does not run bf16 products here (not installed, or no AVX-512)')
  assert switch == onednn_matmul.SWITCH
  rows = onednn_matmul.MIN_ROWS
  case = train_cases.gpt_case(
    shape_args(seq=rows // 2), dict(vocab_size=101, dtype='bfloat16', **SMALL)
  )
  ours = compiled_jax_step(case)[0].as_text()
  theirs = compiled_jax_step(case, library_off=switch)[0].as_text()
  assert ours.count(onednn_matmul.TARGET) >= 6 and theirs.count(onednn_matmul.TARGET) == 0
  assert os.environ[switch] == '1'


@pytest.mark.slow
def test_gpu_command_runs_on_a_small_gpt2(tmp_path, capsys):
  """The GPT-2-small training row the GPU figures come from (``benchmarks/gpu_check.sh``), here on a 1-layer,
  narrow GPT-2 at T=15: every row is timed and written, the JSON names the CPU, and ``benchmarks.targets`` reads it
  (its CPU targets, met or not at this size)."""
  out = tmp_path / 'train.json'
  command = [
    *('--models', 'gpt', '--gpt-shape', 'gpt2-small', '--gpt-layers', '1', '--seq', '15'),
    *('--batch', '2', '--repeats', '1', '--pause', '0', '--no-torch-compile'),
    *('--override', 'vocab_size=103', '--override', 'd_model=24', '--override', 'num_heads=3'),
    *('--override', 'd_ff=40', '--precision', 'float32', 'bfloat16', '--xla-products'),
    *('--out', str(out)),
  ]
  done = subprocess.run(
    [sys.executable, '-m', 'benchmarks.train_throughput', *command],
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert done.returncode == 0, done.stderr[-2000:]
  result = json.loads(out.read_text())
  rows = {(r['precision'], r['impl']): r for r in result['rows']}
  for precision in ('f32', 'bf16'):
    assert {'jax', 'jax nnx', 'torch eager'} <= {impl for p, impl in rows if p == precision}
    assert rows[precision, 'jax']['params_M'] == rows[precision, 'torch eager']['params_M']
    assert all(rows[precision, i]['step_ms'] > 0 for i in ('jax', 'jax nnx', 'torch eager'))
  assert 'cpu_family' in result['machine']
  for precision, library in (('f32', 'f32_products'), ('bf16', 'bf16_products')):
    # ours with the library off, where a library runs this precision's products
    assert ((precision, XLA_PRODUCTS) in rows) == (result['machine'][library] != 'XLA')
  assert check_targets(['--train', str(out)]) in (0, 1)
  printed = capsys.readouterr().out
  for precision in ('f32', 'bf16'):
    assert f'gpt {precision} training vs torch eager' in printed


def test_gpu_check_stops_where_jax_sees_no_gpu(tmp_path):
  """``benchmarks/gpu_check.sh`` on a CPU: one line saying so and a non-zero exit, before any benchmark starts."""
  done = subprocess.run(
    ['bash', 'benchmarks/gpu_check.sh', str(tmp_path)],
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, 'PYTHON': sys.executable},
  )
  assert done.returncode != 0
  assert 'JAX sees no GPU here' in done.stdout + done.stderr
  assert sorted(p.name for p in tmp_path.iterdir()) == ['machine.log']
