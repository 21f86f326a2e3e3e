"""A Llama-3.2-1B-shaped model: the peak host memory of loading its sharded checkpoint, and greedy decoding speed.

    python -m benchmarks.llama_1b [--part load decode] [--dir CHECKPOINT] [--prompt 16] [--new 32] [--repeats 3]
        [--dtypes float32 bfloat16] [--torch-threads 0 1]

The model is a randomly initialised ``LlamaForCausalLM`` of Llama 3.2 1B's shape (16 layers, d_model 2048, 32 query
heads over 8 key/value heads of 64, SwiGLU FFN 8192, vocabulary 128,256, tied head, llama3 rope scaling: 1.24B
parameters), built on the ``meta`` device and filled with ``normal_(0, 0.02)`` in bfloat16 (the checkpoint's dtype, as
the real one's), then saved with ``save_pretrained(dir, max_shard_size='500MB')``: several shards and an
``model.safetensors.index.json``. ``--dir`` keeps it there (and reuses it when it is already there).

``load``: each measurement runs in a fresh interpreter, which imports its library, starts its backend, hands back the
freed heap (``malloc_trim``) and resets its peak resident set (``/proc/self/clear_refs``). ``load_peak_MB`` is then
the peak (``VmHWM``) during the load minus the resident set at that point, ``peak_MB`` the same once every weight has
been read once (transformers keeps the tensors it need not convert as views of the mapped checkpoint, resident only
once read; ours are read during the load), ``resident_MB`` what stays resident, and ``peak_x`` ``peak_MB`` over one
copy of the weights in the loaded dtype (``weights_MB``). Rows: ``load_hf`` into float32 and into bfloat16; ``whole
shards``, the loader as it was before it read tensor by tensor (every shard read with ``safetensors.numpy.load_file``,
every param converted in numpy, then all of them copied into jax arrays), skipped when the machine lacks the memory;
and transformers' ``from_pretrained(dir, dtype=...)``.

``decode``: batch 1, a random ``--prompt``-token prompt, ``--new`` new tokens, greedy, never stopping early (no end
token on either side; ``min_new_tokens`` on theirs). Ours: ``transformer_jax.generation.generate`` on the model
``load_hf`` converted, with float32 and with bfloat16 weights; theirs: ``model.generate`` after ``from_pretrained`` in
float32 and bfloat16, once with torch's own thread count and once with one thread (``--torch-threads``: PyTorch's
pool stalls when other processes share the cores, and one thread then often runs faster). Each run has its own
process, one after the other. A call's time includes the prompt's prefill; the first call (our compilation) is timed
apart as ``first_call_s``, and ``tokens_s`` comes from the median of the ``--repeats`` calls after it.
``vs_transformers`` divides the fastest transformers time of a dtype by each row's; ``match`` is the fraction of new
tokens on which our float32 run agrees with transformers' first float32 run. ``bound_tokens_s`` is the
memory-bandwidth bound of batch 1: the bandwidth over the bytes a step reads, every weight (the tied table once, as
the head) plus the key/value cache. The bandwidth (``harness.memory_bandwidth``: the sum of a 512 MiB float32 array,
fastest of 10) is measured in the same process just before and just after the timed calls, the faster of the two: on
a shared machine it moves from minute to minute.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = dict(
  num_hidden_layers=16,
  hidden_size=2048,
  num_attention_heads=32,
  num_key_value_heads=8,
  head_dim=64,
  intermediate_size=8192,
  vocab_size=128256,
  tie_word_embeddings=True,
  max_position_embeddings=131072,
  rms_norm_eps=1e-5,
  rope_parameters=dict(
    rope_type='llama3',
    rope_theta=500000.0,
    factor=32.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=8192,
  ),
  # no end token: both sides decode exactly --new tokens
  bos_token_id=None,
  eos_token_id=None,
  pad_token_id=None,
)
BYTES = {'float32': 4, 'bfloat16': 2}


# ---------------------------------------------------------------------------------------------------- the checkpoint


def save_model(directory: Path, layers: int) -> None:
  """A random Llama-3.2-1B-shaped checkpoint in bfloat16 shards. Built on the meta device, so the only allocation is
  the bfloat16 weights themselves, filled in place (no float32 copy, no transformers init pass)."""
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM

  config = LlamaConfig(**{**SHAPE, 'num_hidden_layers': layers})
  with torch.device('meta'):
    model = LlamaForCausalLM(config).to(torch.bfloat16)
  model = model.to_empty(device='cpu').eval()
  model.tie_weights()  # to_empty gave the head its own (empty) tensor
  torch.manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():  # the tied table once
      if name.endswith('norm.weight'):
        p.fill_(1.0).add_(0.02 * torch.randn_like(p))
      else:
        p.normal_(0.0, 0.02)
  model.save_pretrained(directory, max_shard_size='500MB')
  (directory / 'shape.json').write_text(json.dumps({'layers': layers}))


def checkpoint_info(directory: Path) -> dict:
  index = json.loads((directory / 'model.safetensors.index.json').read_text())
  return {
    'shards': len(set(index['weight_map'].values())),
    'checkpoint_MB': index['metadata']['total_size'] / 1e6,
  }


# --------------------------------------------------------------------------------------- memory of this process (MB)


def _status_mb(key: str) -> float:
  """``VmHWM`` (peak) or ``VmRSS`` (current) resident MB of this process (``ru_maxrss`` would include the parent's
  pages that a child inherits across fork and exec)."""
  with open('/proc/self/status') as f:
    return next(int(line.split()[1]) for line in f if line.startswith(key + ':')) * 1024 / 1e6


def _reset_peak() -> float:
  """Hands freed heap back, resets the peak to the current resident set; returns that resident set (the baseline)."""
  gc.collect()
  try:
    ctypes.CDLL('libc.so.6').malloc_trim(0)
  except OSError:
    pass
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
  except (
    OSError
  ):  # no reset: the peak is then measured from the start, against the resident set now
    pass
  return _status_mb('VmRSS')


def _available_mb() -> float:
  with open('/proc/meminfo') as f:
    return next(int(line.split()[1]) for line in f if line.startswith('MemAvailable:')) * 1024 / 1e6


# ------------------------------------------------------------------------------------------ one side in one process


def _start_jax():
  import jax

  jax.block_until_ready(
    jax.device_put(np.zeros(1))
  )  # the backend's own memory belongs to the baseline
  return jax


def load_ours(directory: Path, dtype: str):
  from transformer_jax.convert import load_hf

  jax = _start_jax()
  base = _reset_peak()
  start = time.perf_counter()
  model, params = load_hf(directory, dtype=dtype)
  jax.block_until_ready(params)
  return model, params, base, time.perf_counter() - start


def load_whole_shards(directory: Path, dtype: str):
  """The loader before it streamed: every shard read whole, every param converted in numpy, then copied to jax."""
  import jax.numpy as jnp
  import safetensors.numpy
  from flax import traverse_util

  from transformer_jax.convert.engine import our_shapes, to_model_layout
  from transformer_jax.convert.hf_directory import SPECS, read_config
  from transformer_jax.models import GPT

  jax = _start_jax()
  base = _reset_peak()
  start = time.perf_counter()
  shards = sorted(directory.glob('model-*.safetensors'))
  state = {k: v for s in shards for k, v in safetensors.numpy.load_file(s).items()}
  spec = SPECS['llama']
  model = GPT(spec.config_from_hf(read_config(directory), dtype))
  mapping, shapes = spec.table(model.config, 'LlamaForCausalLM'), our_shapes(model)
  flat = {
    r.ours: r.to_ours([state[k] for k in r.torch], shapes[r.ours]).astype(dtype)
    for r in mapping.rules
  }
  tree = jax.tree.map(jnp.asarray, traverse_util.unflatten_dict(flat, sep='/'))
  params = jax.block_until_ready(to_model_layout(tree, model.config))
  del state, flat
  return model, params, base, time.perf_counter() - start


def load_transformers(directory: Path, dtype: str):
  import torch
  from transformers import LlamaForCausalLM

  torch.zeros(1).sum()  # torch's own start-up memory belongs to the baseline
  base = _reset_peak()
  start = time.perf_counter()
  model = LlamaForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype)).eval()
  return model, None, base, time.perf_counter() - start


LOADERS = {'ours': load_ours, 'whole shards': load_whole_shards, 'transformers': load_transformers}


def _read_every_weight(model, params) -> None:
  """Reads each weight once. transformers keeps tensors that need no conversion as views of the mapped checkpoint,
  whose pages become resident only when first read; ours are all in memory already."""
  if params is not None:
    return
  import torch

  with torch.no_grad():
    for p in model.parameters():
      p.max()


def measure_load(impl: str, directory: Path, dtype: str) -> dict:
  model, params, base, seconds = LOADERS[impl](directory, dtype)
  loaded = _status_mb('VmHWM') - base
  _read_every_weight(model, params)
  return {
    'load_peak_MB': loaded,
    'peak_MB': _status_mb('VmHWM') - base,
    'resident_MB': _status_mb('VmRSS') - base,
    'load_s': seconds,
  }


def _timed(call, sync, repeats: int) -> tuple[float, float, object]:
  """``(first call's seconds, median seconds of the next repeats, the first call's output)``."""
  start = time.perf_counter()
  out = sync(call())
  first = time.perf_counter() - start
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    sync(call())
    seconds.append(time.perf_counter() - start)
  return first, sorted(seconds)[repeats // 2] if seconds else first, out


def prompt_ids(length: int) -> np.ndarray:
  return np.random.default_rng(0).integers(0, SHAPE['vocab_size'], (1, length), dtype=np.int32)


def _bandwidth_around(timed) -> tuple[float, tuple]:
  """``timed()`` between two measurements of the memory bandwidth (bytes/s; the faster one): on a shared machine
  the bound has to come from the same minute as the figure it bounds."""
  from benchmarks.harness import memory_bandwidth

  before = memory_bandwidth()
  result = timed()
  return max(before, memory_bandwidth()), result


def decode_ours(directory: Path, dtype: str, args) -> dict:
  import jax
  import jax.numpy as jnp

  from transformer_jax.generation import generate

  model, params, _, _ = load_ours(directory, dtype)
  prompt = jnp.asarray(prompt_ids(args.prompt))

  def call():
    return generate(model, params, prompt, max_new_tokens=args.new, temperature=None)

  bandwidth, (first, s, out) = _bandwidth_around(
    lambda: _timed(call, jax.block_until_ready, args.repeats)
  )
  cfg = model.config
  slots = args.prompt + args.new - 1  # the fixed-size cache every step reads
  kv_bytes = (
    2 * cfg.num_layers * slots * cfg.kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize
  )
  weights = sum(x.nbytes for x in jax.tree.leaves(params))
  return {
    'threads': len(os.sched_getaffinity(0)),
    'first_call_s': first,
    's': s,
    'bandwidth_GB_s': bandwidth / 1e9,
    'weights_MB': weights / 1e6,
    'kv_MB': kv_bytes / 1e6,
    'tokens': np.asarray(out).tolist(),
  }


def decode_transformers(directory: Path, dtype: str, args) -> dict:
  import torch

  if args.torch_threads[0]:
    torch.set_num_threads(args.torch_threads[0])
  model, _, _, _ = load_transformers(directory, dtype)
  ids = torch.from_numpy(prompt_ids(args.prompt).astype(np.int64))
  mask = torch.ones_like(ids)

  def call():
    with torch.inference_mode():
      return model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=args.new,
        min_new_tokens=args.new,
        do_sample=False,
        pad_token_id=0,
      )

  def timed():
    # a bfloat16 CPU run can be slow: one call is then the figure
    first, _, out = _timed(call, lambda x: x, 0)
    repeats = args.repeats if first * args.repeats < args.slow_s else 0
    _, s, _ = _timed(call, lambda x: x, repeats) if repeats else (first, first, out)
    return first, s, out, repeats

  bandwidth, (first, s, out, repeats) = _bandwidth_around(timed)
  cfg = model.config
  kv_bytes = (
    2
    * cfg.num_hidden_layers
    * (args.prompt + args.new - 1)
    * cfg.num_key_value_heads
    * cfg.head_dim
  ) * BYTES[dtype]
  weights = sum(p.numel() * p.element_size() for p in model.parameters())
  return {
    'threads': torch.get_num_threads(),
    'first_call_s': first,
    's': s,
    'bandwidth_GB_s': bandwidth / 1e9,
    'timed_calls': repeats or 1,
    'weights_MB': weights / 1e6,
    'kv_MB': kv_bytes / 1e6,
    'tokens': out[:, args.prompt :].numpy().tolist(),
  }


DECODERS = {'jax': decode_ours, 'transformers': decode_transformers}


def _spawn(part: str, impl: str, dtype: str, args, threads: int = 0) -> dict:
  """Runs one measurement in a fresh interpreter, so that its memory is its own."""
  with tempfile.NamedTemporaryFile(suffix='.json') as result:
    command = [sys.executable, '-m', 'benchmarks.llama_1b', '--side', part, impl, dtype]
    command += ['--dir', str(args.dir), '--result', result.name, '--prompt', str(args.prompt)]
    command += ['--new', str(args.new), '--repeats', str(args.repeats)]
    command += ['--slow-s', str(args.slow_s), '--torch-threads', str(threads)]
    subprocess.run(command, cwd=ROOT, check=True)
    with open(result.name) as f:
      return json.load(f)


# ------------------------------------------------------------------------------------------------------------ parts


def part_load(args, info: dict) -> list[dict]:
  params = info['params']
  rows = []
  for impl in ('ours', 'whole shards', 'transformers'):
    for dtype in args.dtypes:
      weights = params * BYTES[dtype] / 1e6
      row = {'part': 'load', 'impl': impl, 'dtype': dtype, 'weights_MB': weights}
      # the whole-shard loader holds the checkpoint, a numpy copy and a jax copy of the params at once
      needed = info['checkpoint_MB'] + 2 * weights if impl == 'whole shards' else weights
      if _available_mb() < 1.2 * needed + 2000:
        row['note'] = f'skipped: needs about {needed:,.0f} MB, {_available_mb():,.0f} MB available'
      else:
        row.update(_spawn('load', impl, dtype, args))
        row['peak_x'] = row['peak_MB'] / weights
      rows.append(row)
      print(row, flush=True)
  return rows


def part_decode(args) -> list[dict]:
  runs = [('transformers', dtype, n) for dtype in args.dtypes for n in args.torch_threads]
  runs += [('jax', dtype, 0) for dtype in args.dtypes]
  rows = []
  for impl, dtype, threads in runs:
    row = {'part': 'decode', 'impl': impl, 'dtype': dtype}
    row.update(_spawn('decode', impl, dtype, args, threads))
    row['ms_per_token'] = row['s'] / args.new * 1e3
    row['tokens_s'] = args.new / row['s']
    row['bound_tokens_s'] = row['bandwidth_GB_s'] * 1e3 / (row['weights_MB'] + row['kv_MB'])
    row['pct_of_bound'] = 100 * row['tokens_s'] / row['bound_tokens_s']
    rows.append(row)
    print({k: v for k, v in row.items() if k != 'tokens'}, flush=True)
  # against the fastest transformers run of the same dtype; tokens against the first float32 one
  fastest = {}
  for row in rows:
    if row['impl'] == 'transformers':
      fastest[row['dtype']] = min(fastest.get(row['dtype'], row['s']), row['s'])
  reference = next(
    (r for r in rows if r['impl'] == 'transformers' and r['dtype'] == 'float32'), None
  )
  for row in rows:
    if row['dtype'] in fastest:
      row['vs_transformers'] = fastest[row['dtype']] / row['s']
    if row['impl'] == 'jax' and row['dtype'] == 'float32' and reference:
      row['match'] = float(np.mean(np.asarray(row['tokens']) == np.asarray(reference['tokens'])))
  return rows


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog='python -m benchmarks.llama_1b',
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument('--part', nargs='+', choices=['load', 'decode'], default=['load', 'decode'])
  parser.add_argument('--dir', type=Path, help='where the checkpoint is kept (default: a temp dir)')
  parser.add_argument('--layers', type=int, default=16, help='fewer for a quick trial run')
  parser.add_argument('--dtypes', nargs='+', choices=sorted(BYTES), default=['float32', 'bfloat16'])
  parser.add_argument('--prompt', type=int, default=16, help='prompt tokens')
  parser.add_argument('--new', type=int, default=32, help='generated tokens')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument(
    '--slow-s',
    type=float,
    default=120.0,
    help='transformers calls are timed once when the repeats would take longer than this',
  )
  parser.add_argument(
    '--torch-threads',
    type=int,
    nargs='+',
    default=[0, 1],
    help="the transformers side's thread counts, one decoding run each (0: torch's own)",
  )
  parser.add_argument('--out', default='benchmarks/results/llama_1b.json')
  # internal: one measurement in its own process, its row written to --result
  parser.add_argument('--side', nargs=3, metavar=('PART', 'IMPL', 'DTYPE'), help=argparse.SUPPRESS)
  parser.add_argument('--result', help=argparse.SUPPRESS)
  return parser


def main(argv=None):
  args = _parser().parse_args(argv)
  if args.side:
    part, impl, dtype = args.side
    row = (
      measure_load(impl, args.dir, dtype)
      if part == 'load'
      else DECODERS[impl](args.dir, dtype, args)
    )
    with open(args.result, 'w') as f:
      json.dump(row, f)
    return

  from benchmarks.harness import (
    machine_info,
    print_machine,
    print_table,
    write_json,
  )

  info = machine_info()
  print_machine(info)
  with tempfile.TemporaryDirectory() as scratch:
    args.dir = args.dir or Path(scratch) / 'llama_1b'
    shape = args.dir / 'shape.json'
    if not (shape.is_file() and json.loads(shape.read_text())['layers'] == args.layers):
      start = time.perf_counter()
      save_model(args.dir, args.layers)
      print(f'saved the checkpoint in {time.perf_counter() - start:.0f} s', flush=True)
    ckpt = checkpoint_info(args.dir)
    ckpt['params'] = int(ckpt['checkpoint_MB'] * 1e6 / 2)  # bfloat16
    print(f'{ckpt["params"] / 1e9:.3f}B parameters in {ckpt["shards"]} shards', flush=True)
    rows = []
    if 'load' in args.part:
      rows += part_load(args, ckpt)
    if 'decode' in args.part:
      rows += part_decode(args)
  print()
  loads = [r for r in rows if r['part'] == 'load']
  if loads:
    columns = 'impl dtype weights_MB load_peak_MB peak_MB peak_x resident_MB load_s note'.split()
    print_table(loads, columns)
    print()
  decodes = [r for r in rows if r['part'] == 'decode']
  if decodes:
    columns = (
      'impl dtype threads weights_MB first_call_s ms_per_token tokens_s bandwidth_GB_s'.split()
    )
    columns += 'bound_tokens_s pct_of_bound vs_transformers match'.split()
    print_table(decodes, columns)
  config = {**vars(args), 'dir': str(args.dir), **ckpt}
  write_json(
    args.out,
    'llama_1b',
    info,
    config,
    [{k: v for k, v in r.items() if k != 'tokens'} for r in rows],
  )


if __name__ == '__main__':
  main()
