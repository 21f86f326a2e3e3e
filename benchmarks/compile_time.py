"""Compile time against depth (plain loop vs ``nn.scan``) and peak memory with and without remat.

    python -m benchmarks.compile_time [--layers 2 6 12 24] [--out benchmarks/results/compile_time.json]

Compile time is the wall time of ``jax.jit(train_step).lower(...).compile()`` for a GPT training step (forward,
backward, AdamW). Memory is XLA's own estimate of the compiled step's temporary buffers (``memory_analysis``), the
activation memory that remat trades for recomputation.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from benchmarks.harness import (
  adamw_step,
  machine_info,
  next_token_loss,
  print_machine,
  print_table,
  write_json,
)
from transformer_jax import GPT, GPTConfig


def train_step_for(cfg: GPTConfig):
  model = GPT(cfg)
  optimizer, step = adamw_step(
    lambda params, batch: next_token_loss(
      model.apply({'params': params}, batch[:, :-1]), batch[:, 1:]
    )
  )
  return model, optimizer, step


def measure(cfg: GPTConfig, batch: int, seq: int) -> dict:
  model, optimizer, step = train_step_for(cfg)
  tokens = jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32)
  params = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, seq), jnp.int32))['params']
  )
  opt_state = jax.eval_shape(optimizer.init, params)
  start = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, tokens).compile()
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  temp_mb = getattr(memory, 'temp_size_in_bytes', 0) / 2**20 if memory is not None else float('nan')
  return {'compile_s': seconds, 'temp_MiB': temp_mb}


def main():
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('--layers', type=int, nargs='+', default=[2, 6, 12, 24])
  parser.add_argument('--d-model', type=int, default=384)
  parser.add_argument('--heads', type=int, default=6)
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--seq', type=int, default=256)
  parser.add_argument('--out', default='benchmarks/results/compile_time.json')
  args = parser.parse_args()

  info = machine_info()
  print_machine(info)
  base = GPTConfig.course(
    d_model=args.d_model, num_heads=args.heads, d_ff=4 * args.d_model, max_len=args.seq
  )
  rows = []
  for layers in args.layers:
    for scan in (False, True):
      for remat in ('none', 'full', 'dots'):
        if remat != 'none' and layers != max(args.layers):
          continue  # memory is compared at the largest depth only
        cfg = base.replace(num_layers=layers, scan_layers=scan, remat_policy=remat)
        row = {
          'layers': layers,
          'stack': 'scan' if scan else 'loop',
          'remat': remat,
          **measure(cfg, args.batch, args.seq),
        }
        rows.append(row)
        print(row, flush=True)
  print()
  print_table(rows, ['layers', 'stack', 'remat', 'compile_s', 'temp_MiB'])
  scan_times = {
    r['layers']: r['compile_s'] for r in rows if r['stack'] == 'scan' and r['remat'] == 'none'
  }
  lo, hi = min(scan_times), max(scan_times)
  print(f'\nscan compile time {hi} layers / {lo} layers: {scan_times[hi] / scan_times[lo]:.2f}x')
  write_json(args.out, 'compile_time', info, vars(args), rows)


if __name__ == '__main__':
  main()
