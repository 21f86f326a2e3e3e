"""Shared helpers for the benchmark scripts: machine facts, timing, a printed table and a JSON record."""

from __future__ import annotations

import json
import os
import platform
import time
from typing import Callable, Sequence

import jax


def machine_info() -> dict:
  """What the figures were measured on."""
  info = {
      'platform': platform.platform(),
      'processor': platform.processor() or platform.machine(),
      'cpu_count': os.cpu_count(),
      'python': platform.python_version(),
      'jax': jax.__version__,
      'jax_backend': jax.default_backend(),
      'devices': [d.device_kind for d in jax.devices()],
  }
  try:
    import flax
    info['flax'] = flax.__version__
  except ImportError:
    pass
  try:
    import torch
    info['torch'] = torch.__version__
    info['torch_threads'] = torch.get_num_threads()
  except ImportError:
    pass
  return info


def time_call(fn: Callable[[], object], *, warmup: int = 2, repeats: int = 5,
              sync: Callable[[object], object] = jax.block_until_ready) -> float:
  """Median seconds per call of ``fn`` after ``warmup`` untimed calls (compilation excluded)."""
  for _ in range(warmup):
    sync(fn())
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    sync(fn())
    samples.append(time.perf_counter() - start)
  samples.sort()
  return samples[len(samples) // 2]


def print_table(rows: Sequence[dict], columns: Sequence[str]) -> None:
  """A plain-text table of ``rows`` restricted to ``columns``."""
  cells = [[_fmt(r.get(c, '')) for c in columns] for r in rows]
  widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
  print('  '.join(c.ljust(w) for c, w in zip(columns, widths)))
  print('  '.join('-' * w for w in widths))
  for row in cells:
    print('  '.join(v.ljust(w) for v, w in zip(row, widths)))


def _fmt(value) -> str:
  if isinstance(value, float):
    return f'{value:,.3g}' if abs(value) < 100 else f'{value:,.0f}'
  return str(value)


def write_json(path: str, name: str, config: dict, rows: Sequence[dict]) -> None:
  """Writes ``{'benchmark', 'machine', 'config', 'rows'}`` to ``path``."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump({'benchmark': name, 'machine': machine_info(), 'config': config, 'rows': list(rows)}, f, indent=2)
  print(f'wrote {path}')
