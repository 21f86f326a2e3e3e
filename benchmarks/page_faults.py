"""Minor page faults, system time and wall time per training step of the course GPT: ours with glibc's default
allocator settings, ours with :func:`transformer_jax.host_memory.keep_freed_memory` (what ``python -m train`` and the
other benchmarks use), and the PyTorch reference. Each runs in its own process, alternating, ``--rounds`` times.

    python -m benchmarks.page_faults [--steps 6] [--rounds 3] [--batch 8] [--seq 256]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

IMPLS = ('jax (glibc defaults)', 'jax (freed memory kept)', 'torch eager')


def measure(impl: str, steps: int, batch: int, seq: int) -> dict:
  """In this process: ``steps`` steps after a warm-up one; faults, system and user seconds and wall seconds per
  step (``getrusage`` of the whole process, so XLA's and PyTorch's threads count)."""
  import resource
  import time

  if impl == IMPLS[1]:
    from transformer_jax.host_memory import keep_freed_memory

    keep_freed_memory()
  import jax
  import numpy as np

  from benchmarks import train_cases
  from benchmarks import train_throughput as tt

  args = argparse.Namespace(gpt_shape='course', seq=seq, batch=batch, dropout=0.0, gpt_layers=None)
  case = train_cases.gpt_case(args, {})
  if impl.startswith('jax'):
    optimizer, step = tt.linen_step(case)
    params = train_cases.init_params(case)
    state = [params, optimizer.init(params)]
    data, rng = jax.device_put(case.batch), jax.random.key(1)
    compiled = jax.jit(step, donate_argnums=(0, 1))

    def call():
      state[0], state[1], value = compiled(state[0], state[1], data, rng)
      return value

    sync = lambda value: value.block_until_ready()  # noqa: E731
  else:
    import torch

    torch.manual_seed(0)
    module = case.torch_model().train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=tt.LR, weight_decay=tt.WEIGHT_DECAY)
    data = {k: torch.from_numpy(v.astype(np.int64)) for k, v in case.batch.items()}

    def call():
      value = case.torch_loss(module, data)
      optimizer.zero_grad(set_to_none=True)
      value.backward()
      optimizer.step()
      return value

    sync = lambda value: value.item()  # noqa: E731
  sync(call())
  before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
  for _ in range(steps):
    value = call()
  sync(value)
  after, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - start
  return {
    'impl': impl,
    'minor_faults': (after.ru_minflt - before.ru_minflt) / steps,
    'system_ms': (after.ru_stime - before.ru_stime) / steps * 1e3,
    'user_ms': (after.ru_utime - before.ru_utime) / steps * 1e3,
    'wall_ms': wall / steps * 1e3,
  }


def main(argv=None):
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('--steps', type=int, default=6)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--seq', type=int, default=256)
  parser.add_argument('--worker', choices=IMPLS, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    print(json.dumps(measure(args.worker, args.steps, args.batch, args.seq)))
    return
  from benchmarks.harness import machine_info, print_machine, print_table

  print_machine(machine_info())
  rows = []
  for _ in range(args.rounds):
    for impl in IMPLS:
      flags = [
        f'--steps={args.steps}',
        f'--batch={args.batch}',
        f'--seq={args.seq}',
        f'--worker={impl}',
      ]
      out = subprocess.run(
        [sys.executable, '-m', 'benchmarks.page_faults', *flags],
        capture_output=True,
        text=True,
        check=True,
      )
      rows.append(json.loads(out.stdout.splitlines()[-1]))
      print(rows[-1], flush=True)
  print_table(rows, ['impl', 'minor_faults', 'system_ms', 'user_ms', 'wall_ms'])


if __name__ == '__main__':
  main()
