"""Training-step throughput of our GPT, encoder-decoder and BERT against PyTorch (eager and ``torch.compile``).

    python -m benchmarks.train_throughput [--models gpt seq2seq bert] [--batch 8] [--seq 256]
        [--gpt-shape course|gpt2-small] [--gpt-layers N] [--seq2seq-layers 2] [--bert-layers 2]
        [--bert-targets masked|all] [--dropout 0.0]
        [--override fused_qkv=True] [--precision float32 bfloat16] [--xla-products]
    python -m benchmarks.train_throughput --models gpt --gpt-shape gpt2-small --seq 1024   # GPT-2 small, on a GPU

Each model is built twice with the same shapes (``benchmarks/train_cases.py``): ours in Flax and its PyTorch
counterpart (``torch_reference.NanoGPT`` for the course GPT, Hugging Face's ``GPT2LMHeadModel`` for GPT-2 small,
``torch_reference.Seq2SeqTransformer`` for the course encoder-decoder, Hugging Face's ``BertForMaskedLM`` from a
config, random init, 15% of positions predicted as in masked-LM training). One step is forward,
cross-entropy, backward and AdamW, in three forms: ours in Linen (``jax``), the same model and update the NNX way
(``jax nnx``: ``transformer_jax.nnx``, an ``nnx.Optimizer``, one ``nnx.jit``), and PyTorch (for the course GPT also
``torch sdpa``: ``benchmarks/sdpa_gpt.py``, nanoGPT's layout with ``F.scaled_dot_product_attention``). Warm-up
(compilation) is excluded and timed separately; each JAX step ends in ``block_until_ready``, each PyTorch step in
``loss.item()``. Every implementation is built and warmed up first, then timed in ``--repeats`` interleaved rounds
(one step of each per round), so the drift of a shared machine falls on all of them alike. The median step time
gives tokens/s (every input token, source and target for the encoder-decoder),
achieved FLOP/s from the matmul count (6 x dense weights + 12 x L x D x context per token, the usual estimate, with
no discount for causal masking) and the model FLOPs utilisation against the machine's peak (measured with a large
float32 ``jnp.dot`` on CPU, the datasheet bf16 peak on a GPU/TPU). ``--precision bfloat16`` rows compute in bf16 on
both sides (our ``dtype='bfloat16'`` with float32 master weights; ``torch.autocast`` around PyTorch's forward), the
default on a GPU/TPU; on GPUs ours asks for cuDNN attention. Where a library runs our products on this CPU (MKL's
float32 ones, oneDNN's bf16 ones: the ``f32_products`` and ``bf16_products`` of the machine line),
``--xla-products`` adds ours compiled with it switched off (``jax, XLA products``), timed in the same rounds: its
``jax_speedup`` is what the library gives on this CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import time
from typing import Callable
from unittest import mock

import jax
import numpy as np
import optax
from flax import nnx

import transformer_jax.nnx as tnnx
from benchmarks.harness import (
  XLA_PRODUCTS,
  adamw_step,
  keep_host_memory,
  machine_info,
  on_accelerator,
  peak_flops,
  print_machine,
  print_table,
  product_library_switch,
  time_interleaved,
  torch_matmul_peak,
  write_json,
)
from benchmarks.train_cases import CASES, Case, add_shape_arguments, init_params, parse_overrides

# the same AdamW on both sides (optax's default decay is 1e-4, PyTorch's 1e-2)
LR, WEIGHT_DECAY = 3e-4, 0.01


def linen_step(case: Case):
  """``(optimizer, step)`` of our Linen model's AdamW step (:func:`benchmarks.harness.adamw_step`),
  ``step(params, opt_state, batch, dropout_key) -> (params, opt_state, loss)``."""

  def loss(params, batch, rng):
    return case.loss(
      functools.partial(case.model.apply, {'params': params}, rngs={'dropout': rng}), batch
    )

  return adamw_step(loss, LR, WEIGHT_DECAY)


@dataclasses.dataclass
class Prepared:
  """One implementation's compiled, warmed-up training step: ``call()`` runs one step and waits for it."""

  impl: str
  call: Callable[[], object]
  compile_s: float | None
  params_M: float


def compiled_jax_step(case: Case, library_off: str | None = None):
  """``(compiled, state, batch, rng, compile_s)``: our Linen AdamW step compiled with the parameters and optimizer
  state donated, ``state = [params, opt_state]`` to feed it, the batch already on the device (the step never waits
  for the host). ``library_off``: a product library's switch (``harness.product_library_switch``), set to ``0``
  while the step is traced and compiled, so its products are XLA's."""
  optimizer, step = linen_step(case)
  params = init_params(case)
  opt_state = optimizer.init(params)
  batch = jax.device_put(case.batch)
  rng = jax.random.key(1)
  start = time.perf_counter()
  with mock.patch.dict(os.environ, {library_off: '0'} if library_off else {}):
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, batch, rng).compile()
  return compiled, [params, opt_state], batch, rng, time.perf_counter() - start


def prepare_jax(case: Case, library_off: str | None = None) -> Prepared:
  """Our Linen step (:func:`compiled_jax_step`): ``jax``, or with ``library_off`` the :data:`XLA_PRODUCTS` row."""
  compiled, state, batch, rng, compile_s = compiled_jax_step(case, library_off)
  # counted now: the step donates these buffers
  params_m = sum(x.size for x in jax.tree.leaves(state[0])) / 1e6

  def call():
    state[0], state[1], loss = compiled(state[0], state[1], batch, rng)
    return jax.block_until_ready(loss)

  return Prepared(XLA_PRODUCTS if library_off else 'jax', call, compile_s, params_m)


def prepare_nnx(case: Case) -> Prepared:
  """The same step the NNX way: our model as an ``nnx.Module`` (``transformer_jax.nnx``), an ``nnx.Optimizer`` with
  the same AdamW, ``nnx.value_and_grad`` and ``optimizer.update`` in one ``nnx.jit`` that donates both."""
  model = tnnx.from_linen(case.model, init_params(case))
  optimizer = nnx.Optimizer(model, optax.adamw(LR, weight_decay=WEIGHT_DECAY), wrt=nnx.Param)
  params_m = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) / 1e6

  @functools.partial(nnx.jit, donate_argnums=(0, 1))
  def step(model, optimizer, batch, rng):
    def loss(model):
      # the stream is made inside the traced function, where its draw may update it
      return case.loss(lambda *a, **k: model(*a, rngs=nnx.Rngs(dropout=rng), **k), batch)

    value, grads = nnx.value_and_grad(loss)(model)
    optimizer.update(model, grads)
    return value

  batch = jax.device_put(case.batch)
  rng = jax.random.key(1)
  call = lambda: jax.block_until_ready(step(model, optimizer, batch, rng))  # noqa: E731
  start = time.perf_counter()
  call()  # compiles
  return Prepared('jax nnx', call, time.perf_counter() - start, params_m)


def prepare_torch(case: Case, compile_model: bool, bf16: bool, build=None, impl=None) -> Prepared:
  """A PyTorch training step of ``case.torch_model`` (or ``build``), under ``torch.autocast`` in bfloat16 when
  ``bf16`` (master weights and AdamW in float32, as ours)."""
  import torch

  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  torch.manual_seed(0)
  module = (build or case.torch_model)().to(device).train()
  params_m = sum(p.numel() for p in module.parameters()) / 1e6
  model = torch.compile(module) if compile_model else module
  optimizer = torch.optim.AdamW(module.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
  batch = {k: torch.from_numpy(v.astype(np.int64)).to(device) for k, v in case.batch.items()}
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)

  def call():
    with autocast:
      loss = case.torch_loss(model, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()

  start = time.perf_counter()
  call()  # torch.compile compiles here; eager warms its caches
  first_s = time.perf_counter() - start
  name = impl or ('torch.compile' if compile_model else 'torch eager')
  return Prepared(name, call, first_s if compile_model else None, params_m)


def time_case(case: Case, args, bf16: bool, peak: float) -> list[dict]:
  """The rows of one case at one precision: ours (Linen, NNX), PyTorch eager, its peers, ``torch.compile``.

  Every implementation is built and warmed up first, then timed in interleaved rounds (one step of each per round),
  so a change in what else the machine is doing falls on all of them alike."""
  prepared, failed = [prepare_jax(case)], []
  switch = product_library_switch(bf16) if args.xla_products else None
  if switch is not None:
    prepared.append(prepare_jax(case, library_off=switch))
  if not args.no_nnx:
    prepared.append(prepare_nnx(case))
  if not args.no_torch:
    prepared.append(prepare_torch(case, compile_model=False, bf16=bf16))
    for impl, build in case.torch_peers.items():
      prepared.append(prepare_torch(case, False, bf16, build=build, impl=impl))
    if not args.no_torch_compile:
      try:
        prepared.append(prepare_torch(case, compile_model=True, bf16=bf16))
      except Exception as e:  # noqa: BLE001 (a compiler failure is a result to report, not a crash)
        failed.append(
          {'impl': 'torch.compile', 'error': f'{type(e).__name__}: {str(e).splitlines()[0][:120]}'}
        )
  seconds = time_interleaved(
    [p.call for p in prepared], warmup=1, repeats=args.repeats, pause_s=args.pause
  )
  results = [
    {'impl': p.impl, 'step_s': s, 'compile_s': p.compile_s, 'params_M': p.params_M}
    for p, s in zip(prepared, seconds)
  ]
  rows, jax_s = [], results[0]['step_s']
  for r in results + failed:
    row = {'model': case.name, 'precision': 'bf16' if bf16 else 'f32', **r}
    if 'step_s' in r:
      s = r['step_s']
      row.update(
        step_ms=s * 1e3,
        tokens_s=case.tokens / s,
        gflop_s=case.flops / s / 1e9,
        mfu_pct=100 * case.flops / s / peak,
        jax_speedup=s / jax_s,
      )
    rows.append(row)
    print({k: v for k, v in row.items() if k != 'step_s'}, flush=True)
  return rows


def main(argv=None):
  keep_host_memory()
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument(
    '--models', nargs='+', choices=sorted(CASES), default=['gpt', 'seq2seq', 'bert']
  )
  add_shape_arguments(parser)
  parser.add_argument(
    '--repeats',
    type=int,
    default=5,
    help='timed rounds, one step of each implementation per round (median reported)',
  )
  parser.add_argument(
    '--pause',
    type=float,
    default=0.3,
    help='untimed seconds of sleep before each timed step, so no step starts while the previous '
    "one's thread pool still spins (0: back to back)",
  )
  parser.add_argument(
    '--precision',
    nargs='+',
    choices=['float32', 'bfloat16'],
    default=None,
    help='float32 and/or bfloat16 rows (default: float32 on a CPU, bfloat16 on a GPU/TPU)',
  )
  parser.add_argument('--no-torch', action='store_true', help='ours only')
  parser.add_argument('--no-nnx', action='store_true', help='no row for our models in NNX')
  parser.add_argument('--no-torch-compile', action='store_true')
  parser.add_argument(
    '--xla-products',
    action='store_true',
    help=f'where a library runs our products (MKL float32, oneDNN bf16), a row of ours with it off ({XLA_PRODUCTS!r})',
  )
  parser.add_argument('--out', default='benchmarks/results/train_throughput.json')
  args = parser.parse_args(argv)

  overrides = {}
  if jax.default_backend() == 'gpu':
    overrides['attention_implementation'] = 'cudnn'
  overrides.update(parse_overrides(args.override))
  precisions = args.precision or (['bfloat16'] if on_accelerator() else ['float32'])
  info = machine_info()
  print_machine(info)
  peak, peak_source = peak_flops()
  print(
    f'peak {peak / 1e9:,.0f} GFLOP/s ({peak_source}); our config overrides: {overrides}', flush=True
  )
  torch_peak = None
  if not on_accelerator() and not args.no_torch:
    torch_peak = torch_matmul_peak()
    print(f'torch.mm float32 2048^2: {torch_peak / 1e9:,.0f} GFLOP/s', flush=True)

  rows = []
  for name in args.models:
    for precision in precisions:
      # bfloat16: our compute dtype with float32 master weights (param_dtype); PyTorch under torch.autocast
      case = CASES[name](args, {'dtype': precision, **overrides})
      rows += time_case(case, args, precision == 'bfloat16', peak)
  print()
  print_table(
    rows,
    [
      'model',
      'precision',
      'impl',
      'params_M',
      'step_ms',
      'tokens_s',
      'gflop_s',
      'mfu_pct',
      'jax_speedup',
      'compile_s',
      'error',
    ],
  )
  write_json(
    args.out,
    'train_throughput',
    info,
    {
      **vars(args),
      'overrides': overrides,
      'precisions': precisions,
      'peak_flops': peak,
      'peak_source': peak_source,
      'torch_matmul_peak_flops': torch_peak,
    },
    rows,
  )


if __name__ == '__main__':
  main()
