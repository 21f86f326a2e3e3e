"""The benchmark harness: machine facts, timing, a printed table and a JSON record, shared by the benchmark scripts."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from importlib.metadata import version
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from transformer_jax.host_memory import keep_freed_memory
from transformer_jax.kernels import cpu_build, mkl_matmul, onednn_matmul
from transformer_jax.modules.cross_entropy import softmax_cross_entropy

_HOST_MEMORY = {'kept': False}


def keep_host_memory() -> None:
  """The first call of the speed benchmarks' ``main`` (training throughput, decoding), as in ``python -m train``:
  each step's scratch buffer is reused, not faulted in again (:mod:`transformer_jax.host_memory`). The benchmarks
  that measure memory leave glibc as it is. ``machine_info`` records whether it applied."""
  _HOST_MEMORY['kept'] = keep_freed_memory()


# /proc/cpuinfo flags that decide which XLA:CPU and oneDNN kernels run
_CPU_FLAGS = ('avx2', 'avx512f', 'avx512_bf16', 'avx512_vnni', 'amx_bf16', 'amx_tile')


def cpu_info() -> dict:
  """The CPU by vendor, name, family and model number (AMD Zen 4 is ``cpu family 25``, Zen 5 ``26``; Intel's are all
  family 6, told apart by model: 106 is Ice Lake server), and its matmul-relevant flags."""
  fields = cpu_build.cpuinfo()
  if fields is None:
    return {}
  flags = cpu_build.cpu_flags() or set()
  return {
    'cpu_vendor': fields.get('vendor_id'),
    'cpu_model': fields.get('model name'),
    'cpu_family': fields.get('cpu family'),
    'cpu_model_number': fields.get('model'),
    'cpu_flags': ' '.join(f for f in _CPU_FLAGS if f in flags),
  }


# train_throughput's row of ours with the product library switched off (--xla-products)
XLA_PRODUCTS = 'jax, XLA products'


def product_library_switch(bf16: bool) -> str | None:
  """The switch (environment variable) of the library that runs our training products of this precision on the
  CPU (MKL's float32 ones, oneDNN's bf16 ones), or None where they are XLA's."""
  if bf16:
    dtype = jnp.bfloat16
    return (
      onednn_matmul.SWITCH if onednn_matmul.applies(dtype, dtype, onednn_matmul.MIN_ROWS) else None
    )
  dtype = jnp.float32
  return mkl_matmul.SWITCH if mkl_matmul.applies(dtype, dtype, dtype, mkl_matmul.MIN_ROWS) else None


def machine_info() -> dict:
  """What the figures were measured on."""
  info = {
    'platform': platform.platform(),
    'processor': platform.processor() or platform.machine(),
    **cpu_info(),
    'cpu_count': os.cpu_count(),
    'python': platform.python_version(),
    'jax': jax.__version__,
    'jax_backend': jax.default_backend(),
    'devices': [d.device_kind for d in jax.devices()],
    'host_memory_kept': _HOST_MEMORY['kept'],
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
    info['torch_interop_threads'] = torch.get_num_interop_threads()
  except ImportError:
    pass
  # XLA:CPU sizes its thread pool from the CPUs this process may run on; XLA_FLAGS can change that.
  info['xla_cpu_threads'] = (
    len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  )
  info['xla_flags'] = os.environ.get('XLA_FLAGS', '')
  # which library runs our float32 and bf16 products on the CPU (transformer_jax.kernels.mkl_matmul, onednn_matmul)
  info['f32_products'] = 'MKL' if product_library_switch(bf16=False) else 'XLA'
  onednn = product_library_switch(bf16=True)
  info['bf16_products'] = f'oneDNN {version(onednn_matmul.DISTRIBUTION)}' if onednn else 'XLA'
  info['load_average'] = os.getloadavg() if hasattr(os, 'getloadavg') else None
  return info


def print_machine(info: dict) -> None:
  keys = (
    'cpu_vendor',
    'cpu_model',
    'cpu_family',
    'cpu_model_number',
    'cpu_flags',
    'processor',
    'cpu_count',
    'jax',
    'jax_backend',
    'devices',
    'flax',
    'torch',
    'torch_threads',
    'torch_interop_threads',
    'xla_cpu_threads',
    'xla_flags',
    'f32_products',
    'bf16_products',
    'load_average',
  )
  print('; '.join(f'{k}={info[k]}' for k in keys if k in info), flush=True)


def on_accelerator() -> bool:
  return jax.default_backend() in ('gpu', 'tpu')


# Dense bf16 peaks from the vendors' datasheets (FLOP/s), keyed by a substring of jax's device_kind.
DATASHEET_BF16_PEAK = {
  'H200': 989e12,
  'H100': 989e12,
  'A100': 312e12,
  'L4': 121e12,
  'A10': 125e12,
  'V100': 125e12,
  'TPU v6': 918e12,
  'TPU v5p': 459e12,
  'TPU v5': 197e12,
  'TPU v4': 275e12,
}


def matmul_peak(size: int = 2048, dtype=jnp.float32, repeats: int = 10) -> float:
  r"""FLOP/s of the fastest of ``repeats`` large ``(size, size) @ (size, size)`` ``jnp.dot``\ s: the machine's practical
  peak (the fastest, since other processes on a shared machine only ever slow it down)."""
  a = jnp.ones((size, size), dtype)
  dot = jax.jit(jnp.dot)
  return 2 * size**3 / time_call(lambda: dot(a, a), warmup=2, repeats=repeats, best=True)


def torch_matmul_peak(size: int = 2048, repeats: int = 10) -> float:
  """The same measurement through ``torch.mm`` (float32, CPU), for comparison: PyTorch's BLAS is not XLA's."""
  import torch

  a = torch.ones(size, size)
  return (
    2
    * size**3
    / time_call(lambda: torch.mm(a, a), warmup=2, repeats=repeats, sync=lambda x: x, best=True)
  )


def peak_flops() -> tuple[float, str]:
  """``(FLOP/s, where it comes from)``: the datasheet bf16 peak on a known GPU/TPU, else a measured matmul."""
  kind = jax.devices()[0].device_kind
  if on_accelerator():
    for name, flops in DATASHEET_BF16_PEAK.items():
      if name.lower() in kind.lower():
        return flops, f'datasheet bf16 peak of {kind}'
    return matmul_peak(8192, jnp.bfloat16), f'measured bf16 8192^2 jnp.dot on {kind}'
  return matmul_peak(), f'measured float32 2048^2 jnp.dot on {kind}'


def bandwidth_probe(mib: int = 512) -> tuple[Callable[[], object], int]:
  """``(call, bytes)``: a call that sums a ``mib`` MiB float32 array (read once, nothing written back) and waits for
  it, compiled and run once; ``bytes / seconds`` of a call is the read bandwidth."""
  x = jnp.ones((mib * 2**20 // 4,), jnp.float32)
  total = jax.jit(jnp.sum)
  call = lambda: jax.block_until_ready(total(x))  # noqa: E731
  call()
  return call, x.nbytes


def memory_bandwidth(mib: int = 512, repeats: int = 10) -> float:
  """Read bandwidth in bytes/s: the fastest call of :func:`bandwidth_probe`."""
  call, size = bandwidth_probe(mib)
  return size / time_call(call, warmup=1, repeats=repeats, best=True)


def tree_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def time_call(
  fn: Callable[[], object],
  *,
  warmup: int = 2,
  repeats: int = 5,
  sync: Callable[[object], object] = jax.block_until_ready,
  best: bool = False,
) -> float:
  """Median (``best``: fastest) seconds per call of ``fn`` after ``warmup`` untimed calls (compilation excluded)."""
  for _ in range(warmup):
    sync(fn())
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    sync(fn())
    samples.append(time.perf_counter() - start)
  samples.sort()
  return samples[0] if best else samples[len(samples) // 2]


def interleaved_samples(
  calls: Sequence[Callable[[], object]], *, warmup: int = 1, repeats: int = 5, pause_s: float = 0.0
) -> list[list[float]]:
  """Seconds of each call of each of ``calls`` (each runs one step and waits for it), timed in ``repeats``
  interleaved rounds after ``warmup`` untimed ones: on a shared machine whose speed drifts, every call sees the
  same drift, so their ratios hold where back-to-back blocks of one call each would not. Each round starts one call
  later than the one before, so no call always follows the same one (a call that starts a round would otherwise
  always follow the last, and meet whatever it leaves running).

  ``pause_s``: an untimed sleep before each call. A thread pool that spins after its work (PyTorch's OpenMP
  workers do, for tens of milliseconds) takes cores from whatever runs next; the pause lets each call start on
  an idle machine, as it would in a training loop of its own."""
  for _ in range(warmup):
    for call in calls:
      time.sleep(pause_s)
      call()
  samples = [[] for _ in calls]
  for round_ in range(repeats):
    for i in range(len(calls)):
      index = (round_ + i) % len(calls)
      time.sleep(pause_s)
      start = time.perf_counter()
      calls[index]()
      samples[index].append(time.perf_counter() - start)
  return samples


def time_interleaved(calls: Sequence[Callable[[], object]], **timing) -> list[float]:
  """Median seconds per call of each of ``calls``, timed as :func:`interleaved_samples` (same arguments)."""
  return [statistics.median_high(times) for times in interleaved_samples(calls, **timing)]


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


def write_json(path: str, name: str, machine: dict, config: dict, rows: Sequence[dict]) -> None:
  """Writes ``{'benchmark', 'machine', 'config', 'rows'}`` to ``path`` (``machine``: the printed
  :func:`machine_info`)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(
      {'benchmark': name, 'machine': machine, 'config': config, 'rows': list(rows)}, f, indent=2
    )
  print(f'wrote {path}')


def adamw_step(loss_fn: Callable, learning_rate: float = 3e-4, weight_decay: float = 0.01):
  """``(optimizer, step)`` of one plain AdamW training step, ``step(params, opt_state, *batch) -> (params, opt_state,
  loss)``: the same update PyTorch's ``torch.optim.AdamW`` makes (no clipping or decay mask, unlike
  ``python -m train``, so both sides of a comparison do the same work). Weight decay 0.01 is PyTorch's default;
  optax's is 1e-4."""
  optimizer = optax.adamw(learning_rate, weight_decay=weight_decay)

  def step(params, opt_state, *batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return optimizer, step


def next_token_loss(logits, labels):
  """Mean cross-entropy of ``(B, T, V)`` logits against ``(B, T)`` labels (the library's loss, as the trainer's)."""
  return softmax_cross_entropy(logits, labels).nll.mean()
